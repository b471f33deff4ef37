"""Continuous against discrete sampling with 1, 5 and 10 experts (MCT Table 2), on digits.

The paper's ablation distills CIFAR-10 ipc 10 from convexified trajectories with the start epoch drawn
from [0, 5], either anywhere in that range ("w. continuous sampling", Eq. 10) or as an integer 0..4
("w/o", `--discrete`), with 1, 5, 10, 20 and 50 experts, and reports the best accuracy over the run.
Here: the quickstart's experts (ConvNetW32, 8x8 digits, 50 epochs, anchors 0, 6, 25, 50), the first
k = 1, 5, 10 of the same training runs, MCT from the .ctraj with every other setting shared, for each
distillation seed. Reported per (sampling, k): each seed's best and final accuracy and their mean
and std over seeds. A PNG shows the best accuracy against k for both samplings.

    python -m benchmarks.bench_sampling_ablation [--experts 1,5,10] [--seeds 0,1,2] [--ipc 1]
        [--iterations 300] [--eval-every 50] [--work DIR] [--out benchmarks/results/sampling_ablation.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import trajstore
from benchmarks.common import distill_or_reuse, write_result
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import train_experts
from trajstore.distill.quickstart import EXPERT_LR, SCALES
from trajstore.distill.run import DistillConfig
from trajstore.distill.synset import save_figure

SAMPLINGS = {"continuous": False, "discrete": True}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="1,5,10", help="comma-separated numbers of experts")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--max-start-epoch", type=float, default=5, help="the paper's ablation range [0, 5]")
    p.add_argument("--expert-epochs", type=float, default=2, help="M")
    p.add_argument("--syn-steps", type=int, default=None, help="N [the scale's]")
    p.add_argument("--lr-lr", type=float, default=None, help="[the scale's]")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-nets", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=None, help="[the scale's]")
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--work", default=None, help="keep experts and runs here (default: a temporary dir)")
    p.add_argument("--experts-from", default=None, help="a directory .ctraj of the same scale and seed 0 whose "
                   "experts are reused (e.g. bench_convergence's --work DIR/experts.ctraj)")
    p.add_argument("--png", default="benchmarks/results/sampling_ablation.png")
    p.add_argument("--out", default="benchmarks/results/sampling_ablation.json")
    args = p.parse_args(argv)
    s = SCALES[args.scale]
    counts = [int(x) for x in args.experts.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    torch.set_num_threads(1)  # small networks: see distill.quickstart
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        ds = load_dataset("digits", im_size=(s.im_size, s.im_size), channels=1)
        stores = [Path(args.experts_from)] if args.experts_from else []
        for k in sorted(counts):
            # Expert i is seeded by (seed, i), so each store holds the first k of the same training runs:
            # a copy of the largest smaller store is completed by training only the missing experts.
            ctraj = work / f"experts{k}.ctraj"
            smaller = [p for p in stores if trajstore.open(p).num_experts <= k]
            if not ctraj.exists() and smaller:
                shutil.copytree(max(smaller, key=lambda p: trajstore.open(p).num_experts), ctraj)
            train_experts(ctraj, dataset=ds, model=s.model, num_experts=k, epochs=s.epochs, lr=EXPERT_LR,
                          batch_size=s.batch_size, waypoints=s.waypoints, seed=0, progress=False, log=lambda _: None)
            stores.append(ctraj)
            for sampling, discrete in SAMPLINGS.items():
                best, final = [], []
                for seed in seeds:
                    config = DistillConfig(source=str(ctraj), method="mct", dataset="digits", model=s.model,
                                           ipc=args.ipc, syn_steps=args.syn_steps or s.syn_steps,
                                           expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
                                           discrete=discrete, lr_img=s.lr_img, lr_lr=args.lr_lr or s.lr_lr,
                                           lr_teacher=EXPERT_LR, iterations=args.iterations,
                                           eval_every=args.eval_every, eval_nets=args.eval_nets,
                                           eval_epochs=s.eval_epochs if args.eval_epochs is None else args.eval_epochs,
                                           seed=seed)
                    r = distill_or_reuse(config, work / f"{sampling}_k{k}_seed{seed}")
                    best.append(r.best.mean)
                    final.append(r.final.mean)
                    print(f"{sampling} k={k} seed {seed}: best {r.best.mean:.4f} final {r.final.mean:.4f}", flush=True)
                results[f"{sampling}_k{k}"] = {
                    "sampling": sampling, "experts": k, "seeds": seeds, "best": best, "final": final,
                    "best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
                    "final_mean": float(np.mean(final)), "final_std": float(np.std(final))}
    _plot(results, counts, args.png)
    return write_result(args.out, "sampling_ablation", vars(args), results)


def _plot(results: dict, counts: list[int], png: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for sampling in SAMPLINGS:
        rows = [results[f"{sampling}_k{k}"] for k in counts]
        ax.errorbar(counts, [100 * r["best_mean"] for r in rows], yerr=[100 * r["best_std"] for r in rows],
                    marker="o", capsize=3, label=f"{sampling} sampling")
    ax.set(xlabel="number of expert trajectories", ylabel="best test accuracy (%)", xticks=counts,
           title="MCT Table 2 on digits: mean +- std over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, png, overwrite=True)


if __name__ == "__main__":
    main()
