"""Interpolation: `Expert.at(c, flat=True)` against a plain copy of the same bytes (the bandwidth floor).

    python -m benchmarks.bench_interpolation [--width 128] [--out benchmarks/results/interpolation.json]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

import trajstore
from benchmarks.common import timeit, write_result
from benchmarks.synthetic import convnet_layers, write_pair


def measure(expert, num_params: int, device: str, repeat: int) -> dict:
    sync = device.startswith("cuda")
    rng = random.Random(0)
    expert.at(1.5, flat=True, device=device)  # first touch: anchors mapped / copied to the device
    at = timeit(lambda: expert.at(rng.uniform(0, expert.num_timesteps - 1), flat=True, device=device),
                repeat=repeat, sync=sync)
    buf = torch.empty(num_params, device=device)
    at_out = timeit(lambda: expert.at(rng.uniform(0, expert.num_timesteps - 1), flat=True, device=device, out=buf),
                    repeat=repeat, sync=sync)
    src = torch.randn(num_params, device=device)
    dst = torch.empty_like(src)
    copy = timeit(lambda: dst.copy_(src), repeat=repeat, sync=sync)
    return {"at_flat": at, "at_flat_into_out": at_out, "copy_same_bytes": copy,
            "ratio_at_over_copy": at["median_s"] / copy["median_s"],
            "ratio_at_out_over_copy": at_out["median_s"] / copy["median_s"],
            "bytes": num_params * 4}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 gives stable timings on a shared machine")
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/interpolation.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = convnet_layers(width=args.width)
    with tempfile.TemporaryDirectory() as tmp:
        _, path = write_pair(Path(tmp), layers, experts=1, num_timesteps=args.timesteps, waypoints=())
        r = trajstore.open(path)
        results = {"cpu": measure(r.expert(0), r.num_params, "cpu", args.repeat)}
        if torch.cuda.is_available():
            results["cuda"] = measure(r.expert(0), r.num_params, "cuda", args.repeat)
    return write_result(args.out, "interpolation", vars(args) | {"num_params": r.num_params}, results)


if __name__ == "__main__":
    main()
