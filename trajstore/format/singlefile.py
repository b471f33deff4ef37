"""The single-file form: an uncompressed zip of the directory form, every member 64-byte aligned.

Alignment lets the reader memory-map anchor tensors in place; zarr reads the same file with ZipStore.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from ..errors import ExistsError, TrajstoreError, os_errors
from ..stores import atomic
from ..stores.location import Location
from ..stores.overlap import check_separate

ALIGN = 64
PAD_EXTRA_ID = 0xD935  # the id Android's zipalign uses for padding; readers skip unknown extras


def write_single_file(src_dir: Path, dst: Path, *, overwrite: bool = False) -> None:
    src_dir, dst = Path(src_dir), Path(dst)
    links = [p for p in src_dir.rglob("*") if p.is_symlink()]
    if links:  # the single file must hold the store's own bytes, never a file a link points to
        raise TrajstoreError("is a symbolic link; the single-file form is made only of the store's own files "
                             "(copy the target into the store first)", links[0])
    with atomic.Scratch(dst, "tmp") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in sorted(src_dir.rglob("*")):
                if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src_dir).parts):
                    continue
                name = str(path.relative_to(src_dir)).replace(os.sep, "/")
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                start = zf.fp.tell() + 30 + len(name.encode()) + 4
                pad = -start % ALIGN
                info.extra = struct.pack("<HH", PAD_EXTRA_ID, pad) + b"\0" * pad
                with open(path, "rb") as f:
                    zf.writestr(info, f.read())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        atomic.publish_file(tmp, dst, overwrite=overwrite)


def publish_single_file(src_dir: Path, target: Location, *, overwrite: bool = False) -> None:
    """The single-file form of src_dir at a local path or a URL: a remote file is zipped locally and
    uploaded as one object (a PUT is all or nothing), never modified in place."""
    if target.path is not None:
        write_single_file(src_dir, target.path, overwrite=overwrite)
        return
    if target.exists() and not overwrite:
        raise ExistsError("already exists (pass overwrite=True / --force to replace it)", target.url)
    scratch = Path(src_dir) / ".upload.zip"  # hidden: not zipped into itself; removed with the build if killed
    try:
        write_single_file(src_dir, scratch, overwrite=True)
        target.fs.put_file(str(scratch), target.fs_path)
    except (OSError, ValueError) as exc:
        raise TrajstoreError(f"cannot upload ({type(exc).__name__}: {exc})", target.url) from None
    finally:
        scratch.unlink(missing_ok=True)


def extract_single_file(src: Path, dst_dir: Path, *, overwrite: bool = False) -> None:
    with atomic.Scratch(Path(dst_dir)) as tmp:
        with zipfile.ZipFile(src) as zf:
            zf.extractall(tmp)
        atomic.publish_dir(tmp, Path(dst_dir), overwrite=overwrite)


@os_errors(arg="dst")
def to_single_file(src, dst, *, overwrite: bool = False) -> Path:
    """Write the single-file form of a directory .ctraj (which must open cleanly first)."""
    from .reader import open as open_ctraj

    check_separate([src], dst)
    open_ctraj(src).verify()
    write_single_file(Path(src), Path(dst), overwrite=overwrite)
    return Path(dst)


@os_errors(arg="dst")
def to_directory(src, dst, *, overwrite: bool = False) -> Path:
    """Unpack a single-file .ctraj into the directory form."""
    from .reader import open as open_ctraj

    check_separate([src], dst)
    open_ctraj(src).verify()
    extract_single_file(Path(src), Path(dst), overwrite=overwrite)
    return Path(dst)
