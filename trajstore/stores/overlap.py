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


def _remote_key(location) -> tuple[tuple[str, ...], str]:
    protocol = location.fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return tuple(sorted(protocols)), location.fs_path.rstrip("/")


def check_targets_separate(inputs, out, what: str = "the output") -> None:
    """`check_separate` for Locations (trajstore.stores.location.locate), local or URLs: a URL overlaps
    another of the same filesystem type whose path equals, holds or lies inside its own (s3://b/x and
    s3://b/x/y); a URL and a local path never overlap."""
    if out.path is not None:
        check_separate([src.path for src in inputs if src.path is not None], out.path, what)
        return
    protocols, path = _remote_key(out)
    for src in inputs:
        if src.path is not None or _remote_key(src)[0] != protocols:
            continue
        other = _remote_key(src)[1]
        if other == path:
            relation = "is the input"
        elif other.startswith(path + "/"):
            relation = "contains the input"
        elif path.startswith(other + "/"):
            relation = "lies inside the input"
        else:
            continue
        raise TrajstoreError(f"{what} {relation} {src.url}; choose an output outside it (the input is never "
                             "replaced, even with --force)", out.url)
