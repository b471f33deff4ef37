"""A whole distillation run: MCT on a .ctraj, or classic MTT on a legacy buffer or packed archive.

`distill(config, out_dir)` samples (start, target) pairs from the experts, matches them with the
synthetic set (distill.matching), evaluates the set every `eval_every` iterations with the family's
protocol (distill.evaluate), keeps the best set, and checkpoints so that a killed run, started again,
continues from its last checkpoint and ends exactly where an uninterrupted run with the same seed ends.

Output folder:

    config.json                the resolved settings; a run resumes only with the same settings
    metrics.jsonl              one JSON object per line: {"kind": "step", "iteration", "loss", "expert",
                               "start", "target", "syn_lr", "seconds"} per iteration, and
                               {"kind": "eval", "iteration", "mean", "std", "accuracies", "syn_lr",
                               "seconds"} per evaluation (iteration = updates done before it)
    checkpoint.pt              the latest resumable state (plain tensors; read with weights_only=True)
    synset_best.safetensors    the best evaluated set so far      } distill.synset format: images,
    synset_final.safetensors   the set after the last iteration   } labels, learned lr, metadata
    images_best.pt, labels_best.pt, lr_best.pt   the best set as upstream saves it: plain tensors
    tensorboard/, wandb/       only with logger="tensorboard" / "wandb" (distill.loggers)
    grid_init.png, grid_best.png, grid_final.png   the sets as image grids, one row per class
    accuracy.png               test accuracy (mean +- std) over iterations
    result.json                written last: its presence marks a finished run

Every file is written atomically, so a kill at any moment leaves the previous state readable.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import trajstore
from trajstore.stores import atomic
from trajstore.errors import ExistsError, FormatError, TrajstoreError

from . import distributed, loggers
from .augment import STRATEGY, dsa, strategy_operations
from .data import Dataset, load_dataset
from .evaluate import EvalResult, evaluate_synset
from .matching import MEMORY_MODES, MatchConfig, Matcher, SyntheticSet
from .networks import FunctionalNet, build
from .presets import get_preset
from .subsets import expert_subset
from .sources import ConvexifiedSource, LegacySource, TrajectorySource, check_zca
from .synset import save_figure, save_grid, save_synset, save_upstream

METHODS = ("mct", "mtt")
INITS = ("real", "noise")
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
BEST = "synset_best.safetensors"
FINAL = "synset_final.safetensors"
ACCURACY_PNG = "accuracy.png"
CHECKPOINT_VERSION = 2  # 2: the expert walk is part of the state
DEFAULT_LR_TEACHER = 0.01  # upstream's --lr_teacher default, for experts that do not record their lr

# Settings that may change between a run and its resumption: where things are, not what is computed.
_RESUMABLE_CHANGES = ("device", "data_path")
# Upstream directory names -> load_dataset names.
_DATASET_ALIASES = {"tiny": "tinyimagenet", "tinyimagenet": "tinyimagenet", "cifar10": "cifar10",
                    "cifar100": "cifar100", "digits": "digits"}


@dataclass(frozen=True)
class DistillConfig:
    """Everything that decides a run's result. None means "from the source's metadata" (dataset, model,
    im_size, channels, zca, lr_teacher) or "by what the source is" (method).

    Matching defaults are upstream MTT's distill.py defaults; `from_preset` starts from a published row.
    """

    source: str
    method: str | None = None
    ipc: int = 1
    syn_steps: int = 20
    expert_epochs: float = 3
    max_start_epoch: float = 25
    batch_syn: int | None = None
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float | None = None
    iterations: int = 5000
    eval_every: int = 100  # the MCT paper's curves evaluate every 100 iterations
    eval_nets: int = 5
    eval_epochs: int = 1000
    checkpoint_every: int = 100
    init: str = "real"
    discrete: bool = False
    memory: str = "plain"
    dsa: bool = True
    dsa_strategy: str = STRATEGY
    zca: bool | None = None
    dataset: str | None = None
    data_path: str | None = None
    model: str | None = None
    im_size: tuple[int, int] | None = None
    channels: int | None = None
    device: str | None = None
    seed: int = 0
    max_experts: int | None = None
    max_files: int | None = None
    preset: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "source", str(self.source))
        if self.im_size is not None:
            object.__setattr__(self, "im_size", tuple(int(s) for s in self.im_size))
        if self.method is not None and self.method not in METHODS:
            raise TrajstoreError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.init not in INITS:
            raise TrajstoreError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if self.memory not in MEMORY_MODES:
            raise TrajstoreError(f"memory={self.memory!r}: expected one of {', '.join(MEMORY_MODES)}")
        counts = {"ipc": self.ipc, "iterations": self.iterations, "eval_nets": self.eval_nets,
                  "checkpoint_every": self.checkpoint_every}
        if any(v < 1 for v in counts.values()) or self.eval_every < 0 or self.eval_epochs < 0:
            raise TrajstoreError(f"need ipc, iterations, eval_nets, checkpoint_every >= 1 and eval_every, "
                                 f"eval_epochs >= 0 (got {counts}, eval_every={self.eval_every}, "
                                 f"eval_epochs={self.eval_epochs})")
        if any(v is not None and v < 1 for v in (self.max_experts, self.max_files)):
            raise TrajstoreError(f"max_experts and max_files must be >= 1 (got {self.max_experts}, {self.max_files})")
        try:
            strategy_operations(self.dsa_strategy)
        except ValueError as exc:
            raise TrajstoreError(f"dsa_strategy: {exc}") from None
        if self.lr_teacher is not None and not self.lr_teacher > 0:
            raise TrajstoreError(f"lr_teacher={self.lr_teacher} must be > 0")
        self.match_config()  # its own checks of syn_steps, batch_syn, lr_img, lr_lr

    @classmethod
    def from_preset(cls, source: str | os.PathLike, preset: str | None = None, *,
                    storage_options: dict | None = None, **overrides) -> "DistillConfig":
        """A config from a named preset (see distill.presets), with every non-None override on top.

        A preset fixes the method; a preset name without one takes the method of the run (`method`,
        else the kind of source, at a URL reached with `storage_options`), and a preset of the other
        method is refused.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        chosen = None
        if preset:
            method = overrides.get("method")
            if method is None and preset.strip().lower().split("-", 1)[0] not in METHODS:
                method = method_for(source, storage_options=storage_options)
            chosen = get_preset(preset, method)
        settings = {**(chosen.settings() if chosen else {}), **overrides}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TrajstoreError(f"unknown distillation settings {unknown}")
        return cls(source=str(source), preset=chosen.name if chosen else None, **settings)

    def match_config(self) -> MatchConfig:
        return MatchConfig(syn_steps=self.syn_steps, expert_epochs=self.expert_epochs,
                           max_start_epoch=self.max_start_epoch, batch_syn=self.batch_syn, lr_img=self.lr_img,
                           lr_lr=self.lr_lr, discrete=self.discrete, memory=self.memory)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["im_size"] = list(self.im_size) if self.im_size is not None else None
        return d


@dataclass(frozen=True)
class DistillResult:
    """What a finished run produced. Accuracies are the final and the best evaluation."""

    out_dir: Path
    method: str
    iterations: int
    final: EvalResult
    best: EvalResult
    best_iteration: int
    syn_lr: float
    seconds: float
    evals: tuple[dict, ...] = ()

    @property
    def final_path(self) -> Path:
        return self.out_dir / FINAL

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "method": self.method, "iterations": self.iterations,
                "final": dataclasses.asdict(self.final), "best": dataclasses.asdict(self.best),
                "best_iteration": self.best_iteration, "syn_lr": self.syn_lr, "seconds": self.seconds,
                "evals": list(self.evals)}


@dataclass
class Experts:
    """An opened source with what its metadata says about how the experts were trained."""

    source: TrajectorySource
    method: str
    path: Path | str  # a local path, or a URL
    training: dict
    architecture: dict | None
    layers: tuple
    nbytes: int


def load_result(out_dir: str | os.PathLike) -> DistillResult:
    """The result of the finished run in `out_dir` (its result.json)."""
    path = Path(out_dir) / RESULT
    try:
        doc = json.loads(path.read_text())
        return DistillResult(Path(out_dir), doc["method"], int(doc["iterations"]), _eval_result(doc["final"]),
                             _eval_result(doc["best"]), int(doc["best_iteration"]), float(doc["syn_lr"]),
                             float(doc["seconds"]), tuple(doc["evals"]))
    except FileNotFoundError:
        raise FormatError("no finished distillation run here (no result.json)", out_dir) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"not a distillation result ({type(exc).__name__}: {exc})", path) from None


def method_for(path: str | os.PathLike, method: str | None = None, *, kind: str | None = None,
               storage_options: dict | None = None) -> str:
    """`method`, or the one the source at `path` calls for: mct for a .ctraj, mtt for anything else.
    `kind` is `kind_of(path)` when the caller has it already (saves locating the path again)."""
    if method:
        return method
    if kind is None:
        from trajstore.tools.inspect import kind_of

        kind = kind_of(path, storage_options)
    return "mct" if kind == "ctraj" else "mtt"


def open_experts(path: str | os.PathLike, method: str | None = None, *, model: str | None = None,
                 max_experts: int | None = None, max_files: int | None = None,
                 storage_options: dict | None = None) -> Experts:
    """The trajectory source at `path`: a .ctraj for MCT, a legacy buffer or packed archive for MTT.

    `method` None picks by what the path is (see `method_for`). `model` names a legacy buffer's tensors
    (they carry no names; by default they are inferred from their shapes). `max_experts` / `max_files`
    restrict the experts as upstream's flags do (see distill.subsets). `path` may be a URL
    (s3://bucket/experts.ctraj); `storage_options` go to its filesystem, as in `trajstore.open`.
    """
    from trajstore.stores.location import locate
    from trajstore.tools.convert import open_source

    location = locate(path, storage_options)
    path = location.path if location.path is not None else location.url
    kind = location.kind
    if kind == "missing":
        raise FormatError("no such .ctraj, legacy buffer or archive", path)
    method = method_for(path, method, kind=kind)
    if method == "mct":
        if kind != "ctraj":
            raise TrajstoreError(f"MCT distills from a .ctraj but this is a {kind} buffer: convert it first "
                                 f"(`trajstore convert {path} OUT.ctraj`) or use --method mtt", path)
        store = trajstore.open(location.target, storage_options=storage_options)
        return Experts(ConvexifiedSource(expert_subset(store, max_experts, max_files)), method, path,
                       dict(store.training), store.architecture, store.layers, store.nbytes)
    if kind == "ctraj":
        raise TrajstoreError("classic MTT reads the stored epochs of a legacy buffer or packed archive, but "
                             "this is a .ctraj (convexified): use --method mct", path)
    buffer = open_source(location, architecture=model)
    return Experts(LegacySource(expert_subset(buffer, max_experts, max_files), path), method, path,
                   dict(buffer.training or {}), buffer.architecture, buffer.layers, buffer.nbytes)


def default_out_dir(config: DistillConfig, storage_options: dict | None = None) -> Path:
    """`<source name>-<method>-ipc<ipc>` in the working directory (also for a source at a URL)."""
    source = config.source.rstrip("/\\")
    stem = Path(source.rsplit("/", 1)[-1]).stem
    return Path(f"{stem}-{method_for(source, config.method, storage_options=storage_options)}-ipc{config.ipc}")


def _dataset_key(name: str) -> str:
    key = str(name).lower().replace("_", "").replace("-", "")
    return _DATASET_ALIASES.get(key, str(name))


@dataclass
class _Setup:
    experts: Experts
    dataset: Dataset
    model: str
    lr_teacher: float


def _setup(config: DistillConfig, storage_options: dict | None = None) -> _Setup:
    """Open the experts, settle what the metadata decides, load the data; refuse inconsistencies."""
    experts = open_experts(config.source, config.method, model=config.model, max_experts=config.max_experts,
                           max_files=config.max_files, storage_options=storage_options)
    training, arch = experts.training, experts.architecture or {}
    zca = bool(training.get("zca", False)) if config.zca is None else config.zca
    check_zca(training, zca, experts.path)
    recorded = training.get("dataset")
    if config.dataset and recorded and _dataset_key(config.dataset) != _dataset_key(recorded):
        raise TrajstoreError(f"the experts were trained on {recorded} but this run is set up for "
                             f"{config.dataset}{f' (preset {config.preset})' if config.preset else ''}", experts.path)
    dataset_name = config.dataset or recorded
    if not dataset_name:
        raise TrajstoreError("the experts do not record their dataset: pass --dataset", experts.path)
    im_size = config.im_size or training.get("im_size") or arch.get("im_size")
    channels = config.channels or training.get("channel") or arch.get("channel")
    model = config.model or arch.get("name") or "ConvNet"
    dataset = load_dataset(_dataset_key(dataset_name), data_path=config.data_path,
                           im_size=tuple(im_size) if im_size else None, channels=channels, zca=zca,
                           seed=int(training.get("split_seed", 0)))
    net_shapes = [tuple(p.shape) for p in _student_net(model, dataset).parameters()]
    expert_shapes = [tuple(layer.shape) for layer in experts.layers]
    if net_shapes != expert_shapes:
        raise TrajstoreError(f"{model} on {dataset.channel}x{dataset.im_size[0]}x{dataset.im_size[1]} images with "
                             f"{dataset.num_classes} classes has parameter shapes {net_shapes}, the experts "
                             f"{expert_shapes}: pass the experts' --model / image size", experts.path)
    lr_teacher = config.lr_teacher or float(training.get("lr") or DEFAULT_LR_TEACHER)
    return _Setup(experts, dataset, model, lr_teacher)


def _student_net(model: str, dataset: Dataset) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only; leaves torch's RNG alone
        return build(model, dataset.channel, dataset.num_classes, dataset.im_size)


def _initial_set(config: DistillConfig, setup: _Setup, rng: np.random.Generator, device) -> SyntheticSet:
    ds = setup.dataset
    if config.init == "real":
        return SyntheticSet.from_real(ds.train_images, ds.train_labels, config.ipc, setup.lr_teacher, rng=rng,
                                      num_classes=ds.num_classes, device=device, dtype=torch.float32)
    return SyntheticSet.from_noise((ds.channel, *ds.im_size), ds.num_classes, config.ipc, setup.lr_teacher,
                                   rng=rng, device=device)


def _check_windows(config: DistillConfig, source: TrajectorySource) -> None:
    """Draw one (start, target) pair of expert 0 with a throwaway generator (leaving the expert walk
    alone), so a window that does not fit the trajectories is refused before anything is written."""
    source.sample(np.random.default_rng(0), config.max_start_epoch, config.expert_epochs,
                  discrete=config.discrete, dtype=torch.float32, expert=0)


def _prepare_out_dir(out: Path, config: DistillConfig, *, resume: bool, overwrite: bool) -> bool:
    """Make `out` ready; True when a checkpoint there is to be resumed."""
    if out.exists() and not out.is_dir():
        raise ExistsError("exists and is not a directory", out)
    ours = (out / CONFIG).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise ExistsError("exists, is not empty and holds no distillation run (no config.json); "
                          "choose another output directory", out)
    if ours:
        finished = (out / RESULT).is_file()
        if overwrite:
            atomic.remove(out)
        elif finished:
            raise ExistsError("holds a finished distillation run; pass overwrite=True / --force to run again", out)
        elif not resume:
            raise ExistsError("holds an unfinished distillation run; resume it, or pass overwrite=True / "
                              "--force to start again", out)
        else:
            saved = json.loads((out / CONFIG).read_text())
            now = config.to_json()
            diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in now.items()
                     if k not in _RESUMABLE_CHANGES and saved.get(k) != v]
            if diffs:
                raise TrajstoreError("cannot resume a run made with other settings (" + "; ".join(diffs)
                                     + "); use the same settings, another output, or --force", out)
            return (out / CHECKPOINT).is_file()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / CONFIG, json.dumps(config.to_json(), indent=2).encode())
    return False


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic.write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(f"refused to load a checkpoint that needs more than plain data ({exc})", path) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise FormatError(f"cannot read checkpoint ({exc})", path) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise FormatError("not a distillation checkpoint of this trajstore version", path)
    return state


def _eval_result(record: dict) -> EvalResult:
    return EvalResult(record["mean"], record["std"], tuple(record["accuracies"]))


def plot_accuracy(runs: dict[str, list[dict]], png: str | os.PathLike, *, title: str = "",
                  baseline: EvalResult | None = None, overwrite: bool = True) -> Path:
    """Test accuracy (mean +- std band) over iterations, one line per run (label -> its eval records),
    and `baseline` (the random real subset) as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, records in runs.items():
        x = [r["iteration"] for r in records]
        mean = np.array([100 * r["mean"] for r in records])
        std = np.array([100 * r["std"] for r in records])
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=label or None)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if baseline is not None:
        ax.axhline(100 * baseline.mean, color="gray", ls="--", label=f"random real subset ({100 * baseline.mean:.1f}%)")
    ax.set(xlabel="distillation iteration", ylabel="test accuracy (%)", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, png, overwrite=overwrite)


def distill(config: DistillConfig, out_dir: str | os.PathLike, *, resume: bool = True, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], object] = print, logger: str | None = None,
            storage_options: dict | None = None) -> DistillResult:
    """Run (or resume) the distillation `config` describes, writing the folder described above.

    An unfinished run in `out_dir` is resumed when `resume` (same settings required); a finished one
    is replaced only with `overwrite`. `logger` ("tensorboard" or "wandb", see distill.loggers) also
    receives every metrics.jsonl record. In a process group (distill.distributed) every process runs
    this with the same settings: each student step's images are split over the processes, the
    evaluation networks too, and only rank 0 writes `out_dir`, logs and reports. `config.source` may
    be a URL (s3://bucket/experts.ctraj), reached with `storage_options` (kept out of config.json, as
    they may hold credentials); `out_dir` is a local folder.
    """
    began = time.perf_counter()
    loggers.require(logger)
    from trajstore.stores.location import locate

    out = locate(out_dir).local("a distillation run folder")
    group = distributed.current()
    main = group is None or group.is_main
    if group is not None:
        group.check_same("distillation", {**{k: v for k, v in config.to_json().items() if k != "data_path"},
                                          "out_dir": str(out), "resume": resume, "overwrite": overwrite})
    device = distributed.device_for(config.device)
    setup = _setup(config, storage_options)
    experts, ds = setup.experts, setup.dataset
    _check_windows(config, experts.source)
    on_main = group.on_main if group is not None else (lambda fn, *a, **k: fn(*a, **k))
    resuming = on_main(_prepare_out_dir, out, config, resume=resume, overwrite=overwrite)
    progress = progress and main

    def say(message: str) -> None:
        if main:
            with tqdm.external_write_mode():
                log(message)

    rng = np.random.default_rng(config.seed)
    synset = _initial_set(config, setup, rng, device)
    student = FunctionalNet(build(setup.model, ds.channel, ds.num_classes, ds.im_size))
    sharded = distributed.ShardedSteps(group) if group is not None and group.world_size > 1 else None
    matcher = Matcher(experts.source, synset, student, config.match_config(), rng=rng,
                      augment=functools.partial(dsa, strategy=config.dsa_strategy) if config.dsa else None,
                      parallel=sharded)
    meta = {"model": setup.model, "method": experts.method, "source": str(experts.path),
            "distill": config.to_json()}

    def save_set(name: str, images: torch.Tensor, lr: float, extra: dict) -> None:
        if not main:
            return
        save_synset(out / name, images, synset.labels, lr=lr, meta={**meta, **extra}, dataset=ds, overwrite=True)
        save_grid(out / name.replace("synset_", "grid_").replace(".safetensors", ".png"), images, synset.labels,
                  ds, overwrite=True)
        if name == BEST:  # upstream's plain-tensor files too, for scripts that read them
            save_upstream(out, images, synset.labels, lr, "best")

    evals: list[dict] = []
    best: dict | None = None
    elapsed = 0.0
    if resuming:
        state = on_main(_load_checkpoint, out / CHECKPOINT)  # a checkpoint resumes with any process count
        matcher.load_state_dict(state["matcher"])
        evals, best, elapsed = list(state["evals"]), state["best"], float(state["elapsed"])
        if main:
            with open(out / METRICS, "r+b") as f:  # drop records of iterations after the checkpoint
                f.truncate(int(state["metrics_bytes"]))
        say(f"{out}: resuming at iteration {matcher.iteration} of {config.iterations}")
    elif main:
        (out / METRICS).write_bytes(b"")
        save_grid(out / "grid_init.png", synset.images, synset.labels, ds, overwrite=True)
        say(f"{out}: {experts.method.upper()} on {experts.path} ({experts.source.num_experts} experts), "
            f"{ds.name} {ds.channel}x{ds.im_size[0]}x{ds.im_size[1]}, {setup.model}, ipc {config.ipc}, "
            f"{config.iterations} iterations on {device}"
            + (f" x {group.world_size} processes" if group is not None else ""))
    metrics = open(out / METRICS, "ab") if main else io.BytesIO()  # only rank 0 writes the run folder
    history = [json.loads(line) for line in (out / METRICS).read_text().splitlines()] if logger and main else []
    sink = loggers.open_logger(logger, out, config.to_json(), history) if main else None

    def checkpoint() -> None:
        if not main:
            return
        metrics.flush()
        _save_checkpoint(out / CHECKPOINT, {
            "version": CHECKPOINT_VERSION, "matcher": matcher.state_dict(), "evals": evals, "best": best,
            "metrics_bytes": metrics.tell(), "elapsed": elapsed + time.perf_counter() - began})

    def write(record: dict) -> None:
        metrics.write((json.dumps(record) + "\n").encode())
        if sink is not None:
            sink.log(record)

    def due(i: int) -> bool:
        return i == config.iterations or (config.eval_every > 0 and i % config.eval_every == 0)

    def evaluate(i: int) -> None:
        nonlocal best
        t0 = time.perf_counter()
        lr = synset.syn_lr.item()
        result = EvalResult.of(distributed.parallel_evaluation(group, config.eval_nets, lambda nets: evaluate_synset(
            synset.images, synset.labels, ds, lr=lr, num_nets=config.eval_nets, epochs=config.eval_epochs,
            model=setup.model, dsa=config.dsa, seed=config.seed, dsa_strategy=config.dsa_strategy, device=device,
            progress=False, nets=nets).accuracies))
        record = {"kind": "eval", "iteration": i, "mean": result.mean, "std": result.std,
                  "accuracies": list(result.accuracies), "syn_lr": lr, "seconds": time.perf_counter() - t0}
        write(record)
        evals.append(record)
        improved = best is None or result.mean > best["mean"]
        if improved:
            best = {**record, "images": synset.images.detach().cpu().clone()}
            save_set(BEST, best["images"], lr, {"iteration": i, "accuracy": record["mean"]})
        if main:
            plot_accuracy({"": evals}, out / ACCURACY_PNG, title=f"{experts.method.upper()}, {ds.name}, ipc {config.ipc}")
        say(f"iteration {i}: test accuracy {result}{' (best so far)' if improved else ''}")

    try:
        with tqdm(total=config.iterations, initial=matcher.iteration, desc=f"distill {experts.method}",
                  unit="it", disable=not progress) as bar:
            while True:
                i = matcher.iteration
                if due(i) and not (evals and evals[-1]["iteration"] == i):
                    evaluate(i)
                    checkpoint()
                if i >= config.iterations:
                    break
                step = matcher.step()
                if not step.syn_lr > 0:  # students would climb the loss; evaluation cannot use it either
                    raise TrajstoreError(f"the learned learning rate fell to {step.syn_lr:.3g} at iteration "
                                         f"{step.iteration}: lower lr_lr (now {config.lr_lr:g})", out)
                write({"kind": "step", **step.to_json()})
                bar.update()
                bar.set_postfix(loss=f"{step.loss:.4f}", syn_lr=f"{step.syn_lr:.4g}",
                                best=f"{100 * best['mean']:.1f}%" if best else "-")
                if matcher.iteration % config.checkpoint_every == 0 and not due(matcher.iteration):
                    checkpoint()
    finally:
        metrics.close()
        if sink is not None:
            sink.close()

    final_eval = evals[-1]
    save_set(FINAL, synset.images, final_eval["syn_lr"], {"iteration": config.iterations,
                                                          "accuracy": final_eval["mean"]})
    result = DistillResult(out, experts.method, config.iterations, _eval_result(final_eval), _eval_result(best),
                           best["iteration"], final_eval["syn_lr"], elapsed + time.perf_counter() - began, tuple(evals))
    if main:
        atomic.write_bytes(out / RESULT, json.dumps(result.to_json(), indent=2).encode())
    say(f"{out}: final {result.final}; best {result.best} at iteration {result.best_iteration}")
    return result
