"""Shared plumbing for the benchmark scripts: timing, machine description, JSON results."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> dict:
    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def timeit(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 2, sync: bool = False) -> dict:
    """Median and spread of wall time in seconds (CUDA-synchronised when sync)."""
    return timeit_interleaved({"fn": fn}, repeat=repeat, warmup=warmup, sync=sync)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], object]], *, repeat: int = 20, warmup: int = 2,
                       sync: bool = False, rotate: bool = False) -> dict[str, dict]:
    """timeit for several functions, taking turns within every round, so load from other jobs on a
    shared machine falls on all of them alike and their ratios stay fair. With rotate, each round starts
    one function later, so that no function always runs first (or always after the same one)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeat):
        k = r % len(order) if rotate else 0
        for name, fn in order[k:] + order[:k]:
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeat": repeat}
            for name, t in times.items()}


@contextlib.contextmanager
def as_modules(enabled: bool = True):
    """Training and test passes run every network as its nn.Module (`train.forward_of` as the identity):
    the code before the default ConvNet's fast CPU step (benchmarks/RESULTS.md §8 "faster step"), and what
    torch's FlopCounterMode can count (its formula for `_slow_conv2d_forward`, the fast step's first
    convolution, fails in torch 2.14; the arithmetic is the same). enabled=False: as training runs now."""
    from unittest import mock

    from trajstore.distill import train

    with mock.patch.object(train, "forward_of", lambda net: net) if enabled else contextlib.nullcontext():
        yield


def add_modules_option(parser) -> None:
    """--modules: the benchmark runs the code before the fast CPU step (`as_modules`), for old-against-new runs."""
    parser.add_argument("--modules", action="store_true",
                        help="run networks as their nn.Modules: the code before the fast CPU training step")


def add_device_option(parser) -> None:
    """--device: where a benchmark runs ("cpu" or "cuda"; the GPU check passes cuda)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
    return device


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    On Linux VmHWM is this process's own; ru_maxrss would carry over the parent's peak across fork.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(path: str | os.PathLike, name: str, params: dict, results: dict) -> Path:
    doc = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
           "params": params, "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path


def distill_or_reuse(config, run_dir: Path):
    """The finished run in run_dir if it was made with exactly `config` (a benchmark interrupted after some
    runs picks up where it stopped), else a fresh run there."""
    from trajstore.distill.run import CONFIG, RESULT, distill, load_result

    same = json.loads(json.dumps(config.to_json()))  # as config.json holds it (tuples become lists)
    if (run_dir / RESULT).is_file() and json.loads((run_dir / CONFIG).read_text()) == same:
        return load_result(run_dir)
    return distill(config, run_dir, overwrite=True, progress=False, log=lambda _: None)
