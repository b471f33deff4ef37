"""`trajstore quickstart`: the whole story on the embedded digits data, in minutes on a laptop CPU.

It trains a few experts once, writing both a .ctraj and the legacy MTT buffer of the same runs,
reports what each takes on disk, distills ipc 1 with MCT (from the .ctraj) and with classic MTT (from
the legacy buffer) under the same seed and budget, and compares both with the random real subset of
the same size, all evaluated with the same protocol.

Output folder (default ./trajstore-quickstart):

    quickstart.json            the scale's settings; a rerun resumes only with the same ones
    experts.ctraj/             the experts, convexified (anchors at epochs 0, 6, 25, 50 at full scale)
    legacy/replay_buffer_0.pt  the same runs as an MTT buffer (every epoch)
    experts.png                the experts' test accuracy per epoch
    mct/, mtt/                 the two distillation runs (layout: distill.run)
    random.safetensors, grid_random.png   the random real subset
    accuracy.png               both runs' test accuracy over iterations against the random subset
    table.json, table.md       the comparison; table.json is written last and marks a finished run

An interrupted quickstart, started again, continues where it stopped (experts and runs resume).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

import trajstore
from trajstore.stores import atomic
from trajstore.errors import ExistsError, TrajstoreError
from trajstore.legacy import open_buffer
from trajstore.tools.threads import single_threaded

from .data import load_dataset
from .evaluate import BASELINE_LR, EvalResult, evaluate_file, evaluate_synset, random_subset
from .experts import plot_accuracy as plot_expert_accuracy
from .experts import train_experts
from .run import RESULT, DistillConfig, DistillResult, distill, load_result, plot_accuracy
from .synset import save_grid, save_synset
from .train import resolve_device

DEFAULT_OUT = "trajstore-quickstart"
MARKER = "quickstart.json"
TABLE = "table.json"


@dataclass(frozen=True)
class Scale:
    """How big the quickstart is. Both methods share every setting, M and lr_lr included, so that a
    difference between them comes from the trajectories they match and not from their settings."""

    im_size: int
    model: str
    num_experts: int
    epochs: int
    batch_size: int
    waypoints: tuple[int, ...]
    syn_steps: int
    max_start_epoch: int
    expert_epochs: int
    lr_img: float
    lr_lr: float
    iterations: int
    eval_every: int
    eval_nets: int
    eval_epochs: int


SCALES = {
    # Chosen by measurement on a shared 2-core CPU (see the project notes): digits at their native 8x8,
    # a 32-wide ConvNet, 4 experts of 50 epochs with MCT's CIFAR-10 waypoints (6, 25), which puts the
    # .ctraj at ~8% of the legacy buffer as in the paper. Batch 64 instead of 256 because digits has only
    # 1,437 training images (6 steps an epoch at 256). ipc 1 rows of the papers: lr_img 1e3, lr_lr 1e-7;
    # M = 6 for both methods: measured on these experts with every other setting shared (RESULTS §6),
    # M = 6 gave both methods their better curve (MTT 78% and MCT 80% at 80 iterations, against 68% and
    # 48% at M = 2). 200 iterations of N = 20.
    "full": Scale(im_size=8, model="ConvNetW32", num_experts=4, epochs=50, batch_size=64, waypoints=(6, 25),
                  syn_steps=20, max_start_epoch=10, expert_epochs=6, lr_img=1e3,
                  lr_lr=1e-7, iterations=200, eval_every=50, eval_nets=5, eval_epochs=300),
    # The same code path in seconds, for the test suite; its accuracies mean nothing.
    "smoke": Scale(im_size=8, model="ConvNetW8", num_experts=2, epochs=4, batch_size=256, waypoints=(1,),
                   syn_steps=2, max_start_epoch=2, expert_epochs=1, lr_img=1e3,
                   lr_lr=1e-7, iterations=2, eval_every=1, eval_nets=2, eval_epochs=2),
}
EXPERT_LR = 0.01  # the family's expert learning rate (docs/legacy-formats.md §6)
# The one other architecture of the final table (distill.crossarch has the full table): on 1x8x8 sets
# ResNet18 and VGG11 cannot run as upstream defines them, and AlexNet and ResNet18_AP cost 30-100x the
# ConvNet's evaluation time on a 2-core CPU; the MLP adds seconds.
CROSS_MODEL = "MLP"


@dataclass(frozen=True)
class Row:
    """One line of the comparison table."""

    method: str
    source: str
    storage_bytes: int
    images: int
    accuracy: EvalResult
    best: EvalResult | None = None
    best_iteration: int | None = None
    lr: float | None = None
    cross: EvalResult | None = None  # the final set on CROSS_MODEL

    def to_json(self) -> dict:
        d = asdict(self)
        d["accuracy"] = asdict(self.accuracy)
        d["best"] = asdict(self.best) if self.best else None
        d["cross"] = asdict(self.cross) if self.cross else None
        return d


@dataclass(frozen=True)
class QuickstartResult:
    out_dir: Path
    rows: tuple[Row, ...]
    ctraj_bytes: int
    legacy_bytes: int
    seconds: float

    @property
    def storage_ratio(self) -> float:
        """.ctraj bytes over legacy-buffer bytes."""
        return self.ctraj_bytes / self.legacy_bytes

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def markdown(self) -> str:
        lines = ["| method | experts read from | expert storage | test accuracy (final set) | best during run "
                 f"| final set on {CROSS_MODEL} |", "|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            storage = f"{r.storage_bytes / 1e6:.2f} MB" if r.storage_bytes else "-"
            best = f"{_pct(r.best)} (it. {r.best_iteration})" if r.best else "-"
            cross = _pct(r.cross) if r.cross else "-"
            lines.append(f"| {r.method} | {r.source} | {storage} | {_pct(r.accuracy)} | {best} | {cross} |")
        return "\n".join(lines)


def _pct(result: EvalResult) -> str:
    return f"{100 * result.mean:.2f} +- {100 * result.std:.2f} %"


def _prepare(out: Path, settings: dict, force: bool) -> None:
    marker = out / MARKER
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not marker.is_file()):
            raise ExistsError("exists and is not a quickstart folder; choose another --out", out)
        if marker.is_file():
            if force:
                atomic.remove(out)
            elif (out / TABLE).is_file():
                raise ExistsError("holds a finished quickstart; pass --force to run it again", out)
            elif json.loads(marker.read_text()) != json.loads(json.dumps(settings)):  # tuples come back as lists
                raise TrajstoreError("holds an unfinished quickstart of other settings; pass --force to "
                                     "start again", out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic.write_bytes(marker, json.dumps(settings, indent=2).encode())


def run_quickstart(out_dir: str | os.PathLike | None = None, *, scale: str = "full", seed: int = 0,
                   device: str | None = None, force: bool = False, progress: bool = True,
                   log: Callable[[str], object] = print) -> QuickstartResult:
    """Experts, storage ratio, MCT and MTT distillation at ipc 1, and the random baseline, on digits."""
    if scale not in SCALES:
        raise TrajstoreError(f"scale={scale!r}: expected one of {', '.join(SCALES)}")
    began = time.perf_counter()
    s = SCALES[scale]
    out = Path(out_dir if out_dir is not None else DEFAULT_OUT)
    dev = resolve_device(device)
    _prepare(out, {"scale": scale, "seed": seed, **asdict(s)}, force)

    def say(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    # One CPU thread: for networks this small, splitting each operation over cores costs more than it
    # gains (measured ~8x slower with 2 threads on a busy 2-core machine).
    with single_threaded() if dev.type == "cpu" else contextlib.nullcontext():
        say(f"trajstore quickstart ({scale}) -> {out}")
        ds = load_dataset("digits", im_size=(s.im_size, s.im_size), channels=1)
        ctraj, legacy = out / "experts.ctraj", out / "legacy"
        say(f"1/4 training {s.num_experts} experts ({s.model}, {s.epochs} epochs) into {ctraj} and {legacy}/")
        train_experts(ctraj, dataset=ds, model=s.model, num_experts=s.num_experts, epochs=s.epochs, lr=EXPERT_LR,
                      batch_size=s.batch_size, waypoints=s.waypoints, legacy_dir=legacy, seed=seed, device=dev,
                      progress=progress, log=lambda _: None)
        plot_expert_accuracy(ctraj, out / "experts.png", overwrite=True)
        ctraj_bytes, legacy_bytes = trajstore.open(ctraj).nbytes, open_buffer(legacy, architecture=s.model).nbytes
        say(f"storage: .ctraj {ctraj_bytes:,} bytes, legacy MTT buffer {legacy_bytes:,} bytes: the .ctraj takes "
            f"{100 * ctraj_bytes / legacy_bytes:.1f}% ({legacy_bytes / ctraj_bytes:.1f}x smaller)")

        common = dict(dataset="digits", model=s.model, ipc=1, syn_steps=s.syn_steps, max_start_epoch=s.max_start_epoch,
                      expert_epochs=s.expert_epochs, lr_img=s.lr_img, lr_lr=s.lr_lr, lr_teacher=EXPERT_LR,
                      iterations=s.iterations,
                      eval_every=s.eval_every, eval_nets=s.eval_nets, eval_epochs=s.eval_epochs, seed=seed,
                      device=device)
        runs: dict[str, DistillResult] = {}
        for step, method, source in ((2, "mct", ctraj), (3, "mtt", legacy)):
            say(f"{step}/4 distilling ipc 1 with {method.upper()} from {source} (M={s.expert_epochs})")
            config = DistillConfig(source=str(source), method=method, **common)
            finished = (out / method / RESULT).is_file()  # by this quickstart's settings: see _prepare
            runs[method] = (load_result(out / method) if finished
                            else distill(config, out / method, progress=progress, log=lambda _: None))
            say(f"    {method.upper()}: {runs[method].final}")

        say("4/4 evaluating the random real subset of the same size")
        images, labels = random_subset(ds, 1, seed)
        baseline = evaluate_synset(images, labels, ds, lr=BASELINE_LR, num_nets=s.eval_nets, epochs=s.eval_epochs,
                                   model=s.model, seed=seed, device=dev, progress=False)
        save_synset(out / "random.safetensors", images, labels, lr=BASELINE_LR, dataset=ds, overwrite=True,
                    meta={"model": s.model, "method": "random real subset", "seed": seed})
        save_grid(out / "grid_random.png", images, labels, ds, overwrite=True)
        say(f"    the three sets on {CROSS_MODEL} (cross-architecture)")
        on_cross = dict(num_nets=s.eval_nets, epochs=s.eval_epochs, model=CROSS_MODEL, seed=seed, device=dev,
                        progress=False)
        cross = {m: evaluate_file(runs[m].final_path, **on_cross) for m in runs}
        cross["random"] = evaluate_synset(images, labels, ds, lr=BASELINE_LR, **on_cross)

    rows = tuple(Row(method.upper(), str(src.relative_to(out)) + ("" if method == "mct" else "/"), nbytes,
                     len(labels), runs[method].final, runs[method].best, runs[method].best_iteration,
                     runs[method].syn_lr, cross[method])
                 for method, src, nbytes in (("mct", ctraj, ctraj_bytes), ("mtt", legacy, legacy_bytes)))
    rows += (Row("random real subset", "-", 0, len(labels), baseline, lr=BASELINE_LR, cross=cross["random"]),)
    plot_accuracy({m.upper(): list(r.evals) for m, r in runs.items()}, out / "accuracy.png",
                  title=f"digits, ipc 1: MCT vs MTT ({scale})", baseline=baseline)
    result = QuickstartResult(out, rows, ctraj_bytes, legacy_bytes, time.perf_counter() - began)
    table = result.markdown()
    atomic.write_bytes(out / "table.md", (table + "\n").encode())
    atomic.write_bytes(out / TABLE, json.dumps({
        "rows": [r.to_json() for r in rows], "ctraj_bytes": ctraj_bytes, "legacy_bytes": legacy_bytes,
        "storage_ratio": result.storage_ratio, "seconds": result.seconds, "scale": scale,
        "settings": asdict(s), "seed": seed}, indent=2).encode())
    say(table)
    for r in rows[:2]:
        margin = 100 * (r.accuracy.mean - baseline.mean)
        say(f"{r.method} beats the random real subset by {margin:.2f} points" if margin > 0 else
            f"{r.method} does NOT beat the random real subset ({margin:+.2f} points)")
    say(f"done in {result.seconds:.0f} s; everything is in {out}/")
    return result
