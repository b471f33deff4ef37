"""Train expert trajectories and write them straight to a .ctraj (optionally also as a legacy MTT buffer).

The .ctraj goes through trajstore's streaming writer one epoch at a time, so only the anchors and the
running step norms are ever held, never the trajectory. Each expert's randomness (initialisation,
shuffling, DSA) comes from a seed derived from (seed, expert index), so an interrupted run that is
started again continues at the next missing expert and produces what an uninterrupted run would have.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

import trajstore
from trajstore.stores import atomic
from trajstore.errors import FormatError, TrajstoreError
from trajstore.format.layout import ROOT_META, StoreMeta
from trajstore.legacy import loading as legacy_loading, validation as legacy_validation

from .augment import STRATEGY, seeded_dsa, strategy_operations
from .data import Dataset, load_dataset
from .networks import build_spec, config_for
from .synset import save_figure
from .train import accuracy, derived_seed, resolve_device, train_epoch

TRAJECTORIES_PER_FILE = 10  # upstream buffer.py's save_interval


def train_experts(out: str | os.PathLike, *, dataset: str | Dataset = "digits",
                  data_path: str | os.PathLike | None = None, model: str = "ConvNet", num_experts: int = 100,
                  epochs: int = 50, lr: float = 0.01, batch_size: int = 256, momentum: float = 0.0,
                  weight_decay: float = 0.0, dsa: bool = True, dsa_strategy: str = STRATEGY, zca: bool = False,
                  waypoints: Sequence[int] = (), smoothing: str | None = None,
                  legacy_dir: str | os.PathLike | None = None, seed: int = 0,
                  device: str | torch.device | None = None, progress: bool = True,
                  log: Callable[[str], object] = print) -> Path:
    """Train experts 0..num_experts-1 with SGD (the family's defaults) into the .ctraj `out`.

    Experts already complete in `out` are kept and skipped; the settings must match those the store
    was started with. dataset is a name for `load_dataset` (with data_path and zca) or an already
    loaded `Dataset`. device: CUDA when present, else the CPU, unless given. With
    legacy_dir, the same runs also go to `legacy_dir/replay_buffer_{n}.pt`, 10 trajectories per file,
    in upstream's layout (each timestep copied, so CPU runs do not alias their timesteps).
    `smoothing` ("binomial", "neighbour-mean"; default none) smooths the stored anchors (docs/format.md §4.1).
    """
    out = Path(out)
    try:
        strategy_operations(dsa_strategy)
    except ValueError as exc:
        raise TrajstoreError(f"dsa_strategy: {exc}") from None
    if num_experts < 1 or epochs < 1:
        raise TrajstoreError(f"need at least one expert and one epoch (got {num_experts}, {epochs})")
    dev = resolve_device(device)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_path=data_path, zca=zca)
    config = config_for(model, ds.channel, ds.num_classes, ds.im_size)
    architecture = {"name": model, **config.to_json()}
    training = {**ds.meta(), "epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
                "weight_decay": weight_decay, "optimizer": "SGD", "dsa": dsa,
                "dsa_strategy": dsa_strategy if dsa else None,
                "seed": seed, "num_train": len(ds.train_labels)}
    _check_resumable(out, architecture, training)
    train = ds.train_images.to(dev), ds.train_labels.to(dev)
    test = ds.test_images.to(dev), ds.test_labels.to(dev)

    def say(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    with torch.device("meta"):  # the layer table needs only shapes; this leaves torch's RNG alone
        layers = trajstore.layer_table(build_spec(config))
    with trajstore.create(out, layers, epochs + 1, waypoints=waypoints, smoothing=smoothing,
                          architecture=architecture,
                          training=training, provenance={"generator": "distill.experts"}, append=True) as w:
        finished = w.existing_experts()
        todo = [i for i in range(num_experts) if i not in set(finished)]
        twin = _LegacyTwin(Path(legacy_dir), finished) if legacy_dir is not None else None
        say(f"{out}: {len(finished)} experts already there, training {len(todo)} on {ds.name} ({dev})")
        with tqdm(total=len(todo) * epochs, desc="experts", unit="epoch", disable=not progress) as bar:
            for index in todo:
                s = derived_seed(seed, index)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    net = build_spec(config).to(dev)
                generator = torch.Generator().manual_seed(s)
                augment = seeded_dsa(generator, dsa_strategy) if dsa else None
                optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                # Accuracies are known only at the end; the writer publishes this dict when the expert closes.
                record = {"seed": s, "device": str(dev), "train_acc": [], "test_acc": [], "train_loss": []}
                started = time.perf_counter()
                with w.expert(index, provenance=record) as ew:
                    trajectory = []
                    for epoch in range(epochs + 1):
                        if epoch > 0:
                            loss, train_acc = train_epoch(net, *train, optimizer=optimizer, batch_size=batch_size,
                                                          augment=augment, device=dev, generator=generator)
                            test_acc = accuracy(net, *test, device=dev)
                            for key, value in zip(("train_loss", "train_acc", "test_acc"), (loss, train_acc, test_acc)):
                                record[key].append(value)
                            say(f"expert {index} epoch {epoch}/{epochs}: train loss {loss:.4f}, "
                                f"train acc {100 * train_acc:.2f}%, test acc {100 * test_acc:.2f}%")
                            bar.update()
                        ew.append(net)
                        if twin is not None:
                            trajectory.append([p.detach().to("cpu", copy=True) for p in net.parameters()])
                    record["seconds"] = time.perf_counter() - started
                    if twin is not None:
                        twin.add(index, trajectory)  # before the expert is published: see _LegacyTwin
                say(f"expert {index} done in {record['seconds']:.1f} s: "
                    f"test acc {100 * record['test_acc'][-1]:.2f}%")
    return out


def _check_resumable(out: Path, architecture: dict, training: dict) -> None:
    """Refuse to append experts trained differently from those already in `out`."""
    if not out.exists():
        return
    meta_path = out / ROOT_META
    if not meta_path.is_file():
        raise FormatError("exists but is not a .ctraj directory (no zarr.json); choose another output", out)
    existing = StoreMeta.decode(meta_path.read_bytes(), meta_path)
    diffs = [f"{k}: {existing.training.get(k)!r} there, {v!r} now" for k, v in training.items()
             if existing.training.get(k) != v]
    if existing.architecture != architecture:
        diffs.append(f"architecture: {existing.architecture!r} there, {architecture!r} now")
    if diffs:
        raise TrajstoreError("cannot continue this store with other settings (" + "; ".join(diffs)
                             + "); use the same options or another output", out)


def _buffer_path(directory: Path, n: int) -> Path:
    return directory / f"replay_buffer_{n}.pt"


def _load_buffer(path: Path) -> list:
    obj, _ = legacy_loading.load(path)  # weights_only, memory-mapped; one trajstore error on any failure
    return legacy_validation.trajectories(obj, path)


class _LegacyTwin:
    """The MTT buffer of the same runs, kept in step with the .ctraj so both resume together.

    Expert i is trajectory i % 10 of replay_buffer_{i // 10}.pt. A trajectory is saved before its
    expert is published in the .ctraj, so after a crash the twin holds at most one expert more than
    the .ctraj; that stale trajectory is replaced when the expert is trained again.
    """

    def __init__(self, directory: Path, finished: list[int]):
        self.dir = directory
        if finished != list(range(len(finished))):
            raise TrajstoreError(f"a legacy twin needs experts numbered from 0 without gaps; the .ctraj "
                                 f"holds {finished}", directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        count = 0
        n = 0
        while _buffer_path(self.dir, n).exists():
            n += 1
        if n:
            count = TRAJECTORIES_PER_FILE * (n - 1) + len(_load_buffer(_buffer_path(self.dir, n - 1)))
        if count not in (len(finished), len(finished) + 1):
            raise TrajstoreError(f"holds {count} legacy trajectories but the .ctraj holds {len(finished)} "
                                 "experts: it belongs to another run (choose another --legacy-dir), or "
                                 "the twin was not written from the start", self.dir)

    def add(self, index: int, trajectory: list[list[torch.Tensor]]) -> None:
        path = _buffer_path(self.dir, index // TRAJECTORIES_PER_FILE)
        position = index % TRAJECTORIES_PER_FILE
        kept = _load_buffer(path)[:position] if position else []
        if len(kept) != position:
            raise FormatError(f"holds {len(kept)} trajectories; expert {index} would be number {position}", path)
        tmp = atomic.temp_sibling(path)
        try:
            torch.save(kept + [trajectory], tmp)
            atomic.publish_file(tmp, path, overwrite=True)
        finally:
            tmp.unlink(missing_ok=True)


def plot_accuracy(ctraj: str | os.PathLike, png: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Test accuracy per epoch of every expert in a .ctraj written by `train_experts`, as a PNG."""
    from matplotlib.figure import Figure

    store = trajstore.open(ctraj)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for expert in store:
        acc = expert.provenance.get("test_acc")
        if acc:
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], lw=1, label=f"expert {expert.id}")
    if not ax.lines:
        raise FormatError("no expert records test accuracies (not written by `trajstore experts`)", ctraj)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{store.num_experts} experts, {store.training.get('dataset', '?')}")
    if len(ax.lines) <= 10:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, png, overwrite=overwrite)
