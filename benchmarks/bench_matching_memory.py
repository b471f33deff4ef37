"""Memory and time of one matching iteration in the three gradient modes, for growing N = syn_steps, on a
CIFAR-shaped problem (ConvNet, 3x32x32, 10 classes): plain (exact, MTT's unrolled graph), constant (exact,
recomputing each step backwards) and tesla (the MCT code's first-order rule, not the exact gradient).

Every (mode, N) runs in a fresh Python process, so the peak resident memory (CPU) or the peak allocated
GPU memory belongs to that configuration alone. Loss and gradients are reported too: plain and constant
must give the same numbers; tesla gives the same loss and other gradients (its difference is reported).

    python -m benchmarks.bench_matching_memory [--steps 10,20,40] [--modes plain,constant,tesla] [--ipc 10]
        [--batch-syn 100] [--device cpu|cuda] [--repeat 2] [--warmup 1] [--out benchmarks/results/matching_memory.json]

Mind the plain mode's memory on a CPU: at ipc 10 with the whole set per step it grows by ~300 MiB per step
(N = 40 needs ~12 GiB); --batch-syn bounds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import peak_rss_bytes, write_result


def measure(memory: str, syn_steps: int, *, ipc: int, batch_syn: int | None, width: int, im_size: int,
            device: str, repeat: int, warmup: int, dsa: bool, seed: int) -> dict:
    """One configuration in this process: `warmup` untimed iterations (forward unroll + backward), then
    `repeat` timed ones."""
    from trajstore.distill.augment import dsa as dsa_augment
    from trajstore.distill.matching import SyntheticSet, match_loss, plan_unroll
    from trajstore.distill.networks import FunctionalNet, build, flat_parameters

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build(f"ConvNetW{width}", 3, 10, (im_size, im_size)).to(device)
    synset = SyntheticSet.from_noise((3, im_size, im_size), 10, ipc, 0.01, rng=rng, device=device)
    student = FunctionalNet(net)
    start = flat_parameters(net)
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    plan = plan_unroll(rng, len(synset), batch_syn or len(synset), syn_steps)
    cuda = device.startswith("cuda")
    setup_rss = peak_rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for k in range(warmup + repeat):
        synset.images.grad = synset.syn_lr.grad = None
        t0 = time.perf_counter()
        loss = match_loss(student, synset.images, synset.labels, synset.syn_lr, start, target, plan,
                          augment=dsa_augment if dsa else None, memory=memory)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if k >= warmup:
            seconds.append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    return {"memory": memory, "syn_steps": syn_steps, "seconds_per_iteration": statistics.median(seconds),
            "seconds_all": seconds, "peak_rss_bytes": peak, "setup_rss_bytes": setup_rss,
            "iteration_rss_bytes": peak - setup_rss,
            "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "loss": loss.item(), "grad_images_norm": synset.images.grad.norm().item(),
            "grad_lr": synset.syn_lr.grad.item()}


def _child(args, memory: str, syn_steps: int) -> dict:
    """Run one configuration in a fresh interpreter and read back its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.bench_matching_memory", "--child", memory, str(syn_steps),
           "--ipc", str(args.ipc), "--width", str(args.width), "--im-size", str(args.im_size),
           "--device", args.device, "--repeat", str(args.repeat), "--warmup", str(args.warmup),
           "--seed", str(args.seed), "--dsa" if args.dsa else "--no-dsa"]
    if args.batch_syn:
        cmd += ["--batch-syn", str(args.batch_syn)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{memory} N={syn_steps} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(runs: list[dict], first: str, second: str) -> dict:
    """Per N: the largest relative difference between two modes' loss and gradients."""
    out = {}
    for n in sorted({r["syn_steps"] for r in runs}):
        at_n = {r["memory"]: r for r in runs if r["syn_steps"] == n}
        if first in at_n and second in at_n:
            a, b = at_n[first], at_n[second]
            out[str(n)] = {k: abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-30)
                           for k in ("loss", "grad_images_norm", "grad_lr")}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="10,20,40", help="comma-separated N values")
    p.add_argument("--modes", default="plain,constant,tesla")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=None, help="synthetic images per student step (default: all)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--im-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=2, help="timed iterations per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/matching_memory.json")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(ipc=args.ipc, batch_syn=args.batch_syn, width=args.width, im_size=args.im_size,
                    device=args.device, repeat=args.repeat, warmup=args.warmup, dsa=args.dsa, seed=args.seed)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), **settings)))
        return None
    runs = []
    for n in (int(s) for s in args.steps.split(",")):
        for mode in args.modes.split(","):
            runs.append(_child(args, mode, n))
            r = runs[-1]
            gpu = r["cuda_peak_allocated_bytes"]
            mem, what = (gpu, "GPU peak") if gpu is not None else (r["iteration_rss_bytes"], "RSS growth")
            print(f"{mode:8s} N={n:3d}: {r['seconds_per_iteration']:.2f} s/iteration, {mem / 2**20:.0f} MiB ({what})",
                  flush=True)
    return write_result(args.out, "matching_memory", {k: v for k, v in vars(args).items() if k != "child"},
                        {"runs": runs, "relative_difference_constant_vs_plain": _agreement(runs, "constant", "plain"),
                         "relative_difference_tesla_vs_plain": _agreement(runs, "tesla", "plain")})


if __name__ == "__main__":
    main()
