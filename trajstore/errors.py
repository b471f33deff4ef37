"""Exception types. Every failure trajstore reports is one of these, naming the file and the problem."""

from __future__ import annotations

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
