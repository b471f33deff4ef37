"""Conversion: throughput and peak memory of `convert` against `torch.load` of the same files alone.

Each measurement runs in a fresh process so its peak RSS is its own.

    python -m benchmarks.bench_convert [--experts 20] [--width 128] [--out benchmarks/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.synthetic import convnet_layers, write_pair

PROBE = """
import json, sys, time, torch
from benchmarks.common import peak_rss_bytes
what, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = peak_rss_bytes()
t0 = time.perf_counter()
if what == "torch_load":
    for f in sorted(__import__("pathlib").Path(src).glob("replay_buffer_*.pt")):
        buffer = torch.load(f, weights_only=True)
        del buffer
else:
    from trajstore.tools.convert import convert
    convert(src, out, waypoints=(6, 25), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
                  "rss_before_bytes": base}))
"""


def probe(what: str, src: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, what, str(src), str(out)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=20)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--out", default="benchmarks/results/convert.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, _ = write_pair(tmp / "buffer", convnet_layers(width=args.width), experts=args.experts,
                              num_timesteps=args.timesteps)
        source_bytes = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        load = probe("torch_load", tmp / "buffer", tmp / "unused")
        conv = probe("convert", tmp / "buffer", tmp / "out.ctraj")
    results = {
        "source_bytes": source_bytes, "largest_file_bytes": largest,
        "torch_load": load, "convert": conv,
        "convert_mb_per_s": source_bytes / conv["seconds"] / 1e6,
        "torch_load_mb_per_s": source_bytes / load["seconds"] / 1e6,
        "time_ratio_convert_over_load": conv["seconds"] / load["seconds"],
        "peak_rss_ratio_convert_over_load": conv["peak_rss_bytes"] / load["peak_rss_bytes"],
        # what each adds above the interpreter with torch imported:
        "convert_added_peak_bytes": conv["peak_rss_bytes"] - conv["rss_before_bytes"],
        "torch_load_added_peak_bytes": load["peak_rss_bytes"] - load["rss_before_bytes"],
    }
    return write_result(args.out, "convert", vars(args), results)


if __name__ == "__main__":
    main()
