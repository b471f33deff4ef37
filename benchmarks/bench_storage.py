"""Storage (MCT Figure 3c): bytes of legacy MTT buffers against .ctraj and the lossless pack.

Experts are really trained (on the embedded digits, upsampled to each dataset's image shape, with a
classifier of that dataset's class count), written the upstream way (`torch.save` of lists of lists,
10 per file), then converted with two anchors and with the paper's four, and packed.

    python -m benchmarks.bench_storage [--experts 2] [--epochs 50] [--datasets cifar10,cifar100,tiny]
        [--train-images N] [--work DIR] [--out benchmarks/results/storage.json]

`--experts 100` reproduces the paper's setting; the per-expert numbers do not depend on the count.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

import trajstore
from benchmarks.common import write_result
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import train_experts
from trajstore.archive import pack
from trajstore.tools.convert import convert
from trajstore.tools.inspect import mtt_nbytes

# The MCT authors' measurement for 100 experts (docs/legacy-formats.md §4): (dataset, model, image size,
# classes, the paper's inner waypoints, MTT bytes, their convexified bytes).
PAPER = {
    "cifar10": ("ConvNet", 32, 10, (6, 25), 6_547_733_490, 532_881_660),
    "cifar100": ("ConvNet", 32, 100, (15, 30), 10_309_830_130, 827_948_540),
    "tiny": ("ConvNetD4", 64, 200, (15, 30), 39_557_228_530, 3_121_862_140),
    # No published measurement: CIFAR-10's shape and waypoints with upstream's ResNet18 (11.2M parameters).
    "resnet18": ("ResNet18", 32, 10, (6, 25), None, None),
}


def measure(name: str, work: Path, *, experts: int, epochs: int, train_images: int | None, seed: int,
            test_images: int | None = None, lossless: bool = True) -> dict:
    model, size, classes, waypoints, paper_mtt, paper_mct = PAPER[name]
    waypoints = tuple(w for w in waypoints if w < epochs) or (epochs // 2,)  # short smoke runs
    ds = load_dataset("digits", im_size=(size, size))
    ds = dataclasses.replace(ds, num_classes=classes)  # digits' labels, the dataset's classifier shape
    if train_images:
        ds = ds.subset(train_images, seed=seed)
    if test_images:  # the per-epoch test accuracy costs more than the training on a subset
        ds = dataclasses.replace(ds, test_images=ds.test_images[:test_images], test_labels=ds.test_labels[:test_images])
    legacy = work / name / "legacy"
    direct = train_experts(work / name / "direct.ctraj", dataset=ds, model=model, num_experts=experts,
                           epochs=epochs, legacy_dir=legacy, seed=seed, log=lambda _: None)
    legacy_bytes = sum(f.stat().st_size for f in legacy.glob("replay_buffer_*.pt"))
    two = convert(legacy, work / name / "two.ctraj", overwrite=True, progress=False)
    four = convert(legacy, work / name / "four.ctraj", waypoints=waypoints, overwrite=True, progress=False)
    packed = pack(legacy, work / name / "packed", overwrite=True, progress=False) if lossless else None
    store = trajstore.open(direct)
    final_acc = [store.expert(i).provenance.get("test_acc", [None])[-1] for i in range(store.num_experts)]
    return {
        "model": model, "image_size": size, "classes": classes, "experts": experts,
        "timesteps": epochs + 1, "num_params": store.num_params, "train_images": len(ds.train_labels),
        "expert_test_acc": final_acc,
        "legacy_bytes": legacy_bytes, "legacy_bytes_per_expert": legacy_bytes / experts,
        "legacy_bytes_100_experts_computed": mtt_nbytes(store.layers, epochs + 1, 100),
        "ctraj_two_anchors_bytes": two.bytes_written, "ratio_two_anchors": two.ratio,
        "ctraj_written_while_training_bytes": store.nbytes, "ratio_written_while_training": store.nbytes / legacy_bytes,
        "anchors_four": list(four.anchor_epochs), "ctraj_four_anchors_bytes": four.bytes_written,
        "ratio_four_anchors": four.ratio,
        "pack_bytes": packed.bytes_written if packed else None, "ratio_pack": packed.ratio if packed else None,
        "paper_mtt_bytes_100": paper_mtt, "paper_mct_bytes_100": paper_mct,
        "paper_ratio": paper_mct / paper_mtt if paper_mtt else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--datasets", default="cifar10,cifar100,tiny")
    p.add_argument("--train-images", type=int, default=None, help="train on a subset of digits (faster)")
    p.add_argument("--test-images", type=int, default=None, help="test each epoch on a subset (faster)")
    p.add_argument("--no-pack", action="store_true", help="skip the lossless pack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="keep the trained experts here (default: a temporary dir)")
    p.add_argument("--out", default="benchmarks/results/storage.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains small nets fastest (distill.quickstart)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = {name: measure(name, work, experts=args.experts, epochs=args.epochs,
                                 train_images=args.train_images, seed=args.seed, test_images=args.test_images,
                                 lossless=not args.no_pack)
                   for name in args.datasets.split(",")}
    return write_result(args.out, "storage", vars(args), results)


if __name__ == "__main__":
    main()
