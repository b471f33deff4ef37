"""Trajectories made in the tests: random walks with per-layer drift, like SGD but cheap."""

from __future__ import annotations

import torch

SMALL_LAYERS = [("conv.weight", (8, 3, 3, 3)), ("conv.bias", (8,)), ("fc.weight", (4, 32)), ("fc.bias", (4,))]


def random_walk(layers=SMALL_LAYERS, num_timesteps: int = 11, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g, dtype=torch.float64) for _, shape in layers]
    drift = [torch.randn(shape, generator=g, dtype=torch.float64) * 0.05 for _, shape in layers]
    traj = []
    for _ in range(num_timesteps):
        traj.append([p.to(dtype) for p in params])
        params = [p + d + 0.02 * torch.randn(p.shape, generator=g, dtype=torch.float64)
                  for p, d in zip(params, drift)]
    return traj


def write_store(path, trajs, layers=SMALL_LAYERS, **kwargs):
    import trajstore

    with trajstore.create(path, layers, len(trajs[0]), **kwargs) as w:
        for traj in trajs:
            w.write_expert(traj)
    return path


def run_until_killed(code: str) -> None:
    """Run `code` in a fresh interpreter (tests/ on its path) and expect it to die of SIGKILL, which the
    code sends itself at a chosen point: no finally block, context manager or atexit hook runs, as in
    a real crash or an OOM kill."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import torch

    tests = Path(__file__).resolve().parent
    # the same intra-op thread count as this process: reductions, and so the last bits, depend on it
    prelude = (f"import os, signal, sys\nsys.path.insert(0, {str(tests)!r})\n"
               f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n")
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=tests.parent, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# Code for run_until_killed: the process dies when a local replace swaps a finished tree for the old one
# (trajstore.stores.atomic.publish_dir): between the two renames of a replace done by renames, or once
# the swap is done, before the old tree is removed.
KILL_AT_LOCAL_SWAP = """
from trajstore.stores import atomic
_publish, _rename, _renames = atomic.publish_dir, os.rename, []
def _rename_or_die(a, b):
    _renames.append(1)
    if len(_renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    _rename(a, b)
def _publish_dir(*args, **kwargs):
    os.rename, atomic.remove = _rename_or_die, lambda path: os.kill(os.getpid(), signal.SIGKILL)
    _publish(*args, **kwargs)
atomic.publish_dir = _publish_dir
"""
