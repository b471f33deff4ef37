"""Evaluation: K networks side by side, one by one and stacked, against one network; where the time goes.

    python -m benchmarks.bench_evaluate [--epochs 300] [--nets 5] [--device cpu|cuda] [--threads N]

The setting of `trajstore evaluate --random --ipc 1 --epochs 300`: ConvNet on 3x32x32 digits, a random
real subset of 1 image per class, the evaluation protocol. Variants (all with the thread setting the
CLI has, torch's default unless --threads):

- one_network: 1 network, `evaluate`'s default path (the plain loop on all intra-op threads);
- one_network_one_thread: the same on one thread (the work of one network, for the CPU ratio);
- k_default: K networks, `evaluate`'s default (CPU: side by side, one per core; GPU: stacked);
- k_one_by_one: K networks one after another (`--one-by-one`);
- k_together: K networks stacked and vmapped (`--together`).

The variants take turns within every round, so load from other jobs falls on all of them alike; the
figures are medians over rounds, in wall seconds and in this process's CPU seconds (all its threads).
`breakdown` says where one network's time goes: FLOPs of one training step (torch's FlopCounterMode),
its CPU time on one thread (hence GFLOP/s: compute- or dispatch-bound), DSA's share, the test pass and
the data set-up, all on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.common import add_device_option, check_device, write_result
from trajstore.distill.augment import seeded_dsa
from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import BASELINE_LR, _Schedule, evaluate_synset, random_subset
from trajstore.distill.networks import build
from trajstore.distill.train import accuracy, train_epoch
from trajstore.tools.threads import single_threaded


def _cpu(fn, repeat: int = 1) -> float:
    c0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - c0) / repeat


def breakdown(model: str, ipc: int, device: str, steps: int = 20) -> dict:
    """One network's costs on one thread, in CPU seconds: a training step (with and without DSA), the
    test pass, the data set-up; the FLOPs of a step."""
    from torch.utils.flop_counter import FlopCounterMode

    with single_threaded():
        setup = _cpu(lambda: load_dataset("digits"))
        ds = load_dataset("digits")
        images, labels = random_subset(ds, ipc, seed=0)
        torch.manual_seed(0)
        net = build(model, ds.channel, ds.num_classes, ds.im_size).to(device)
        g = torch.Generator().manual_seed(0)
        opt = _Schedule(BASELINE_LR, 300).optimizer(net.parameters())
        images, labels = images.to(device), labels.to(device)

        def step(augment):
            return lambda: train_epoch(net, images, labels, optimizer=opt, batch_size=256, augment=augment,
                                       device=device, generator=g)

        with FlopCounterMode(display=False) as counter:
            step(None)()
        flops = counter.get_total_flops()
        step(seeded_dsa(g))()  # warm
        with_dsa = _cpu(step(seeded_dsa(g)), steps)
        without = _cpu(step(None), steps)
        test = _cpu(lambda: accuracy(net, ds.test_images.to(device), ds.test_labels.to(device), device=device))
        with FlopCounterMode(display=False) as counter:
            accuracy(net, ds.test_images.to(device), ds.test_labels.to(device), device=device)
        test_flops = counter.get_total_flops()
    return {"batch": len(labels), "step_flops": flops, "step_cpu_s": with_dsa, "step_cpu_s_without_dsa": without,
            "dsa_share": 1 - without / with_dsa, "gflops_per_cpu_s": flops / without / 1e9,
            "test_pass_cpu_s": test, "test_pass_flops": test_flops, "test_images": len(ds.test_labels),
            "data_setup_cpu_s": setup}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--nets", type=int, default=5)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variants", default="one_network,one_network_one_thread,k_default,k_one_by_one,k_together",
                   help="comma-separated, of those in the module's doc")
    add_device_option(p)
    p.add_argument("--out", default="benchmarks/results/evaluate.json")
    args = p.parse_args(argv)
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("digits")
    images, labels = random_subset(ds, args.ipc, seed=0)
    every = {"one_network": (dict(num_nets=1), contextlib.nullcontext),
             "one_network_one_thread": (dict(num_nets=1), single_threaded),
             "k_default": (dict(num_nets=args.nets), contextlib.nullcontext),
             "k_one_by_one": (dict(num_nets=args.nets, together=False), contextlib.nullcontext),
             "k_together": (dict(num_nets=args.nets, together=True), contextlib.nullcontext)}
    runs = {name: every[name] for name in args.variants.split(",")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    accuracies = {}
    # One short untimed pass of each variant first, so one-time costs (CUDA context, cuDNN plans, vmap
    # tracing) are not charged to whichever variant is timed first.
    for kw, threads in runs.values():
        with threads():
            evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=2, model=args.model, device=device,
                            progress=False, **kw)
    for _ in range(args.rounds):
        for name, (kw, threads) in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            with threads():
                t0, c0 = time.perf_counter(), time.process_time()
                result = evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=args.epochs, model=args.model,
                                         device=device, progress=False, **kw)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
            accuracies[name] = list(result.accuracies)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    base = "one_network" if "one_network" in med else next(iter(med))
    results = {device.split(":")[0]: {
        "seconds": med, "all_seconds": times, "cpu_seconds": cpu, "accuracies": accuracies,
        "ratio_over_one_network": {name: t / med[base] for name, t in med.items()},
        "cpu_ratio_over_one_network": {name: t / cpu[base] for name, t in cpu.items()},
        "breakdown": breakdown(args.model, args.ipc, device)}}
    return write_result(args.out, "evaluate", vars(args), results)


if __name__ == "__main__":
    main()
