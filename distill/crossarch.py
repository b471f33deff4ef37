"""Cross-architecture evaluation: the table every MTT-family paper prints.

A set distilled with one network is evaluated on others, each trained from scratch on the set with the
family's protocol (distill.evaluate; the set's learned lr for every network, as upstream's
`model_eval_pool` loop does). One row per network, one column per set, each cell the mean +- std test
accuracy over the evaluation networks. A network that cannot take the set's images (ResNet18 and VGG11
need at least 32x32 pixels in upstream's definitions) gets a row that says so instead of a number.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from trajstore import architectures
from trajstore.errors import ExistsError, TrajstoreError
from trajstore.stores import atomic

from .evaluate import EvalResult
from .networks import ModelError

SUFFIXES = (".json", ".md", ".png")


@dataclass(frozen=True)
class Cell:
    """One network on one set: its accuracies, or why it could not be trained."""

    result: EvalResult | None
    seconds: float = 0.0
    skipped: str | None = None

    def text(self) -> str:
        if self.result is None:
            return f"n/a ({self.skipped})"
        return f"{100 * self.result.mean:.2f} +- {100 * self.result.std:.2f}"


@dataclass(frozen=True)
class CrossArchTable:
    """rows[model][set name] -> Cell, in the order given."""

    sets: tuple[str, ...]
    models: tuple[str, ...]
    cells: Mapping[str, Mapping[str, Cell]]
    settings: Mapping[str, object]

    def markdown(self) -> str:
        nets = sorted({len(c.result.accuracies) for row in self.cells.values() for c in row.values() if c.result})
        head = "| network | " + " | ".join(f"{s} (%)" for s in self.sets) + " |"
        lines = [head, "|---|" + "---:|" * len(self.sets)]
        for model in self.models:
            lines.append(f"| {model} | " + " | ".join(self.cells[model][s].text() for s in self.sets) + " |")
        count = "/".join(str(n) for n in nets) or "0"
        return "\n".join(lines) + f"\n\nmean +- std test accuracy over {count} evaluation networks per cell"

    def __str__(self) -> str:
        width = max(len(m) for m in self.models)
        cols = [max(len(s), *(len(self.cells[m][s].text()) for m in self.models)) for s in self.sets]
        lines = [" ".join([f"{'network':<{width}}", *(f"{s:>{w}}" for s, w in zip(self.sets, cols))])]
        for m in self.models:
            lines.append(" ".join([f"{m:<{width}}", *(f"{self.cells[m][s].text():>{w}}"
                                                      for s, w in zip(self.sets, cols))]))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"sets": list(self.sets), "models": list(self.models), "settings": dict(self.settings),
                "cells": {m: {s: {"result": asdict(c.result) if c.result else None, "seconds": c.seconds,
                                  "skipped": c.skipped} for s, c in row.items()} for m, row in self.cells.items()}}


def parse_models(models: str | Sequence[str]) -> tuple[str, ...]:
    """"ConvNet,ResNet18" -> ("ConvNet", "ResNet18"); every name must be a known network."""
    names = tuple(m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip())
    if not names:
        raise TrajstoreError("no networks given: e.g. --models ConvNet,ResNet18,VGG11,AlexNet")
    if len(set(names)) != len(names):
        raise TrajstoreError(f"a network is named twice in {','.join(names)}")
    for name in names:
        try:
            architectures.family_of(name)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
    return names


def cross_architecture(sets: Mapping[str, Callable[[str], EvalResult]], models: str | Sequence[str], *,
                       settings: Mapping[str, object] | None = None,
                       log: Callable[[str], object] = print) -> CrossArchTable:
    """Evaluate every set (name -> evaluate(model) -> EvalResult) on every network, network by network."""
    names = parse_models(models)
    cells: dict[str, dict[str, Cell]] = {}
    for model in names:
        cells[model] = {}
        for set_name, evaluate in sets.items():
            began = time.perf_counter()
            try:
                result = evaluate(model)
            except ModelError as exc:  # known network, but not for these images: said in its row
                cells[model][set_name] = Cell(None, skipped=str(exc))
            else:
                cells[model][set_name] = Cell(result, time.perf_counter() - began)
            log(f"{model} on {set_name}: {cells[model][set_name].text()}")
    return CrossArchTable(tuple(sets), names, cells, dict(settings or {}))


def report_paths(prefix: str | os.PathLike) -> list[Path]:
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def check_report(prefix: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any training, to replace an earlier report unless asked."""
    existing = [p for p in report_paths(prefix) if p.exists()]
    if existing and not overwrite:
        raise ExistsError("exists; pass overwrite=True / --force to replace the report", existing[0])


def write_report(table: CrossArchTable, prefix: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """PREFIX.json, PREFIX.md and PREFIX.png (a bar chart with the std as error bars)."""
    check_report(prefix, overwrite)
    json_path, md_path, png_path = report_paths(prefix)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(md_path, (table.markdown() + "\n").encode())
    _plot(table, png_path)
    atomic.write_bytes(json_path, json.dumps(table.to_json(), indent=2).encode())
    return [json_path, md_path, png_path]


def _plot(table: CrossArchTable, png: Path) -> None:
    from matplotlib.figure import Figure

    from .synset import save_figure

    fig = Figure(figsize=(1.4 + 1.2 * len(table.models) * max(1, len(table.sets)) / 2, 4))
    ax = fig.subplots()
    width = 0.8 / len(table.sets)
    for k, name in enumerate(table.sets):
        xs, means, stds = [], [], []
        for i, model in enumerate(table.models):
            cell = table.cells[model][name]
            if cell.result is not None:
                xs.append(i + (k - (len(table.sets) - 1) / 2) * width)
                means.append(100 * cell.result.mean)
                stds.append(100 * cell.result.std)
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(table.models)), table.models)
    ax.set(ylabel="test accuracy (%)", title="cross-architecture evaluation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, png, overwrite=True)
