"""Remote reading: bytes and requests for `open` + 100 random (start, target) pairs from a 10-expert
.ctraj on an S3 API, against the store's size and against what MTT's loader transfers.

A real S3 server (moto's, on 127.0.0.1) runs behind a WSGI layer that counts every request and every
byte of every response body, so the numbers are what crossed the wire, whatever s3fs did underneath.
The same trajectories are also stored as MTT's `replay_buffer_0.pt` in the bucket and read the way
MTT's distill.py reads a buffer file (`torch.load` of the whole file; here through s3fs).

    python -m benchmarks.bench_remote [--experts 10] [--width 128] [--timesteps 51] [--pairs 100]
        [--out benchmarks/results/remote.json]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

import trajstore
from benchmarks.common import write_result
from benchmarks.synthetic import convnet_layers, write_pair


class Counter:
    """WSGI middleware: requests by method and response body bytes, for the whole server."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.requests, self.bytes_out = {}, 0

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": sum(self.requests.values()), "by_method": dict(self.requests),
                    "bytes": self.bytes_out}

    def __call__(self, environ, start_response):
        with self.lock:
            method = environ["REQUEST_METHOD"]
            self.requests[method] = self.requests.get(method, 0) + 1
        for chunk in self.app(environ, start_response):
            with self.lock:
                self.bytes_out += len(chunk)
            yield chunk


def start_s3() -> tuple[str, Counter, object]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counter = Counter(DomainDispatcherApplication(create_backend_app))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server("127.0.0.1", port, counter, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", counter, server


def sample_pairs(store, *, pairs: int, m: float, max_start: float, seed: int = 0) -> None:
    """MCT's draw: a random expert, a real start in [0, max_start], the target M epochs later."""
    rng = random.Random(seed)
    for _ in range(pairs):
        expert = store.expert(rng.randrange(store.num_experts))
        expert.window(rng.uniform(0, max_start), m, flat=True)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--waypoints", default="6,25")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--expert-epochs", type=float, default=2.0, help="M (the cifar10-ipc10 preset's)")
    p.add_argument("--max-start-epoch", type=float, default=20.0)
    p.add_argument("--out", default="benchmarks/results/remote.json")
    args = p.parse_args(argv)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    import boto3
    import fsspec

    endpoint, counter, server = start_s3()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    options = {"endpoint_url": endpoint, "skip_instance_cache": True}
    waypoints = tuple(int(w) for w in args.waypoints.split(",") if w)
    layers = convnet_layers(width=args.width)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files, local = write_pair(Path(tmp) / "data", layers, experts=args.experts, num_timesteps=args.timesteps,
                                  waypoints=waypoints)
        fs = fsspec.filesystem("s3", **options)
        url = "s3://bench/experts.ctraj"
        fs.put(str(local), url, recursive=True)
        for f in files:  # one PUT each (moto's server mishandles concurrent multipart parts)
            fs.put_file(str(f), f"s3://bench/{f.name}", chunksize=4 << 30)
        results["store_bytes"] = trajstore.open(local).nbytes
        results["mtt_file_bytes"] = sum(f.stat().st_size for f in files)
        results["mtt_files"] = len(files)

        def measured(fn) -> dict:
            counter.reset()
            began = time.perf_counter()
            fn()
            return {**counter.snapshot(), "seconds": round(time.perf_counter() - began, 3)}

        cache = Path(tmp) / "anchor-cache"
        holder = {}
        results["open"] = measured(lambda: holder.update(store=trajstore.open(url, storage_options=options,
                                                                                cache_dir=cache)))
        results["pairs_cold"] = measured(lambda: sample_pairs(holder["store"], pairs=args.pairs, m=args.expert_epochs,
                                                              max_start=args.max_start_epoch))
        results["open_and_pairs_cold"] = {k: results["open"][k] + results["pairs_cold"][k]
                                          for k in ("requests", "bytes", "seconds")}
        results["anchors_fetched"] = holder["store"]._disk_cache().fetched

        def warm():  # another process (or run) on the same machine: anchors come from the disk cache
            store = trajstore.open(url, storage_options=options, cache_dir=cache)
            sample_pairs(store, pairs=args.pairs, m=args.expert_epochs, max_start=args.max_start_epoch, seed=1)
            holder["warm"] = store

        results["open_and_pairs_warm_cache"] = measured(warm)
        results["anchors_fetched_warm_cache"] = holder["warm"]._disk_cache().fetched

        def mtt():  # distill.py: buffer = torch.load(expert_files[file_idx]); here through s3fs
            remote = fsspec.filesystem("s3", **options)
            rng = random.Random(0)
            for f in range(len(files)):
                with remote.open(f"s3://bench/replay_buffer_{f}.pt", "rb") as handle:
                    buffer = torch.load(handle, weights_only=True)
                for _ in range(args.pairs // len(files)):
                    traj = buffer[rng.randrange(len(buffer))]
                    s = rng.randint(0, int(args.max_start_epoch))
                    torch.cat([x.reshape(-1) for x in traj[s]]), torch.cat([x.reshape(-1) for x in traj[s + 2]])

        results["mtt_loader"] = measured(mtt)
    server.shutdown()
    cold = results["open_and_pairs_cold"]
    results["ratio_bytes_vs_store"] = cold["bytes"] / results["store_bytes"]
    results["ratio_bytes_vs_mtt"] = cold["bytes"] / results["mtt_loader"]["bytes"]
    params = {k: getattr(args, k) for k in ("experts", "width", "timesteps", "waypoints", "pairs", "expert_epochs",
                                            "max_start_epoch")}
    params["num_params"] = sum(int(torch.Size(s).numel()) for _, s in layers)
    return write_result(args.out, "remote", params, results)


if __name__ == "__main__":
    main()
