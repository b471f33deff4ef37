"""Atomic file and directory publication: readers see the old state or the new, never a half write."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
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


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE): each name holds the
    other's tree at every instant. False where the system or the file system cannot (nothing changed)."""
    renameat2 = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def publish_dir(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Move a finished directory into place; with overwrite, the old tree is removed only afterwards.

    A replace swaps the two in one step where the system can (Linux), so `path` holds the old tree or
    the new one at every instant, also if the process dies; elsewhere the old tree is renamed aside
    first, and a crash between the two renames leaves it under its hidden `.<name>.old-*` sibling.
    """
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ExistsError("already exists (pass overwrite=True / --force to replace it)", path)
        if exchange(tmp, path):
            remove(tmp)  # now the old tree
            return
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
