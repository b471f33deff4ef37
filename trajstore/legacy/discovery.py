"""Finding a legacy buffer's files from a file, a model directory or a whole buffer root.

Names (docs/legacy-formats.md §1, §5): MTT-family `replay_buffer_{n}.pt`; the official MCT code's dense
`convexified[_v{k}]_replay_buffer_{n}.pt` and its pairs `waypoint_buffer[_{tag}]_{n}.pt` +
`step_buffer[_{tag}]_{n}.pt` (tag `ip{K}`, `uni`, `dec`, `proj`). Files are taken in numeric order.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError

# ASCII digits only: "replay_buffer_\u0667.pt" (an Arabic-Indic 7) is not file 7
NUMBERED = re.compile(r"^(?P<stem>.+?)_(?P<n>[0-9]+)\.pt$")
DENSE = re.compile(r"^(?:replay_buffer|convexified(?:_v[0-9]+)?_replay_buffer)$")
PAIRED = re.compile(r"^(?P<side>waypoint|step)_buffer(?P<tag>_[A-Za-z0-9]+)?$")
RAW = "replay_buffer"


@dataclass
class Found:
    """One buffer: its kind (the file stem, e.g. "replay_buffer", "waypoint_buffer_ip4") and files."""

    kind: str
    files: list[Path]
    steps: list[Path] = field(default_factory=list)  # the step_buffer partner of each waypoint file

    @property
    def paired(self) -> bool:
        return self.kind.startswith("waypoint_buffer")

    @property
    def directory(self) -> Path:
        return self.files[0].parent


def _kinds(directory: Path) -> dict[str, dict[int, Path]]:
    """kind -> {number: file} for the buffer files directly inside `directory`."""
    kinds: dict[str, dict[int, Path]] = defaultdict(dict)
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise FormatError(f"cannot list the directory ({exc.strerror or exc})", directory) from None
    for p in entries:
        m = NUMBERED.match(p.name)
        if not m or not p.is_file():
            continue
        stem, n = m["stem"], int(m["n"])
        if DENSE.match(stem) or PAIRED.match(stem):
            if n in kinds[stem]:  # replay_buffer_7.pt and replay_buffer_007.pt: which one is file 7?
                raise FormatError(f"{kinds[stem][n].name} and {p.name} both number file {n}; rename or remove "
                                  "one of them (files are numbered 0, 1, 2, ... without leading zeros)", directory)
            kinds[stem][n] = p
    return kinds


def _pairs(kinds: dict[str, dict[int, Path]], directory: Path) -> dict[str, Found]:
    """Join waypoint and step files into one kind per tag; dense kinds pass through."""
    found: dict[str, Found] = {}
    for stem, files in kinds.items():
        m = PAIRED.match(stem)
        if not m:
            found[stem] = Found(stem, [files[n] for n in sorted(files)])
        elif m["side"] == "waypoint":
            partner = kinds.get(f"step_buffer{m['tag'] or ''}", {})
            missing = sorted(set(files) ^ set(partner))
            if missing:
                n = missing[0]
                lonely = files.get(n) or partner[n]
                raise FormatError(f"{lonely.name} has no {'step' if n in files else 'waypoint'}_buffer partner; "
                                  "the official MCT store keeps waypoint_buffer_N.pt and step_buffer_N.pt in pairs",
                                  directory)
            order = sorted(files)
            found[stem] = Found(stem, [files[n] for n in order], [partner[n] for n in order])
        elif f"waypoint_buffer{m['tag'] or ''}" not in kinds:
            raise FormatError(f"{stem}_N.pt files without their waypoint_buffer partners", directory)
    return found


def _numbers_gap(found: Found) -> None:
    numbers = [int(NUMBERED.match(p.name)["n"]) for p in found.files]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        warnings.warn(f"{found.directory}: {found.kind} files are not numbered 0..{len(numbers) - 1} "
                      f"(missing {missing[:5]}); upstream readers stop at the first gap, trajstore reads all "
                      f"{len(numbers)} files in numeric order", stacklevel=3)


def _choose(found: dict[str, Found], directory: Path, kind: str | None) -> Found:
    if kind is not None:
        if kind not in found:
            raise FormatError(f"holds no {kind} files (found: {', '.join(sorted(found)) or 'none'})", directory)
        return found[kind]
    if RAW in found:
        others = sorted(k for k in found if k != RAW)
        if others:
            warnings.warn(f"{directory}: reading the original {RAW} files; it also holds {', '.join(others)} "
                          "(pass kind= / point at one of those files to read them instead)", stacklevel=3)
        return found[RAW]
    if len(found) > 1:
        raise FormatError(f"holds several buffers ({', '.join(sorted(found))}); pass kind= or point at one file",
                          directory)
    return next(iter(found.values()))


def discover(path: str | os.PathLike, kind: str | None = None) -> Found:
    """The buffer at `path`: a buffer file, a model directory, or a root holding one model directory."""
    path = Path(path)
    if path.is_file():
        m = NUMBERED.match(path.name)
        stem = m["stem"] if m else None
        pm = PAIRED.match(stem) if stem else None
        if pm:
            tag = pm["tag"] or ""
            pair = _pairs(_kinds(path.parent), path.parent)[f"waypoint_buffer{tag}"]
            index = (pair.files if pm["side"] == "waypoint" else pair.steps).index(path)
            return Found(pair.kind, [pair.files[index]], [pair.steps[index]])
        return Found(stem if stem and DENSE.match(stem) else RAW, [path])
    if not path.is_dir():
        raise FormatError("no such buffer file or directory", path)
    found = _pairs(_kinds(path), path)
    if not found:
        holders = sorted({Path(d) for d, _, _ in os.walk(path) if _kinds(Path(d))})
        if not holders:
            raise FormatError("no legacy buffer files (replay_buffer_N.pt, convexified_replay_buffer_N.pt, "
                              "waypoint_buffer_N.pt + step_buffer_N.pt) in or below it", path)
        if len(holders) > 1:
            listing = ", ".join(str(h.relative_to(path)) for h in holders[:8]) + (", ..." if len(holders) > 8 else "")
            raise FormatError(f"holds {len(holders)} buffer directories ({listing}); point at one of them", path)
        path = holders[0]
        found = _pairs(_kinds(path), path)
    chosen = _choose(found, path, kind)
    _numbers_gap(chosen)
    return chosen


def training_from_path(directory: Path) -> dict:
    """What the MTT directory convention `{dataset}[_NO_ZCA]/{model}/` says about training, if anything.

    Upstream appends `_NO_ZCA` for CIFAR10/CIFAR100/Tiny when whitening was off, so those names without
    the suffix mean ZCA was on. SelMatch drops the suffix; pass `training=` to the converter to correct it.
    """
    parent = directory.parent.name
    dataset, no_zca = (parent[: -len("_NO_ZCA")], True) if parent.endswith("_NO_ZCA") else (parent, False)
    if dataset in ("CIFAR10", "CIFAR100", "Tiny"):
        return {"dataset": dataset, "zca": not no_zca, "inferred_from": "directory name"}
    if no_zca:
        info = {"zca": False, "inferred_from": "directory name"}
        return info if dataset == "buffer" else {"dataset": dataset, **info}
    return {}
