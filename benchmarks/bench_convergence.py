"""Distillation convergence (MCT Figure 3a/b): MCT against MTT on digits, every setting shared.

Experts are trained once (the quickstart's "full" scale: ConvNetW32 on 8x8 digits, 50 epochs, a
.ctraj and the legacy buffer of the same runs). Then both methods distill ipc 1 with the same M, the
same lr_lr and every other setting shared, for each distillation seed, evaluating every
`--eval-every` iterations with `--eval-nets` fresh networks. Reported per method: every seed's curve,
the mean and spread (std and range over seeds) of the accuracy at each evaluated iteration, the
iterations each seed needed to come within 2% of its own best and stay there (the paper's
convergence point), the best accuracy, and seconds per iteration. A PNG shows the mean over seeds
with a +-1 std band.

    python -m benchmarks.bench_convergence [--iterations 200] [--eval-every 25] [--seeds 0,1,2]
        [--expert-epochs 6] [--eval-nets 5] [--work DIR] [--out benchmarks/results/convergence_M6.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import distill_or_reuse, write_result
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import train_experts
from trajstore.distill.quickstart import EXPERT_LR, SCALES
from trajstore.distill.run import METRICS, DistillConfig, plot_accuracy

EPSILON = 0.02


def converged_at(evals: list[dict], epsilon: float = EPSILON) -> int:
    """First evaluated iteration from which every later accuracy stays within epsilon of the best."""
    best = max(e["mean"] for e in evals)
    for i, e in enumerate(evals):
        if all(best - later["mean"] < epsilon for later in evals[i:]):
            return e["iteration"]
    return evals[-1]["iteration"]


def step_seconds(run_dir: Path) -> float:
    lines = (run_dir / METRICS).read_text().splitlines()
    return statistics.median(r["seconds"] for r in map(json.loads, lines) if r["kind"] == "step")


def across_seeds(curves: list[list[dict]]) -> list[dict]:
    """Per evaluated iteration: mean, std (population) and range over seeds of each seed's mean accuracy."""
    by_iteration: dict[int, list[float]] = {}
    for evals in curves:
        for e in evals:
            by_iteration.setdefault(e["iteration"], []).append(e["mean"])
    return [{"iteration": i, "mean": float(np.mean(v)), "std": float(np.std(v)), "min": min(v), "max": max(v),
             "seeds": len(v)} for i, v in sorted(by_iteration.items())]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-nets", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=None, help="epochs per evaluation network [the scale's]")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
    p.add_argument("--expert-epochs", type=float, default=None, help="M for both methods [the scale's]")
    p.add_argument("--methods", default="mct,mtt", help="comma-separated: which methods to run [both]")
    p.add_argument("--memory", default="plain", help="matching gradient mode for both methods [plain]")
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--work", default=None, help="keep experts and runs here (default: a temporary dir)")
    p.add_argument("--png", default="benchmarks/results/convergence.png")
    p.add_argument("--out", default="benchmarks/results/convergence.json")
    args = p.parse_args(argv)
    s = SCALES[args.scale]
    m = s.expert_epochs if args.expert_epochs is None else args.expert_epochs
    seeds = [int(x) for x in args.seeds.split(",")]
    torch.set_num_threads(1)  # small networks: see distill.quickstart
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        ds = load_dataset("digits", im_size=(s.im_size, s.im_size), channels=1)
        ctraj, legacy = work / "experts.ctraj", work / "legacy"
        if not ctraj.exists():
            train_experts(ctraj, dataset=ds, model=s.model, num_experts=s.num_experts, epochs=s.epochs,
                          lr=EXPERT_LR, batch_size=s.batch_size, waypoints=s.waypoints, legacy_dir=legacy, seed=0,
                          log=lambda _: None)
        results, curves = {}, {}
        sources = {"mct": ctraj, "mtt": legacy}
        for method in args.methods.split(","):
            source = sources[method]
            per_seed = []
            for seed in seeds:
                config = DistillConfig(source=str(source), method=method, expert_epochs=m, dataset="digits",
                                       model=s.model, ipc=1, syn_steps=s.syn_steps, max_start_epoch=s.max_start_epoch,
                                       lr_img=s.lr_img, lr_lr=s.lr_lr, lr_teacher=EXPERT_LR,
                                       iterations=args.iterations, eval_every=args.eval_every,
                                       eval_nets=args.eval_nets, memory=args.memory,
                                       eval_epochs=s.eval_epochs if args.eval_epochs is None else args.eval_epochs,
                                       seed=seed)
                run_dir = work / f"{method}_M{m:g}_seed{seed}"
                r = distill_or_reuse(config, run_dir)
                evals = list(r.evals)
                per_seed.append(evals)
                results[f"{method}_seed{seed}"] = {
                    "method": method, "seed": seed, "expert_epochs": m, "lr_lr": s.lr_lr,
                    "curve": [(e["iteration"], e["mean"], e["std"]) for e in evals],
                    "best": max(e["mean"] for e in evals), "converged_at": converged_at(evals),
                    "median_seconds_per_iteration": step_seconds(run_dir),
                }
                print(f"{method} seed {seed}: best {results[f'{method}_seed{seed}']['best']:.4f}", flush=True)
            summary = across_seeds(per_seed)
            results[f"{method}_over_seeds"] = {"method": method, "seeds": seeds, "curve": summary}
            curves[f"{method.upper()} (M={m:g}, mean +- std over {len(seeds)} seeds)"] = summary
        plot_accuracy(curves, args.png, title=f"digits ipc 1: MCT vs MTT, same M={m:g} and lr_lr={s.lr_lr:g}")
    return write_result(args.out, "convergence", vars(args), results)


if __name__ == "__main__":
    main()
