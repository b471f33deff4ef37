"""Atomic file and directory publication: readers see the old state or the new, never a half write."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import ExistsError


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name next to path, on the same filesystem, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def write_bytes(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_file(tmp, path, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def publish_file(tmp: Path, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists, unlike rename
    except FileExistsError:
        raise ExistsError("already exists (pass overwrite=True / --force to replace it)", path) from None
    tmp.unlink()


def publish_dir(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Move a finished directory into place; with overwrite, the old tree is removed only afterwards."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ExistsError("already exists (pass overwrite=True / --force to replace it)", path)
        old = temp_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        remove(old)
        return
    try:
        os.rename(tmp, path)
    except OSError as exc:  # a non-empty directory appeared meanwhile (another writer)
        raise ExistsError(f"already exists ({exc.strerror})", path) from None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
