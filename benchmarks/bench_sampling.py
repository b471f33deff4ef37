"""Sampling: time to obtain one (start, target) pair of a random expert.

Compares a .ctraj (`expert.window(c, M, flat=True)`) with MTT's access pattern (`torch.load` of the
10-trajectory file holding the expert, then index and flatten) and with `--load_all` (every file in
RAM up front; its RAM is reported).

    python -m benchmarks.bench_sampling [--experts 10] [--width 128] [--out benchmarks/results/sampling.json]
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
from pathlib import Path

import torch

import trajstore
from benchmarks.common import timeit, write_result
from benchmarks.synthetic import convnet_layers, write_pair


def flat(timestep) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in timestep])


def run(files, ctraj, *, experts: int, per_file: int, m: int, max_start: int, repeat: int, device: str) -> dict:
    sync = device.startswith("cuda")
    rng = random.Random(0)

    def mtt_pair():
        i = rng.randrange(experts)
        buffer = torch.load(files[i // per_file], weights_only=True)
        traj = buffer[i % per_file]
        s = rng.randint(0, max_start)
        return flat(traj[s]).to(device), flat(traj[s + m]).to(device)

    store = trajstore.open(ctraj)

    def ctraj_pair():
        e = store.expert(rng.randrange(experts))
        return e.window(rng.uniform(0, max_start), m, flat=True, device=device)

    def ctraj_cold_pair():  # a fresh reader: no anchor cached, checksums verified again
        e = trajstore.open(ctraj).expert(rng.randrange(experts))
        return e.window(rng.uniform(0, max_start), m, flat=True, device=device)

    results = {
        "mtt_torch_load_then_index": timeit(mtt_pair, repeat=max(3, repeat // 20), warmup=1, sync=sync),
        "ctraj_cold_open": timeit(ctraj_cold_pair, repeat=repeat, sync=sync),
        "ctraj_warm": timeit(ctraj_pair, repeat=repeat, warmup=2 * experts, sync=sync),
    }
    gc.collect()
    everything = [traj for f in files for traj in torch.load(f, weights_only=True)]  # MTT --load_all
    ram = sum(p.numel() * p.element_size() for traj in everything for step in traj for p in step)

    def load_all_pair():
        traj = everything[rng.randrange(experts)]
        s = rng.randint(0, max_start)
        return flat(traj[s]).to(device), flat(traj[s + m]).to(device)

    results["mtt_load_all_in_ram"] = timeit(load_all_pair, repeat=repeat, sync=sync)
    results["load_all_ram_bytes"] = ram
    results["ctraj_cache_bytes_after_warm"] = store._cached
    base = results["ctraj_warm"]["median_s"]
    results["speedup_ctraj_warm_vs_mtt_load"] = results["mtt_torch_load_then_index"]["median_s"] / base
    results["speedup_ctraj_cold_vs_mtt_load"] = (results["mtt_torch_load_then_index"]["median_s"]
                                                 / results["ctraj_cold_open"]["median_s"])
    results["ratio_ctraj_warm_vs_load_all"] = base / results["mtt_load_all_in_ram"]["median_s"]
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--per-file", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=51)
    p.add_argument("--expert-epochs", type=int, default=2, help="M")
    p.add_argument("--max-start-epoch", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 gives stable timings on a shared machine")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/sampling.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = convnet_layers(width=args.width)
    with tempfile.TemporaryDirectory() as tmp:
        files, ctraj = write_pair(Path(tmp), layers, experts=args.experts, num_timesteps=args.timesteps,
                                  per_file=args.per_file, waypoints=())
        kw = dict(experts=args.experts, per_file=args.per_file, m=args.expert_epochs,
                  max_start=args.max_start_epoch, repeat=args.repeat)
        results = {"cpu": run(files, ctraj, device="cpu", **kw),
                   "file_bytes": sum(f.stat().st_size for f in files),
                   "ctraj_bytes": trajstore.open(ctraj).nbytes}
        if torch.cuda.is_available():
            results["cuda"] = run(files, ctraj, device="cuda", **kw)
    return write_result(args.out, "sampling", vars(args), results)


if __name__ == "__main__":
    main()
