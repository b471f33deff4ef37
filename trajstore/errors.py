"""Exception types. Every failure trajstore reports is one of these, naming the file and the problem."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os


class TrajstoreError(Exception):
    """Base class: something is wrong with a trajectory store, a legacy buffer or an argument."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(TrajstoreError):
    """The file is missing, truncated, malformed, or not what it claims to be."""


class ChecksumError(FormatError):
    """A file's bytes no longer match the sha256 recorded when it was written."""


class VersionError(FormatError):
    """The file was written by a newer format version than this trajstore reads."""


class ExistsError(TrajstoreError, FileExistsError):
    """The output already exists and overwriting was not asked for."""


class InvalidTensorError(TrajstoreError, ValueError):
    """A tensor handed to a writer has the wrong name, shape, dtype, or non-finite values."""


class OutOfRangeError(TrajstoreError, IndexError):
    """An expert index or a trajectory position c lies outside the store."""


class IndexTypeError(TrajstoreError, TypeError):
    """An index into a store or an expert is neither an integer nor a slice."""


class UnsafeFileError(FormatError):
    """A legacy file needs more than plain tensors to load; it was refused without running any of it."""


class DegenerateTrajectoryError(FormatError):
    """A legacy trajectory cannot be convexified: aliased, constant, ragged, or inconsistent."""


class StorageError(TrajstoreError, OSError):
    """The operating system refused a read or write: permissions, a full disk, a read-only file system."""


# what to do next, by errno: the OS message alone ("Errno 28") does not say it
_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another location",
    errno.EFBIG: "the file is too large for this file system or the process's file size limit",
}


def from_os_error(exc: OSError, path: str | os.PathLike | None = None) -> TrajstoreError:
    """One trajstore error for an OSError, naming the file the OS named (else `path`) and what to do."""
    if isinstance(exc, TrajstoreError):
        return exc
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno)
    return StorageError(f"{reason}; {hint}" if hint else reason, where)


class os_errors(contextlib.ContextDecorator):
    """Turn OSErrors raised inside into `StorageError`s naming the file (trajstore errors pass through).

    The file is the one the OS names, else `path`; as a decorator, `arg` names the function's argument
    that holds the path (the output a failed write most likely concerns).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, arg: str | None = None):
        self.path = path
        self.arg = arg

    def __call__(self, func):
        if self.arg is None:
            return super().__call__(func)
        signature = inspect.signature(func)

        @functools.wraps(func)
        def inner(*args, **kwargs):
            with os_errors(signature.bind_partial(*args, **kwargs).arguments.get(self.arg)):
                return func(*args, **kwargs)

        return inner

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError) and not isinstance(exc, TrajstoreError):
            raise from_os_error(exc, self.path) from None
        return False
