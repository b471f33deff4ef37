"""Atomic file and directory publication: readers see the old state or the new, never a half write."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, so scratch is never swept there
    fcntl = None

from ..errors import ExistsError


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name next to path, on the same filesystem, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


class Scratch:
    """A hidden sibling of `path` to build its replacement in (a directory or a file), marked as in use for
    as long as this process lives, and removed on `release` unless it was published (moved into place).

    A build killed outright (SIGKILL, power, OOM) cannot remove its scratch, which may hold gigabytes. So
    beside it lies `<scratch name>.lock`, flock()ed by this process and naming this host: the kernel drops
    the lock when the process dies, however it dies. Making a Scratch for a path first removes every
    scratch of that path whose lock is free and names this host: what killed builds left, never a build
    still running in this process or another. A lock naming another host is left alone, since a file
    system may keep flock locks per machine (NFS `nolock`, Lustre `localflock`).
    """

    def __init__(self, path: Path, tag: str = "build"):
        _sweep(path)
        self.path = temp_sibling(path, tag)
        self._lock = _hold(self.path)

    def release(self) -> None:
        remove(self.path)
        if self._lock is not None:  # the lock goes last: until then no one sweeps a half-removed scratch
            _lock_name(self.path).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_name(scratch: Path) -> Path:
    return scratch.with_name(f"{scratch.name}.lock")


def _hold(scratch: Path):
    """The open, locked lock file of scratch (None without flock: then it is never swept). It is locked
    under another name and then renamed, so a sweep never finds it unlocked while its build is alive."""
    if fcntl is None:
        return None
    pending = scratch.with_name(f"{scratch.name}.lock-new")
    lock = open(pending, "xb")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        except OSError:  # a file system without flock (some FUSE mounts)
            lock.close()
            pending.unlink(missing_ok=True)
            return None
        lock.write(socket.gethostname().encode())
        lock.flush()
        os.rename(pending, _lock_name(scratch))
    except BaseException:
        lock.close()
        pending.unlink(missing_ok=True)
        raise
    return lock


def _sweep(path: Path) -> None:
    """Remove the scratch of `path` that dead builds on this host left, and theirs (a build may hold its
    own scratch beside it: a single-file build in a convert's): best effort, never an error."""
    if fcntl is None:
        return
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z]+-[0-9a-f]{{12}}\.lock")  # temp_sibling's names
    try:
        names = [e.name for e in os.scandir(path.parent) if ours.fullmatch(e.name)]
    except OSError:
        return
    host = socket.gethostname().encode()
    for name in names:
        lock_path = path.parent / name
        try:
            with open(lock_path, "rb") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its build is alive
                    continue
                if lock.read() != host:
                    continue
                dead = path.parent / name.removesuffix(".lock")
                remove(dead)
                _sweep(dead)
                lock_path.unlink(missing_ok=True)
        except OSError:  # gone meanwhile (another sweep), or not ours to remove
            continue


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
