"""Train expert trajectories and write them straight to a .ctraj (optionally also as a legacy MTT buffer).

The .ctraj goes through trajstore's streaming writer one epoch at a time, so only the anchors and the
running step norms are ever held, never the trajectory. Each expert's randomness (initialisation,
shuffling, DSA) comes from a seed derived from (seed, expert index), so an interrupted run that is
started again continues at the next missing expert and produces what an uninterrupted run would have.

In a process group (distill.distributed: `--nproc N` or torchrun) every process runs `train_experts`
with the same settings; they take the missing experts one at a time from a shared counter and publish
them into the one store (the writer publishes each expert atomically on its own), so expert i is the
same whichever process trained it and however many there were. Separate jobs writing one store (a
local directory or a URL such as s3://bucket/experts.ctraj) share out the experts through claims in
the store itself (distill.claims), so no expert is trained by two processes at once.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

import trajstore
from trajstore.stores import atomic
from trajstore.stores.location import locate, open_store
from trajstore.errors import FormatError, TrajstoreError
from trajstore.format.layout import ROOT_META, StoreMeta
from trajstore.legacy import loading as legacy_loading, validation as legacy_validation

from . import distributed
from .augment import seeded_dsa, strategy_operations
from .batched import stackable, trained_at_once
from .claims import Claims
from .data import Dataset, load_dataset
from .defaults import EXPERTS
from .networks import build_spec, config_for
from .synset import save_figure
from .train import accuracy, derived_seed, train_epoch

TRAJECTORIES_PER_FILE = 10  # upstream buffer.py's save_interval


def train_experts(out: str | os.PathLike, *, dataset: str | Dataset = EXPERTS.dataset,
                  data_path: str | os.PathLike | None = None, model: str = EXPERTS.model,
                  num_experts: int = EXPERTS.num_experts, epochs: int = EXPERTS.epochs, lr: float = EXPERTS.lr,
                  batch_size: int = EXPERTS.batch_size, momentum: float = EXPERTS.momentum,
                  weight_decay: float = EXPERTS.weight_decay, dsa: bool = EXPERTS.dsa,
                  dsa_strategy: str = EXPERTS.dsa_strategy, zca: bool = EXPERTS.zca, waypoints: Sequence[int] = (),
                  smoothing: str | None = None,
                  legacy_dir: str | os.PathLike | None = None, seed: int = EXPERTS.seed,
                  device: str | torch.device | None = None, progress: bool = True,
                  log: Callable[[str], object] = print, batch_experts: int = EXPERTS.batch_experts,
                  storage_options: dict | None = None) -> Path | str:
    """Train experts 0..num_experts-1 with SGD into the .ctraj `out` (defaults: distill.defaults): a
    local path (returned as a Path) or an fsspec URL (returned as given; `storage_options` go to its
    filesystem, as in `trajstore.open`).

    Experts already complete in `out` are kept and skipped; the settings must match those the store
    was started with. dataset is a name for `load_dataset` (with data_path and zca) or an already
    loaded `Dataset`. device: CUDA when present, else the CPU, unless given. With
    legacy_dir, the same runs also go to `legacy_dir/replay_buffer_{n}.pt`, 10 trajectories per file,
    in upstream's layout (each timestep copied, so CPU runs do not alias their timesteps).
    batch_experts > 1 trains that many experts at once (`batched.trained_at_once`: as one stacked
    network on a GPU, side by side on the CPU's cores): each keeps its own seed, data order and DSA draws, so expert i is the same as when trained alone
    (up to float rounding). Networks with batch norm, and runs in a process group (whose queue hands
    out one expert at a time), are trained one by one regardless.
    `smoothing` ("binomial", "neighbour-mean"; default none) smooths the stored anchors (docs/format.md §4.1).
    In a process group (see the module's doc) only rank 0 reports, with one bar over all experts' epochs.
    Several jobs may write one store at once: each trains the experts no other has claimed (the
    claims: distill.claims) and says which it left to the others.
    """
    target = locate(out, storage_options)
    out = target.path if target.path is not None else target.url
    group = distributed.current()
    main = group is None or group.is_main
    try:
        strategy_operations(dsa_strategy)
    except ValueError as exc:
        raise TrajstoreError(f"dsa_strategy: {exc}") from None
    if num_experts < 1 or epochs < 1 or batch_experts < 1:
        raise TrajstoreError(f"need at least one expert, one epoch and batch_experts >= 1 (got {num_experts}, "
                             f"{epochs}, {batch_experts})")
    if group is not None:
        group.check_same("experts", {"out": str(out), "dataset": dataset if isinstance(dataset, str) else
                                     dataset.meta(), "model": model, "num_experts": num_experts, "epochs": epochs,
                                     "lr": lr, "batch_size": batch_size, "momentum": momentum, "dsa": dsa,
                                     "weight_decay": weight_decay, "dsa_strategy": dsa_strategy, "zca": zca,
                                     "waypoints": list(waypoints), "smoothing": smoothing, "seed": seed,
                                     "legacy_dir": str(legacy_dir) if legacy_dir is not None else None})
    dev = distributed.device_for(device)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_path=data_path, zca=zca)
    config = config_for(model, ds.channel, ds.num_classes, ds.im_size)
    architecture = {"name": model, **config.to_json()}
    training = {**ds.meta(), "epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
                "weight_decay": weight_decay, "optimizer": "SGD", "dsa": dsa,
                "dsa_strategy": dsa_strategy if dsa else None,
                "seed": seed, "num_train": len(ds.train_labels)}
    store = open_store(target, mode="w")
    _check_resumable(store, architecture, training)
    train = ds.train_images.to(dev), ds.train_labels.to(dev)
    test = ds.test_images.to(dev), ds.test_labels.to(dev)

    def say(message: str) -> None:
        if main:
            with tqdm.external_write_mode():
                log(message)

    with torch.device("meta"):  # the layer table needs only shapes; this leaves torch's RNG alone
        layers = trajstore.layer_table(build_spec(config))
        stacked = batch_experts > 1 and group is None and stackable(build_spec(config))
    if group is not None and not main:
        group.barrier()  # rank 0 creates the store (or fails) first; the others join it
    with trajstore.create(out, layers, epochs + 1, waypoints=waypoints, smoothing=smoothing,
                          architecture=architecture,
                          training=training, provenance={"generator": "distill.experts"}, append=True,
                          storage_options=storage_options) as w, \
            _claiming(store, lambda i: i in w.existing_experts()) as claims:
        if group is not None and main:
            group.barrier()
        twin = _LegacyTwin(Path(legacy_dir)) if legacy_dir is not None else None

        def found() -> list[int]:
            finished = w.existing_experts()
            if twin is not None:
                twin.check(finished)
            return finished

        # In a group: what rank 0 found before anyone publishes more (or its refusal), on every rank.
        finished = found() if group is None else group.on_main(found)
        todo = [i for i in range(num_experts) if i not in set(finished)]
        queue = _Queue(todo, epochs, group)
        left = _Left(twin)  # experts another job was training (it holds their claims)
        say(f"{out}: {len(finished)} experts already there, training {len(todo)} on {ds.name} ({dev}"
            + (f" x {group.world_size} processes)" if group is not None else ")"))
        with tqdm(total=len(todo) * epochs, desc="experts", unit="epoch", disable=not (progress and main)) as bar:
            def claimed(i: int) -> bool:
                """Whether this job trains expert i: it holds the claim; else another job does (skipped)."""
                if claims.acquire(i):
                    return True
                left.add(i)
                queue.skip(bar)
                return False

            group_args = dict(train=train, test=test, seed=seed, dev=dev, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, batch_size=batch_size, dsa=dsa, dsa_strategy=dsa_strategy,
                              epochs=epochs)
            for first in range(0, len(todo) if stacked else 0, batch_experts):
                batch = [i for i in todo[first:first + batch_experts] if claimed(i)]
                if batch:
                    _train_together(batch, lambda: build_spec(config), w, twin, say, bar, **group_args)
                for i in batch:
                    claims.release(i)
                if twin is not None:
                    twin.merge(set(w.existing_experts()))
            for index in [] if stacked else queue:
                if not claimed(index):
                    continue
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
                            queue.epoch_done(bar)
                        ew.append(net)
                        if twin is not None:
                            trajectory.append([p.detach().to("cpu", copy=True) for p in net.parameters()])
                    record["seconds"] = time.perf_counter() - started
                    if twin is not None:
                        twin.add(index, trajectory)  # before the expert is published: see _LegacyTwin
                claims.release(index)
                say(f"expert {index} done in {record['seconds']:.1f} s: "
                    f"test acc {100 * record['test_acc'][-1]:.2f}%")
                if twin is not None and main:
                    twin.merge(set(w.existing_experts()))
            queue.wait_for_all(bar)
        if group is not None:
            group.barrier()  # every expert published before the store is closed and the twin finished
            left.experts = sorted(i for ours in group.gather(left.experts) for i in ours)
        if left.experts:
            say(f"{out}: left experts {left.experts} to another job that is training them (it holds their "
                "claims); run this again afterwards to train any it did not finish")
        if twin is not None and main:
            twin.merge(set(w.existing_experts()))
    return out


def _train_together(group: list[int], make_net: Callable[[], torch.nn.Module], w, twin: "_LegacyTwin | None",
                    say: Callable[[str], None], bar, *, train, test, seed: int, dev: torch.device, lr: float,
                    momentum: float, weight_decay: float, batch_size: int, dsa: bool, dsa_strategy: str,
                    epochs: int) -> None:
    """Experts `group` trained at once, each as `train_experts` trains one alone, then published in order."""
    group = list(group)
    seeds = [derived_seed(seed, index) for index in group]
    nets = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            nets.append(make_net().to(dev))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    augments = [seeded_dsa(g, dsa_strategy) for g in generators] if dsa else None
    stack = trained_at_once(nets, dev)
    del nets
    optimizer = torch.optim.SGD(stack.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    records = [{"seed": s, "device": str(dev), "batch_experts": len(group), "train_acc": [], "test_acc": [],
                "train_loss": []} for s in seeds]
    writers = [w.expert(index, provenance=record) for index, record in zip(group, records)]
    trajectories: list[list] = [[] for _ in group]
    started = time.perf_counter()
    try:
        for epoch in range(epochs + 1):
            if epoch > 0:
                losses, train_accs = stack.train_epoch(*train, optimizer=optimizer, batch_size=batch_size,
                                                       generators=generators, augments=augments, device=dev)
                test_accs = stack.accuracy(*test, device=dev)
                for index, record, loss, train_acc, test_acc in zip(group, records, losses, train_accs, test_accs):
                    for key, value in zip(("train_loss", "train_acc", "test_acc"), (loss, train_acc, test_acc)):
                        record[key].append(value)
                    say(f"expert {index} epoch {epoch}/{epochs}: train loss {loss:.4f}, "
                        f"train acc {100 * train_acc:.2f}%, test acc {100 * test_acc:.2f}%")
                bar.update(len(group))
            for k, ew in enumerate(writers):
                params = [p.detach() for p in stack.network(k)]
                ew.append(params)
                if twin is not None:
                    trajectories[k].append([p.to("cpu", copy=True) for p in params])
        seconds = time.perf_counter() - started
        while writers:  # published in index order, each right after its legacy twin (see _LegacyTwin)
            index, record, ew, trajectory = group[0], records[0], writers[0], trajectories[0]
            record["seconds"] = seconds
            if twin is not None:
                twin.add(index, trajectory)
            ew.close()
            del group[0], records[0], writers[0], trajectories[0]
            say(f"expert {index} done in {seconds:.1f} s (trained together with others): "
                f"test acc {100 * record['test_acc'][-1]:.2f}%")
    except BaseException:
        for ew in writers:  # nothing of the unpublished ones is written
            ew.abort()
        raise


class _Left:
    """The experts this job leaves to another that holds their claims. A legacy twin cannot follow:
    its buffer files are this job's own and must hold every expert, in order."""

    def __init__(self, twin: "_LegacyTwin | None"):
        self.twin, self.experts = twin, []

    def add(self, index: int) -> None:
        if self.twin is not None:
            raise TrajstoreError(f"expert {index} is being trained by another job writing this store (it holds "
                                 "the expert's claim), but --legacy-dir needs every expert from this job: run "
                                 "one job with a legacy twin, or leave --legacy-dir out", self.twin.dir)
        self.experts.append(index)


class _Queue:
    """The experts still to train, handed out one at a time: in order alone; in a process group from a
    counter in the group's store, so a process that is free takes the next one; plus the count of
    epochs done by every process, which rank 0's progress bar shows."""

    def __init__(self, todo: list[int], epochs: int, group: distributed.Group | None):
        self.todo, self.group, self.total, self.done, self.per = todo, group, len(todo) * epochs, 0, epochs
        if group is not None:
            run = group.broadcast(uuid.uuid4().hex)  # fresh counters for this run
            self.taken, self.epochs = group.counter(f"experts/{run}/taken"), group.counter(f"experts/{run}/epochs")

    def __iter__(self):
        if self.group is None:
            yield from self.todo
            return
        while (k := self.taken.add(1) - 1) < len(self.todo):
            yield self.todo[k]

    def _show(self, done: int, bar) -> None:
        bar.update(done - self.done)
        self.done = done

    def skip(self, bar) -> None:
        """An expert handed out here that another job trains: its epochs count as done."""
        self._show(self.done + self.per if self.group is None else self.epochs.add(self.per), bar)

    def epoch_done(self, bar) -> None:
        self._show(self.done + 1 if self.group is None else self.epochs.add(1), bar)

    def wait_for_all(self, bar) -> None:
        """Rank 0's bar follows the others' epochs until every expert is done."""
        if self.group is None or not self.group.is_main:
            return
        while self.done < self.total:
            time.sleep(0.2)
            self._show(self.epochs.value, bar)


@contextlib.contextmanager
def _claiming(store, published):
    claims = Claims(store, published)
    try:
        yield claims
    finally:
        claims.release_all()


def _check_resumable(store, architecture: dict, training: dict) -> None:
    """Refuse to append experts trained differently from those already in the store."""
    out = store.url
    if not store.present():
        return
    if not store.exists(ROOT_META):
        raise FormatError("exists but is not a .ctraj directory (no zarr.json); choose another output", out)
    existing = StoreMeta.decode(store.read_bytes(ROOT_META), store.describe(ROOT_META))
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

    Expert i is trajectory i % 10 of replay_buffer_{i // 10}.pt, as upstream names them. Whichever
    process trains expert i saves its trajectory alone as PARTS/expert_{i}.pt before the expert is
    published in the .ctraj; one process then `merge`s the parts of published experts, in order, into
    the buffer files. So the buffer files only ever hold published experts, and a part left by a crash
    is replaced when its expert is trained again.
    """

    PARTS = ".trajstore-parts"  # a hidden subfolder: upstream's loaders only open replay_buffer_{n}.pt

    def __init__(self, directory: Path):
        self.dir = directory
        self.parts = directory / self.PARTS

    def _part(self, index: int) -> Path:
        return self.parts / f"expert_{index}.pt"

    def count(self) -> int:
        """How many trajectories the buffer files hold."""
        n = 0
        while _buffer_path(self.dir, n).exists():
            n += 1
        return TRAJECTORIES_PER_FILE * (n - 1) + len(_load_buffer(_buffer_path(self.dir, n - 1))) if n else 0

    def check(self, finished: list[int]) -> None:
        """Refuse a twin that does not hold the experts `finished` in the .ctraj (and nothing else)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        count = self.count()
        merged = set(range(count))
        if not merged <= set(finished) or any(i not in merged and not self._part(i).is_file() for i in finished):
            raise TrajstoreError(f"holds {count} legacy trajectories but the .ctraj holds {len(finished)} "
                                 "experts: it belongs to another run (choose another --legacy-dir), or "
                                 "the twin was not written from the start", self.dir)

    def add(self, index: int, trajectory: list[list[torch.Tensor]]) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self._part(index)
        tmp = atomic.temp_sibling(path)
        try:
            torch.save([trajectory], tmp)  # a buffer of one trajectory
            atomic.publish_file(tmp, path, overwrite=True)
        finally:
            tmp.unlink(missing_ok=True)

    def merge(self, published: set[int]) -> None:
        """Append the parts of the published experts that come next, in order, to the buffer files."""
        count = self.count()
        while count in published and self._part(count).is_file():
            path = _buffer_path(self.dir, count // TRAJECTORIES_PER_FILE)
            position = count % TRAJECTORIES_PER_FILE
            kept = _load_buffer(path)[:position] if position else []
            if len(kept) != position:
                raise FormatError(f"holds {len(kept)} trajectories; expert {count} would be number {position}", path)
            batch = []
            while count in published and self._part(count).is_file() and len(kept) + len(batch) < TRAJECTORIES_PER_FILE:
                batch.append(_load_buffer(self._part(count))[0])
                count += 1
            tmp = atomic.temp_sibling(path)
            try:
                torch.save(kept + batch, tmp)
                atomic.publish_file(tmp, path, overwrite=True)
            finally:
                tmp.unlink(missing_ok=True)
        for part in self.parts.glob("expert_*.pt") if self.parts.is_dir() else ():
            if int(part.stem.split("_")[1]) < count:  # merged (or merged before a crash)
                part.unlink(missing_ok=True)
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()


def plot_accuracy(ctraj: str | os.PathLike, png: str | os.PathLike, *, overwrite: bool = False,
                  storage_options: dict | None = None) -> Path:
    """Test accuracy per epoch of every expert in a .ctraj written by `train_experts`, as a PNG."""
    from matplotlib.figure import Figure

    store = trajstore.open(ctraj, storage_options=storage_options)
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
