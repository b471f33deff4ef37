"""A legacy buffer at a URL (s3://, gs://, memory://, ...), read through a local copy.

Legacy buffers are pickles that `torch.load(weights_only=True)` reads from a local file (memory-mapped),
and every tool that reads one (pack, convert, inspect, MTT distillation) goes through whole files, so
the buffer's files are downloaded once into a temporary directory, opened as a local buffer, and
deleted when the buffer is no longer used. Only buffer files are fetched (`*_N.pt` with the names of
trajstore.legacy.discovery), under their last directory names: the MTT layout
`{dataset}[_NO_ZCA]/{model}/` says how the experts were trained.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

from ..errors import FormatError
from .discovery import DENSE, NUMBERED, PAIRED


def _buffer_file(name: str) -> bool:
    m = NUMBERED.match(name)
    return bool(m) and bool(DENSE.match(m["stem"]) or PAIRED.match(m["stem"]))


def _partner(name: str) -> str | None:
    """The other half of an MCT waypoint/step pair, which is only read together with it."""
    m = NUMBERED.match(name)
    pm = PAIRED.match(m["stem"]) if m else None
    if not pm:
        return None
    other = "step" if pm["side"] == "waypoint" else "waypoint"
    return f"{other}_buffer{pm['tag'] or ''}_{m['n']}.pt"


def fetch(location) -> tuple[Path, Path]:
    """(the local copy of the buffer file or directory at `location`, the temporary directory holding
    it, to remove afterwards)."""
    fs, root = location.fs, location.fs_path.rstrip("/")
    names = root.split("/")
    try:
        is_file = fs.isfile(root)
        if is_file:
            parent = root.rsplit("/", 1)[0]
            wanted = [root] + [f"{parent}/{p}" for p in [_partner(names[-1])] if p and fs.isfile(f"{parent}/{p}")]
        elif fs.isdir(root):
            wanted = sorted(p for p in fs.find(root) if _buffer_file(p.rsplit("/", 1)[-1]))
            if not wanted:
                raise FormatError("no legacy buffer files (replay_buffer_N.pt, ...) in or below it", location.url)
        else:
            raise FormatError("no such buffer file or directory", location.url)
    except FormatError:
        raise
    except Exception as exc:  # network and permission failures come in many types
        raise FormatError(f"cannot reach ({type(exc).__name__}: {exc})", location.url) from None
    keep = names[-3:] if is_file else names[-2:]  # the names that say dataset and model
    tmp = Path(tempfile.mkdtemp(prefix="trajstore-legacy-"))
    local = tmp.joinpath(*keep)
    base = root.rsplit("/", 1)[0] if is_file else root
    try:
        for remote in wanted:
            dest = (local.parent if is_file else local) / remote[len(base) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FormatError(f"cannot download the buffer ({type(exc).__name__}: {exc})", location.url) from None
    return local, tmp


def open_remote_buffer(location, *, architecture=None, kind: str | None = None):
    """The legacy buffer at a URL Location, read from a temporary local copy that is removed with it."""
    from . import open_buffer

    local, tmp = fetch(location)
    try:
        buf = open_buffer(local, architecture=architecture, kind=kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(buf, shutil.rmtree, tmp, True)
    buf.path = location.url
    return buf
