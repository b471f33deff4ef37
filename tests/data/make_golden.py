"""Make the .ctraj conformance vectors in tests/data/golden/ (run once; the files are committed).

    python tests/data/make_golden.py [--force]

For each layer dtype (F32, F16, BF16) it writes a small directory-form store with trajstore's writer
(the stores are format version 1 and must stay readable) and, beside it, the expected results
computed from the raw trajectories with numpy alone, following docs/format.md §5 and §7: step norms
and betas from the trajectory itself (not from the store), then theta(c) from the trajectory's anchor
timesteps with the spec's lerp (tests/spec_reader.py). trajstore computes none of the expected values.

Each store has two experts with the non-contiguous ids 3 and 10, K = 8, anchors (0, 3, 8), and a layer
that does not move in the first piece (the S = 0 rule of §5).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
sys.path.insert(0, str(HERE.parent))
from spec_reader import CARRY, lerp, rnd, to_bits, trajectory_betas, weights  # noqa: E402

DTYPES = ("F32", "F16", "BF16")
ALSO_AS = {"F32": "F16", "F16": "F32", "BF16": "F32"}  # a requested dtype beside the stored one
LAYERS = [("conv.weight", (8, 3, 3, 3)), ("conv.bias", (8,)), ("fc.weight", (4, 32)), ("fc.bias", (4,)),
          ("frozen", (6,))]
IDS = (3, 10)
NUM_TIMESTEPS = 9
ANCHORS = (0, 3, 8)
POINTS = (0.0, 0.25, 1.0, 1.5, 2.75, 2.999, 3.0, 3.5, 4.1, 5.0, 6.6, 7.5, 7.999999, 8.0)


def trajectory(dtype: str, seed: int) -> list[list[np.ndarray]]:
    """K+1 timesteps of per-layer arrays holding exact values of `dtype` (carried as CARRY[dtype]):
    a random walk with drift, magnitudes spread over a few binades so rounding is exercised."""
    g = np.random.default_rng(seed)
    params = [g.standard_normal(s) * 2.0 ** g.integers(-6, 3, s) for _, s in LAYERS]
    drift = [0.05 * g.standard_normal(s) for _, s in LAYERS]
    out = []
    for t in range(NUM_TIMESTEPS):
        out.append([rnd(p.astype(np.float32), dtype) for p in params])
        params = [p + d + 0.02 * g.standard_normal(p.shape) if (name != "frozen" or t >= ANCHORS[1]) else p
                  for (name, _), p, d in zip(LAYERS, params, drift)]
    return out


def expected(traj, beta, as_dtype: str) -> np.ndarray:
    """(len(POINTS), num_params) bit patterns of the flat theta(c) in as_dtype."""
    rows = []
    for c in POINTS:
        j, w = weights(beta, list(ANCHORS), c)
        A, B = traj[ANCHORS[j]], traj[ANCHORS[j + 1]]
        rows.append(np.concatenate([to_bits(lerp(rnd(x, as_dtype), rnd(y, as_dtype), float(wl), as_dtype),
                                            as_dtype).reshape(-1) for x, y, wl in zip(A, B, w)]))
    return np.stack(rows)


def write_store(path: Path, dtype: str, trajs) -> None:
    import torch

    import trajstore
    from trajstore.format.layers import DTYPES as TORCH_DTYPES

    tdtype = TORCH_DTYPES[dtype]
    with trajstore.create(path, [(n, s, tdtype) for n, s in LAYERS], NUM_TIMESTEPS, anchor_epochs=ANCHORS,
                          provenance={"command": "python tests/data/make_golden.py"}) as w:
        for expert_id, traj in zip(IDS, trajs):
            w.write_expert([[torch.from_numpy(np.ascontiguousarray(x)).to(tdtype) for x in step] for step in traj],
                           index=expert_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace existing vectors")
    args = parser.parse_args()
    GOLDEN.mkdir(exist_ok=True)
    for dtype in DTYPES:
        store = GOLDEN / f"{dtype.lower()}.ctraj"
        if store.exists():
            if not args.force:
                sys.exit(f"{store} exists; pass --force to regenerate (and say why in the commit)")
            shutil.rmtree(store)
        trajs = [trajectory(dtype, seed) for seed in IDS]
        write_store(store, dtype, trajs)
        arrays = {"points": np.array(POINTS), "ids": np.array(IDS)}
        for p, traj in enumerate(trajs):
            beta = trajectory_betas(traj, ANCHORS)
            arrays[f"beta_{p}"] = beta
            for as_dtype in (dtype, ALSO_AS[dtype]):
                arrays[f"theta_{p}_{as_dtype}"] = expected(traj, beta, as_dtype)
        np.savez_compressed(GOLDEN / f"{dtype.lower()}.expected.npz", **arrays)
        print(f"wrote {store} and its expected values ({CARRY[dtype].__name__} carry)")


if __name__ == "__main__":
    main()
