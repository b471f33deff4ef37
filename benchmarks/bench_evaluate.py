"""Evaluation: K networks trained together (stacked, vmapped) against one by one, against one network.

    python -m benchmarks.bench_evaluate [--epochs 300] [--nets 5] [--device cpu|cuda]

The setting of `trajstore evaluate --random --ipc 1 --epochs 300`: ConvNet on 3x32x32 digits, a random
real subset of 1 image per class, the evaluation protocol. The three runs take turns within every
round, so load from other jobs falls on all of them alike; the figures are medians over rounds, in
wall seconds and in this process's CPU seconds (`time.process_time`, which a loaded machine disturbs
far less; with one torch thread it is the work done).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import add_device_option, check_device, write_result
from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import BASELINE_LR, evaluate_synset, random_subset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--nets", type=int, default=5)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_device_option(p)
    p.add_argument("--out", default="benchmarks/results/evaluate.json")
    args = p.parse_args(argv)
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("digits")
    images, labels = random_subset(ds, args.ipc, seed=0)
    runs = {"one_network": dict(num_nets=1, together=False),
            "k_one_by_one": dict(num_nets=args.nets, together=False),
            "k_together": dict(num_nets=args.nets, together=True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    accuracies = {}
    # One short untimed pass of each variant first, so one-time costs (CUDA context, cuDNN plans, vmap
    # tracing) are not charged to whichever variant is timed first.
    for kw in runs.values():
        evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=2, model=args.model, device=device,
                        progress=False, **kw)
    for _ in range(args.rounds):
        for name, kw in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            result = evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=args.epochs, model=args.model,
                                     device=device, progress=False, **kw)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            accuracies[name] = list(result.accuracies)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    results = {device.split(":")[0]: {
        "seconds": med, "all_seconds": times, "cpu_seconds": cpu, "accuracies": accuracies,
        "ratio_k_one_by_one_over_one": med["k_one_by_one"] / med["one_network"],
        "ratio_k_together_over_one": med["k_together"] / med["one_network"],
        "cpu_ratio_k_one_by_one_over_one": cpu["k_one_by_one"] / cpu["one_network"],
        "cpu_ratio_k_together_over_one": cpu["k_together"] / cpu["one_network"]}}
    return write_result(args.out, "evaluate", vars(args), results)


if __name__ == "__main__":
    main()
