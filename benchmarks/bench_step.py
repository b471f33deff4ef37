"""One first-order training step of evaluation and experts: the ConvNet as modules against `train.forward_of`'s
path (student_ops' Functions), side by side in one process.

    python -m benchmarks.bench_step [--ipcs 1,10] [--rounds 40] [--threads 1] [--profile]
    python -m benchmarks.bench_step --model ConvNetW32 --im-size 8 --channels 1   # the quickstart's network

The setting of `trajstore evaluate --random --ipc N`: ConvNet on 3x32x32 digits, a random real subset of N
images per class, one epoch of `train.train_epoch` (one step of batch 10 N while N <= 25) with DSA and the
protocol's SGD, and the test pass (`train.accuracy` over the digits test set). `module` runs the network as
its nn.Module (the code before the fast path: `forward_of` replaced by the identity), `fast` as training
runs it now. The two take turns within every round (each round starting with the other), so load from
other jobs on a shared machine falls on both alike; figures are medians over rounds, in wall ms, and
`fast_over_module` is their ratio. --profile adds where each step's self CPU time goes (torch.profiler,
ms per step by operation, the profiler's own overhead included).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import as_modules, timeit_interleaved, write_result
from trajstore.distill import train
from trajstore.distill.augment import seeded_dsa
from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import BASELINE_LR, _Schedule, random_subset
from trajstore.distill.networks import build

PATHS = ("module", "fast")


def _path(name: str):
    """The context a step of path `name` runs in."""
    return as_modules() if name == "module" else contextlib.nullcontext()


def _runs(ds, ipc: int, model: str):
    """Per path: (one epoch, the test pass), each on its own network, generator and optimizer."""
    images, labels = random_subset(ds, ipc, seed=0)
    out = {}
    for name in PATHS:
        torch.manual_seed(0)
        net = build(model, ds.channel, ds.num_classes, ds.im_size)
        g = torch.Generator().manual_seed(0)
        augment, opt = seeded_dsa(g), _Schedule(BASELINE_LR, 300).optimizer(net.parameters())

        def epoch(net=net, g=g, augment=augment, opt=opt, name=name):
            with _path(name):
                train.train_epoch(net, images, labels, optimizer=opt, batch_size=256, augment=augment,
                                  device="cpu", generator=g)

        def test(net=net, name=name):
            with _path(name):
                train.accuracy(net, ds.test_images, ds.test_labels, device="cpu")

        out[name] = (epoch, test)
    return out


def _profile(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / steps / 1e3
    return {"total_ms": total, "top_ms": {e.key: e.self_cpu_time_total / steps / 1e3 for e in ops[:30]}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
    parser.add_argument("--model", default="ConvNet")
    parser.add_argument("--im-size", type=int, default=32, help="digits at this size (the quickstart: 8)")
    parser.add_argument("--channels", type=int, default=3, help="digits' channels (the quickstart: 1)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--test-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (evaluation's side-by-side: 1)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/step.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset("digits", im_size=(args.im_size, args.im_size), channels=args.channels)
    results = {}
    for ipc in (int(i) for i in args.ipcs.split(",")):
        runs = _runs(ds, ipc, args.model)
        rounds = max(2, args.rounds // ipc)
        step = timeit_interleaved({n: r[0] for n, r in runs.items()}, repeat=rounds, rotate=True)
        test = timeit_interleaved({n: r[1] for n, r in runs.items()}, repeat=args.test_rounds, warmup=1,
                                  rotate=True)
        res = {"batch": ipc * ds.num_classes, "rounds": rounds,
               **{f"step_ms_{n}": 1e3 * step[n]["median_s"] for n in PATHS},
               "step_fast_over_module": step["fast"]["median_s"] / step["module"]["median_s"],
               **{f"test_pass_ms_{n}": 1e3 * test[n]["median_s"] for n in PATHS},
               "test_pass_fast_over_module": test["fast"]["median_s"] / test["module"]["median_s"]}
        if args.profile:
            res["profile"] = {n: _profile(runs[n][0], max(2, 20 // ipc)) for n in PATHS}
        results[f"ipc{ipc}"] = res
    return write_result(args.out, "step", vars(args), results)


if __name__ == "__main__":
    main()
