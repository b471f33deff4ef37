"""Interpolation: `Expert.at(c, flat=True)` against a plain copy of the same bytes (the bandwidth floor).

    python -m benchmarks.bench_interpolation [--width 128] [--device cpu|cuda] [--out benchmarks/results/interpolation.json]
    git show REV:trajstore/format/reader.py > /tmp/reader_before.py     # then, to time that reader too:
    python -m benchmarks.bench_interpolation --before /tmp/reader_before.py

The operations take turns within every round (interleaved), so the ratios are fair on a shared machine. Each
form of `at` is timed after a whole-vector pass over other vectors, and ("_warm") right after another `at`,
which finds the interpreter's path through it warm and costs markedly less (see `measure`).
A point reads two anchors and writes one vector: 1.5x the bytes of the copy. The floors timed beside it,
over the whole vector with no per-layer work: one torch.lerp (a fused multiply-add, one rounding: not the
spec's arithmetic), the spec's lerp as three torch kernels (sub, mul, add), and the two numpy passes that
`at` makes over a cached y - x (multiply, then add: the least work that rounds twice with numpy or torch).
Every operation has vectors of its own: none finds its inputs in cache because the one before used them.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

import trajstore
import trajstore.format.beta
from benchmarks.common import add_device_option, check_device, timeit_interleaved, write_result
from benchmarks.synthetic import convnet_layers, write_pair


def spec_point(expert, c: float) -> torch.Tensor:
    """docs/format.md §7's two-rounding lerp written out in numpy float32 (d = y - x; x + w*d below 0.5,
    else y - (1 - w)*d), independently of trajstore's lerp."""
    piece, ws = trajstore.format.beta.piece_weights(expert.beta, expert.anchor_epochs, c)
    anchors = [expert.anchor(expert.anchor_epochs[piece + k]) for k in (0, 1)]
    parts = []
    for n, w in zip(anchors[0], ws):
        x, y = anchors[0][n].numpy().reshape(-1), anchors[1][n].numpy().reshape(-1)
        d = y - x
        parts.append(x + np.float32(w) * d if w < 0.5 else y - np.float32(1.0 - w) * d)
    return torch.from_numpy(np.concatenate(parts))


def reader_from(path: str):
    """Another version of trajstore/format/reader.py (e.g. an older commit's), loaded beside this one so
    that both are timed in the same run; it uses this checkout's other modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trajstore.format._reader_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(store, device: str, repeat: int, before=None) -> dict:
    rng = random.Random(0)
    # each form of `at` reads an expert of its own, so that none finds its anchors warm from another:
    # a new vector and into `out`, each once after a whole-vector pass and once right after another `at`
    fresh, into, fresh_warm, into_warm = experts = [store.expert(i) for i in range(4)]
    for expert in experts:
        expert.at(1.5, flat=True, device=device)  # first touch: anchors read, copied, y - x cached
    last, num_params = fresh.num_timesteps - 1, store.num_params
    buf, buf_warm = torch.empty(num_params, device=device), torch.empty(num_params, device=device)

    def vectors(n):  # each operation its own vectors, so none finds its inputs warm from the one before
        return [torch.randn(num_params, device=device) for _ in range(n)]

    (src, dst, cx), (lx, ly, lo), (sx, sy, so), (nx, ny, no) = vectors(3), vectors(3), vectors(3), vectors(3)
    nd = ny - nx
    ops = {}
    if before is not None:  # the other reader, on experts of its own
        old_fresh, old_into = before.expert(4), before.expert(5)
        old_buf = torch.empty(num_params, device=device)
        for expert in (old_fresh, old_into):
            expert.at(1.5, flat=True, device=device)
        ops = {"before_at_flat": lambda: old_fresh.at(rng.uniform(0, last), flat=True, device=device),
               "before_at_flat_into_out": lambda: old_into.at(rng.uniform(0, last), flat=True, device=device,
                                                              out=old_buf)}
    factor = np.array(0.3, dtype=np.float32)  # a 0-d factor, as at() passes its layers' factors
    ops |= {
        "at_flat": lambda: fresh.at(rng.uniform(0, last), flat=True, device=device),
        "at_flat_into_out": lambda: into.at(rng.uniform(0, last), flat=True, device=device, out=buf),
        "at_flat_warm": lambda: fresh_warm.at(rng.uniform(0, last), flat=True, device=device),
        "at_flat_into_out_warm": lambda: into_warm.at(rng.uniform(0, last), flat=True, device=device, out=buf_warm),
        "lerp_one_call": lambda: torch.lerp(lx, ly, 0.3, out=lo),
        # the spec's lerp over the whole vector: three kernels (sub, mul, add), no per-layer work
        "spec_lerp_one_call": lambda: torch.sub(sy, sx, out=so).mul_(0.3).add_(sx),
        # what at() does on the CPU over a cached difference nd = y - x: a multiply, then an add
        "spec_lerp_two_passes": lambda: torch.mul(nd, 0.3, out=no).add_(nx) if device.startswith("cuda")
        else np.add(np.multiply(nd.numpy(), factor, no.numpy()), nx.numpy(), no.numpy()),
        "copy_same_bytes": lambda: dst.copy_(src),
        # a copy into a new vector, as at() without out= returns one
        "clone_same_bytes": lambda: cx.clone(),
    }
    # The order of a round (rotated round by round, so each keeps its neighbours). A call of `at` right after
    # another finds the interpreter's path through it (code, objects, branch history) warm, and measured
    # 0.4-0.9x a copy cheaper than after a torch or numpy pass over other vectors (RESULTS §4); so each
    # form is timed in both places: after a whole-vector pass (what a training step leaves behind), and
    # "_warm" right after another `at` (the second point of window(), a matching iteration's start and target).
    order = ["before_at_flat", "lerp_one_call", "at_flat", "at_flat_warm", "spec_lerp_one_call",
             "before_at_flat_into_out", "spec_lerp_two_passes", "at_flat_into_out", "at_flat_into_out_warm",
             "copy_same_bytes", "clone_same_bytes"]
    t = timeit_interleaved({name: ops[name] for name in order if name in ops}, repeat=repeat,
                           sync=device.startswith("cuda"), rotate=True)
    c = 0.37 * last
    identical = all(torch.equal(e.at(c, flat=True, device=device).cpu(), spec_point(e, c)) for e in experts)
    copy = t["copy_same_bytes"]["median_s"]
    ratios = {f"ratio_{name}_over_copy": t[key]["median_s"] / copy for name, key in (
        ("at", "at_flat"), ("at_out", "at_flat_into_out"), ("at_warm", "at_flat_warm"),
        ("at_out_warm", "at_flat_into_out_warm"), ("lerp_one_call", "lerp_one_call"),
        ("spec_lerp_one_call", "spec_lerp_one_call"), ("spec_lerp_two_passes", "spec_lerp_two_passes"),
        ("clone", "clone_same_bytes"))}
    ratios["ratio_at_over_clone"] = t["at_flat"]["median_s"] / t["clone_same_bytes"]["median_s"]
    for name in ("before_at_flat", "before_at_flat_into_out"):
        if name in t:
            ratios[f"ratio_{name}_over_copy"] = t[name]["median_s"] / copy
    return {**t, **ratios, "bit_identical_to_spec_lerp": identical, "bytes": num_params * 4,
            "bytes_cached_per_piece": store._cached // len(experts)}  # two anchors and their difference


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 gives stable timings on a shared machine")
    p.add_argument("--repeat", type=int, default=200)
    add_device_option(p)
    p.add_argument("--out", default="benchmarks/results/interpolation.json")
    p.add_argument("--before", help="another reader.py (e.g. `git show REV:trajstore/format/reader.py`) to time "
                                    "in the same run")
    args = p.parse_args(argv)
    device = check_device(args.device)
    torch.set_num_threads(args.threads)
    layers = convnet_layers(width=args.width)
    with tempfile.TemporaryDirectory() as tmp:
        _, path = write_pair(Path(tmp), layers, experts=6 if args.before else 4, num_timesteps=args.timesteps,
                             waypoints=())
        r = trajstore.open(path)
        before = reader_from(args.before).open(path) if args.before else None
        results = {device.split(":")[0]: measure(r, device, args.repeat, before)}
    return write_result(args.out, "interpolation", vars(args) | {"num_params": r.num_params}, results)


if __name__ == "__main__":
    main()
