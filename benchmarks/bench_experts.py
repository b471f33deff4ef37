"""Expert throughput: `trajstore experts --batch-experts K` for several K, in experts per hour.

    python -m benchmarks.bench_experts [--ks 1,4,8,1t] [--epochs 2] [--train-images 512] [--device cpu|cuda]

Each K trains K experts (one group trained at once: stacked on a GPU, side by side on the CPU's
cores, `batched.trained_at_once`) into a fresh .ctraj with the family's expert settings (SGD lr 0.01,
batch 256, DSA) on a random subset of the embedded digits at 3x32x32. "1t" is K = 1 on one thread
(the work of one expert, where K = 1 uses all of torch's threads). The Ks take turns within every
round, so load from other jobs falls on all of them alike. Throughput is given from wall time and
from this process's CPU time (`time.process_time`, all its threads).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_device_option, add_modules_option, as_modules, check_device, write_result
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import train_experts
from trajstore.tools.threads import single_threaded


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,4,8", help="comma-separated group sizes (1t: 1 on one thread)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_device_option(p)
    add_modules_option(p)
    p.add_argument("--out", default="benchmarks/results/experts.json")
    args = p.parse_args(argv)
    with as_modules(args.modules):
        return _run(args)


def _run(args):
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = args.ks.split(",")

    def size(k: str) -> int:
        return int(k.rstrip("t"))

    def threads(k: str):
        return single_threaded() if k.endswith("t") else contextlib.nullcontext()
    ds = load_dataset("digits").subset(args.train_images)
    wall: dict[str, list[float]] = {k: [] for k in ks}
    cpu: dict[str, list[float]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory() as tmp:
        # One untimed job of each K first: CUDA context, cuDNN plans and vmap's compiled paths would
        # otherwise land on whichever K is timed first.
        for k in ks:
            with threads(k):
                train_experts(Path(tmp) / f"warmup-k{k}.ctraj", dataset=ds, model=args.model, num_experts=size(k),
                              epochs=1, batch_experts=size(k), device=device, progress=False, log=lambda _: None)
        for r in range(args.rounds):
            for k in ks:
                with threads(k):
                    t0, c0 = time.perf_counter(), time.process_time()
                    train_experts(Path(tmp) / f"k{k}-r{r}.ctraj", dataset=ds, model=args.model, num_experts=size(k),
                                  epochs=args.epochs, batch_experts=size(k), device=device, progress=False,
                                  log=lambda _: None)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    per_hour = {k: 3600 * size(k) / statistics.median(t) for k, t in wall.items()}
    per_cpu_hour = {k: 3600 * size(k) / statistics.median(t) for k, t in cpu.items()}
    results = {device.split(":")[0]: {
        "experts_per_hour": per_hour, "experts_per_cpu_hour": per_cpu_hour, "wall_seconds": wall,
        "cpu_seconds": cpu,
        "speedup_over_k1": {k: per_hour[k] / per_hour["1"] for k in ks} if "1" in ks else None,
        "cpu_speedup_over_k1": {k: per_cpu_hour[k] / per_cpu_hour["1"] for k in ks} if "1" in ks else None}}
    return write_result(args.out, "experts", vars(args), results)


if __name__ == "__main__":
    main()
