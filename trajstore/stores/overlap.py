"""Refusing an output that overlaps an input: the one check every command that reads one location
and writes another makes before writing (and whatever `--force` says).

Replacing an output removes it, so an output equal to an input, inside it, or holding it (a parent
directory) would destroy the input or unrelated files beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import TrajstoreError


def _real(path: str | os.PathLike) -> Path:
    # symlinks resolved (also a dangling one, to where it points) and ".." removed
    return Path(os.path.realpath(os.fspath(path)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and bind mounts that realpath cannot see
    except OSError:
        return False


def check_separate(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, what: str = "the output") -> None:
    """TrajstoreError unless `out` is neither an input, nor inside one, nor a directory holding one."""
    out_real = _real(out)
    for src in inputs:
        src_real = _real(src)
        if out_real == src_real or _same_file(src_real, out_real):
            relation = "is the input"
        elif out_real in src_real.parents:
            relation = "contains the input"
        elif src_real in out_real.parents:
            relation = "lies inside the input"
        else:
            continue
        raise TrajstoreError(f"{what} {relation} {src}; choose an output outside it (the input is never "
                             "replaced, even with --force)", out)
