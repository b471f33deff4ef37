"""Remote reading: bytes and requests for `open` + 100 random (start, target) pairs from a 10-expert
.ctraj on an S3 API, against the store's size and against what MTT's loader transfers.

A real S3 server (moto's, on 127.0.0.1) runs behind a WSGI layer that records every request (method,
key, response body bytes), so the numbers are what crossed the wire, whatever s3fs did underneath.
The store is written straight to the bucket by `trajstore.create` (stand-in trajectories streamed one
expert at a time), so the benchmark holds one trajectory and the bucket (in moto's memory) holds the
store only. MTT's loader reads a whole `replay_buffer_{n}.pt` (`torch.load`, as upstream distill.py
does); its bytes are `trajstore.tools.inspect.mtt_nbytes` (exact to the byte, tests/test_legacy.py),
or, with --measure-mtt, the file is uploaded and read through s3fs (needs the file in moto's memory:
654 MB at width 128).

From the request log the benchmark also checks what the reader must do: each pair reads only the
anchors of the pieces holding its start and target (recomputed here from docs/format.md §7) plus the
expert's manifest and `beta` files once, no anchor twice, nothing listed; a bounded disk cache
(`disk_cache_bytes`) evicts and fetches again; a damaged cache entry is caught by its sha256 and
fetched again.

    python -m benchmarks.bench_remote [--experts 10] [--width 128] [--timesteps 51] [--pairs 100]
        [--measure-mtt] [--out benchmarks/results/remote.json]
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import socket
import tempfile
import threading
import time
from collections import Counter as Tally
from pathlib import Path

import torch

import trajstore
from benchmarks.common import write_result
from benchmarks.synthetic import convnet_layers, random_walk
from trajstore.tools.inspect import mtt_nbytes

BUCKET, STORE = "bench", "experts.ctraj"


class Recorder:
    """WSGI middleware: every request's method, path (and query) and response body bytes."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.log: list[list] = []

    def take(self) -> list[list]:
        with self.lock:
            log, self.log = self.log, []
        return log

    def __call__(self, environ, start_response):
        entry = [environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), 0]
        with self.lock:
            self.log.append(entry)
        for chunk in self.app(environ, start_response):
            entry[3] += len(chunk)
            yield chunk


def start_s3() -> tuple[str, Recorder, object]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):  # the recorder keeps the log
            pass

    recorder = Recorder(DomainDispatcherApplication(create_backend_app))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server("127.0.0.1", port, recorder, threaded=True, request_handler=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", recorder, server


def summary(log: list[list], seconds: float | None = None) -> dict:
    out = {"requests": len(log), "by_method": dict(Tally(m for m, *_ in log)), "bytes": sum(e[3] for e in log),
           "listings": sum(1 for m, path, query, _ in log if m == "GET" and "list-type" in query)}
    return out if seconds is None else {**out, "seconds": round(seconds, 3)}


def keys_read(log: list[list]) -> Tally:
    """GETs of store keys (relative to the store), counted."""
    head = f"/{BUCKET}/{STORE}/"
    return Tally(path[len(head):] for m, path, query, _ in log if m == "GET" and path.startswith(head) and not query)


def draw_pairs(num_experts: int, *, pairs: int, m: float, max_start: float, seed: int) -> list[tuple[int, float, float]]:
    """MCT's draw: a random expert, a real start in [0, max_start], the target M epochs later."""
    rng = random.Random(seed)
    return [(rng.randrange(num_experts), rng.uniform(0, max_start), m) for _ in range(pairs)]


def anchors_needed(c: float, anchor_epochs: tuple[int, ...]) -> set[int]:
    """The two anchors of the piece holding c (docs/format.md §7, step 1)."""
    j = min(bisect.bisect_right(anchor_epochs, c) - 1, len(anchor_epochs) - 2)
    return {anchor_epochs[j], anchor_epochs[j + 1]}


def sample(store, draws) -> None:
    for e, c, m in draws:
        store.expert(e).window(c, m, flat=True)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--waypoints", default="6,25")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--expert-epochs", type=float, default=2.0, help="M (the cifar10-ipc10 preset's)")
    p.add_argument("--max-start-epoch", type=float, default=20.0)
    p.add_argument("--per-file", type=int, default=10, help="trajectories per MTT buffer file (buffer.py's)")
    p.add_argument("--measure-mtt", action="store_true", help="upload the MTT file and read it through s3fs")
    p.add_argument("--out", default="benchmarks/results/remote.json")
    args = p.parse_args(argv)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    import boto3
    import fsspec

    endpoint, recorder, server = start_s3()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    options = {"endpoint_url": endpoint, "skip_instance_cache": True}
    url = f"s3://{BUCKET}/{STORE}"
    waypoints = tuple(int(w) for w in args.waypoints.split(",") if w)
    layers = convnet_layers(width=args.width)
    shapes = [s for _, s in layers]
    results: dict = {}
    with trajstore.create(url, layers, args.timesteps, waypoints=waypoints, storage_options=options) as w:
        for i in range(args.experts):
            w.write_expert(random_walk(layers, args.timesteps, seed=i))
    recorder.take()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "anchor-cache"
        draws = draw_pairs(args.experts, pairs=args.pairs, m=args.expert_epochs, max_start=args.max_start_epoch,
                           seed=0)

        began = time.perf_counter()
        store = trajstore.open(url, storage_options=options, cache_dir=cache)
        results["open"] = summary(recorder.take(), time.perf_counter() - began)
        results["store_bytes"] = store.nbytes
        recorder.take()
        epochs = store.anchor_epochs

        e, c, m = draws[0]  # one pair alone, on a cold cache
        began = time.perf_counter()
        store.expert(e).window(c, m, flat=True)
        log = recorder.take()
        first = {"pair": [e, c, m], **summary(log, time.perf_counter() - began), "keys": sorted(keys_read(log))}
        need = anchors_needed(c, epochs) | anchors_needed(min(c + m, epochs[-1]), epochs)
        expect = {f"experts/{e:06d}/{k}" for k in ("zarr.json", "beta/zarr.json", "beta/c/0/0")}
        expect |= {f"experts/{e:06d}/anchor_{a:04d}.safetensors" for a in need}
        first["reads_only_what_it_needs"] = set(first["keys"]) == expect and first["requests"] == len(expect)
        results["first_pair"] = first

        began = time.perf_counter()
        sample(store, draws[1:])
        rest = recorder.take()
        results["pairs_cold"] = summary(log + rest, time.perf_counter() - began + first["seconds"])
        reads = keys_read(log + rest)
        needed = {f"experts/{e:06d}/anchor_{a:04d}.safetensors" for e, c, m in draws
                  for a in anchors_needed(c, epochs) | anchors_needed(min(c + m, epochs[-1]), epochs)}
        used = sorted({e for e, _, _ in draws})
        small = {f"experts/{e:06d}/{k}" for e in used for k in ("zarr.json", "beta/zarr.json", "beta/c/0/0")}
        results["checks_cold"] = {
            "anchors_fetched": sum(n for k, n in reads.items() if "anchor_" in k),
            "anchors_needed_by_the_pairs": len(needed),
            "fetched_exactly_the_needed_anchors": {k for k in reads if "anchor_" in k} == needed,
            "no_key_read_twice": max(reads.values()) == 1,
            "small_arrays_once_per_expert_used": {k for k in reads if "anchor_" not in k} == small,
            "listings": results["pairs_cold"]["listings"],
        }
        cold = {k: results["open"][k] + results["pairs_cold"][k] for k in ("requests", "bytes", "listings")}
        results["open_and_pairs_cold"] = cold

        # another process on this machine: a new reader, other pairs, the same disk cache
        began = time.perf_counter()
        warm = trajstore.open(url, storage_options=options, cache_dir=cache)
        sample(warm, draw_pairs(args.experts, pairs=args.pairs, m=args.expert_epochs,
                                max_start=args.max_start_epoch, seed=1))
        log = recorder.take()
        results["open_and_pairs_warm_cache"] = {**summary(log, time.perf_counter() - began),
                                                "anchors_fetched": sum(n for k, n in keys_read(log).items()
                                                                       if "anchor_" in k)}

        # a damaged cache entry (one byte flipped on disk) is caught by its sha256 and fetched again
        e, c, _ = draws[0]
        digest = store.expert(e)._manifest()[f"anchor_{min(anchors_needed(c, epochs)):04d}.safetensors"]
        entry = cache / digest[:2] / digest  # the cache's layout: trajstore.stores.cache
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0x01
        entry.write_bytes(bytes(data))
        again = trajstore.open(url, storage_options=options, cache_dir=cache)
        recorder.take()
        sample(again, draws)
        results["damaged_cache_entry"] = {"anchors_fetched_again": sum(n for k, n in keys_read(recorder.take()).items()
                                                                       if "anchor_" in k)}

        # a bounded cache (disk_cache_bytes: 8 anchors' worth): old entries go, and come back when used
        anchor_bytes = store._store.size(f"experts/000000/anchor_{epochs[0]:04d}.safetensors")
        small_cache = Path(tmp) / "small-cache"
        bounded = trajstore.open(url, storage_options=options, cache_dir=small_cache, disk_cache_bytes=8 * anchor_bytes)
        recorder.take()
        for _ in range(2):  # twice over the same draws, by new readers: the second pass shows the bound
            sample(bounded, draws)
            bounded = trajstore.open(url, storage_options=options, cache_dir=small_cache,
                                     disk_cache_bytes=8 * anchor_bytes)
        log = recorder.take()
        results["bounded_cache"] = {"limit_bytes": 8 * anchor_bytes,
                                    "held_bytes": sum(f.stat().st_size for f in small_cache.glob("??/*")),
                                    "anchors_fetched_in_two_passes": sum(n for k, n in keys_read(log).items()
                                                                         if "anchor_" in k),
                                    "anchors_needed_per_pass": len(needed)}

    results["mtt_loader"] = {"bytes": mtt_nbytes(shapes, args.timesteps, args.experts, per_file=args.per_file),
                             "how": "trajstore.tools.inspect.mtt_nbytes (torch.save size, exact)",
                             "files": -(-args.experts // args.per_file)}
    if args.measure_mtt:
        results["mtt_loader"].update(measure_mtt(layers, args, options, recorder))
    server.shutdown()
    results["ratio_bytes_vs_store"] = cold["bytes"] / results["store_bytes"]
    results["ratio_bytes_vs_mtt"] = cold["bytes"] / results["mtt_loader"]["bytes"]
    params = {k: getattr(args, k) for k in ("experts", "width", "timesteps", "waypoints", "pairs", "expert_epochs",
                                            "max_start_epoch", "per_file")}
    params["num_params"] = sum(int(torch.Size(s).numel()) for s in shapes)
    return write_result(args.out, "remote", params, results)


def measure_mtt(layers, args, options, recorder) -> dict:
    """MTT's distill.py: buffer = torch.load(expert_files[file_idx]), here through s3fs."""
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    with tempfile.TemporaryDirectory() as tmp:
        for f in range(-(-args.experts // args.per_file)):
            ids = range(f * args.per_file, min((f + 1) * args.per_file, args.experts))
            local = Path(tmp) / f"replay_buffer_{f}.pt"
            torch.save([random_walk(layers, args.timesteps, seed=i) for i in ids], local)
            fs.put_file(str(local), f"s3://{BUCKET}/replay_buffer_{f}.pt", chunksize=4 << 30)  # one PUT
            local.unlink()
    recorder.take()
    began = time.perf_counter()
    for f in range(-(-args.experts // args.per_file)):
        with fsspec.filesystem("s3", **options).open(f"s3://{BUCKET}/replay_buffer_{f}.pt", "rb") as handle:
            torch.load(handle, weights_only=True)
    return {"measured": summary(recorder.take(), time.perf_counter() - began)}


if __name__ == "__main__":
    main()
