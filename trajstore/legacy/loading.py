"""Safe, bounded-memory loading of legacy `.pt` files.

Legacy buffers are pickles. They are loaded only with `torch.load(weights_only=True)`, which refuses
anything but plain containers and tensors before running it; zip-format files are memory-mapped, so a
trajectory's bytes are read from disk when touched and `release` hands them back afterwards.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import FormatError, UnsafeFileError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # torch's pre-1.6 format starts with a protocol-2 pickle
MADV_DONTNEED = 4
HASH_CHUNK = 1 << 20


def load(path: str | Path, *, quiet: bool = False) -> tuple[object, bool]:
    """(the file's object, whether its tensors are memory-mapped); one trajstore error on any failure.

    `quiet` marks a file loaded (and checked) before, when its buffer was opened: it skips the warning
    about files that cannot be mapped and the CRC-32 check of torch's zip format, a pass over the file
    that readers switching files for every sample could not afford each time.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise FormatError("file is missing", path) from None
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror}", path) from None
    if not magic:
        raise FormatError("file is empty (0 bytes)", path)
    mapped = magic == ZIP_MAGIC
    if not mapped:
        if not magic.startswith(PICKLE_MAGIC):
            raise FormatError("not a torch file (neither torch's zip format nor its legacy pickle format)", path)
        if not quiet:
            warnings.warn(f"{path}: written in torch's pre-1.6 format, which cannot be memory-mapped; "
                          "it is read whole into memory", stacklevel=3)
    if mapped and not quiet:
        check_zip_crcs(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # a corrupt zip or pickle fails with many types (struct.error, Unicode..., ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"cannot be read as a torch file; truncated or corrupt? ({first})", path) from None
    return obj, mapped


def check_zip_crcs(path: Path) -> None:
    """Compare every record of a torch zip file with the CRC-32 its zip directory records. torch reads
    a memory-mapped file without checking them, so a changed byte would otherwise load as a different
    number. Records written without a CRC (`torch.serialization.set_crc32_options(False)` records 0)
    cannot be checked; the pre-1.6 pickle format has no checksum at all."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0:
                    continue
                with zf.open(info) as f:  # raises BadZipFile at the end of a record that does not match
                    while f.read(HASH_CHUNK):
                        pass
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror or exc}", path) from None
    except Exception as exc:  # BadZipFile, and whatever a corrupt zip directory makes zipfile raise
        raise FormatError(f"truncated or corrupt torch file ({type(exc).__name__}: {exc}): damaged after it "
                          "was written; restore it from a copy", path) from None


def _refusal(path: Path, exc: Exception) -> FormatError:
    """Name what the weights-only unpickler refused; nothing of the file has run."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # a static scan of the opcodes
    except Exception:
        unsafe = []
    if unsafe:
        return UnsafeFileError(f"refused without running it: loading needs {', '.join(unsafe)}, not just plain "
                               "lists and tensors (legacy buffers are loaded with weights_only=True)", path)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), lines[-1] if lines else "")
    return FormatError(f"refused: not a file of plain lists and tensors, or corrupt ({reason})", path)


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def release(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of memory-mapped, never-written tensors; the next access re-reads the file.

    Reading a mapped file leaves its pages in the process's resident set until it is unmapped, so a
    pass over a 650 MB buffer file would hold 650 MB. Only whole pages inside each storage are
    dropped. Call it only on tensors of a file loaded with `mapped=True`: on ordinary memory it would
    discard data.
    """
    if _MADVISE is None:
        return
    page = mmap.PAGESIZE
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in seen or size < page:
            continue
        seen.add(ptr)
        start = -(-ptr // page) * page
        end = (ptr + size) // page * page
        if end > start:
            _MADVISE(start, end - start, MADV_DONTNEED)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
