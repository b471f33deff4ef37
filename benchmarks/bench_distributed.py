"""Several processes against one on the same job: expert training (wall time) and distillation
(seconds per iteration), through the real command line, `--nproc N` or `torchrun --nproc-per-node N`.

    python -m benchmarks.bench_distributed [--nproc 1,2] [--device cpu|cuda] [--torchrun] [--tiny]
        [--out benchmarks/results/distributed.json]

Data: the embedded digits at CIFAR's shape (3x32x32, 10 classes; `--tiny`: 1x8x8). The experts are
trained once by the first process count (their wall time is what is measured) and the others train
them again into fresh stores (the same bits, by design); each distillation then runs from the first
store. s/iteration is the median of the per-iteration `seconds` rank 0 records in metrics.jsonl,
leaving out the first iteration (warm-up); the job's wall time includes starting the processes.
Evaluation is reduced to one network of one epoch: it is not what is measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result


def _command(nproc: int, torchrun: bool, args: list[str]) -> list[str]:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "trajstore", *args]
    return [sys.executable, "-m", "trajstore", *args, "--nproc", str(nproc)]


def _run(cmd: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torchrun", action="store_true", help="launch with torchrun instead of --nproc")
    p.add_argument("--tiny", action="store_true", help="8x8 digits and a width-8 ConvNet (a dry run)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=30)
    p.add_argument("--batch-syn", type=int, default=None)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--memory", default="plain")
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.nproc.split(",")]
    if args.tiny:
        args.model, args.ipc, args.syn_steps, args.iterations = "ConvNetW8", 1, 2, 3
    data = ["--dataset", "digits", "--model", args.model]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = None
        for n in counts:
            store = tmp / f"experts-{n}.ctraj"
            experts_cmd = _command(n, args.torchrun, ["experts", str(store), *data, "--num-experts", str(args.experts),
                                                      "--epochs", str(args.epochs), "--device", args.device, "--quiet"])
            if args.tiny:  # 8x8 digits need the store to say so: train through the Python API instead
                experts_cmd = None
            if experts_cmd is not None:
                experts_s = _run(experts_cmd)
            else:
                experts_s = _tiny_experts(store, n, args)
            source = source or store
            out = tmp / f"distill-{n}"
            distill_s = _run(_command(n, args.torchrun, [
                "distill", str(source), "--ipc", str(args.ipc), "--syn-steps", str(args.syn_steps),
                "--expert-epochs", "1", "--max-start-epoch", str(max(args.epochs - 1, 0.5)),
                "--iterations", str(args.iterations), "--eval-every", "0", "--eval-nets", "1", "--eval-epochs", "1",
                "--memory", args.memory, "--device", args.device, "--out", str(out), "--quiet",
                "--lr-img", "100", "--lr-lr", "1e-7",  # small steps: 2-epoch experts, and speed is what is measured
                *(["--batch-syn", str(args.batch_syn)] if args.batch_syn else [])]))
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            seconds = [r["seconds"] for r in steps if r["kind"] == "step"]
            runs.append({"nproc": n, "experts_wall_s": experts_s, "distill_wall_s": distill_s,
                         "s_per_iteration": statistics.median(seconds[1:] or seconds), "iteration_s": seconds,
                         "losses": [r["loss"] for r in steps if r["kind"] == "step"]})
            print(f"{n} process(es): experts {experts_s:.1f} s, distill {runs[-1]['s_per_iteration']:.3f} s/iteration",
                  flush=True)
    base = runs[0]
    ratios = {str(r["nproc"]): {"experts_wall": base["experts_wall_s"] / r["experts_wall_s"],
                                "s_per_iteration": base["s_per_iteration"] / r["s_per_iteration"]} for r in runs}
    return write_result(args.out, "distributed", vars(args), {"runs": runs, f"speedup_vs_{base['nproc']}": ratios,
                                                             "gpus": torch.cuda.device_count()})


def _tiny_experts(store: Path, nproc: int, args) -> float:
    """The dry run's experts: 8x8 one-channel digits (not reachable from the command line's --dataset)."""
    code = ("import sys; from trajstore.distill.data import load_dataset; "
            "from trajstore.distill.distributed import launch; from trajstore.distill.experts import train_experts; "
            "from trajstore.cli.options import no_log; "
            "launch(train_experts, int(sys.argv[2]), (sys.argv[1],), dict(dataset=load_dataset('digits', "
            "im_size=(8, 8), channels=1).subset(200), model='ConvNetW8', num_experts=int(sys.argv[3]), "
            "epochs=int(sys.argv[4]), device=sys.argv[5], progress=False, log=no_log))")
    return _run([sys.executable, "-c", code, str(store), str(nproc), str(args.experts), str(args.epochs), args.device])


if __name__ == "__main__":
    main()
