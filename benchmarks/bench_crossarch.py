"""Cross-architecture table of distilled sets (the papers' "cross-architecture generalization" table).

Each set is evaluated on each network with the family's protocol (distill.evaluate, the set's own
learned lr), one (network, set) cell per worker process so a multi-core machine runs them side by side.

    python -m benchmarks.bench_crossarch --set MCT=trajstore-quickstart/mct/synset_final.safetensors
        --set MTT=trajstore-quickstart/mtt/synset_final.safetensors
        [--models ConvNetW32,ConvNet,MLP,AlexNet,ResNet18_AP,ResNet18,VGG11] [--nets 5] [--epochs 300]
        [--workers 2] [--out benchmarks/results/crossarch.json]

Besides the JSON, the table goes to the same path with .md and .png.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import write_result
from trajstore import architectures
from trajstore.distill.crossarch import CrossArchTable, cross_architecture, parse_models, write_report
from trajstore.distill.evaluate import evaluate_file


def _one_cell(model: str, sets: dict[str, str], nets: int, epochs: int, seed: int) -> CrossArchTable:
    """One network on the given sets (one set per call when the work is spread over processes)."""
    torch.set_num_threads(1)  # one process per cell: see distill.quickstart
    evaluators = {name: (lambda m, path=path: evaluate_file(path, model=m, num_nets=nets, epochs=epochs, seed=seed,
                                                           progress=False)) for name, path in sets.items()}
    return cross_architecture(evaluators, [model], log=lambda line: print(line, flush=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", required=True, help="NAME=PATH of a distilled set (repeatable)")
    p.add_argument("--models", default="ConvNetW32,ConvNet,MLP,AlexNet,ResNet18_AP,ResNet18,VGG11")
    p.add_argument("--nets", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/crossarch.json")
    args = p.parse_args(argv)
    sets = dict(item.split("=", 1) for item in args.set)
    models = parse_models(args.models)
    cells: dict[str, dict] = {m: {} for m in models}
    if args.workers > 1:
        # one (network, set) cell per task, the biggest networks first, so the workers finish together
        order = sorted(((m, name) for m in models for name in sets), key=lambda c: -architectures.spec_for(c[0]).num_params())
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = {(m, name): pool.submit(_one_cell, m, {name: sets[name]}, args.nets, args.epochs, args.seed)
                       for m, name in order}
            for (m, name), future in futures.items():
                cells[m][name] = future.result().cells[m][name]
    else:
        for m in models:
            cells[m] = dict(_one_cell(m, sets, args.nets, args.epochs, args.seed).cells[m])
    cells = {m: {name: cells[m][name] for name in sets} for m in models}  # the sets' order in every row
    table = CrossArchTable(tuple(sets), models, cells,
                           {"nets": args.nets, "epochs": args.epochs, "seed": args.seed, "sets": sets})
    print(table)
    out = Path(args.out)
    write_report(table, out.with_suffix(""), overwrite=True)  # .md and .png beside the JSON (rewritten below)
    return write_result(out, "crossarch", vars(args), table.to_json())


if __name__ == "__main__":
    main()
