"""Read access to the bytes of a .ctraj, in its directory form or its single-file (zip) form.

Both expose the same keys ("zarr.json", "experts/000003/anchor_0006.safetensors", ...), so the
reader never knows which form it reads. Another backend (an fsspec URL) needs only these methods.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from pathlib import Path

from ..errors import FormatError

ZIP_MAGIC = b"PK\x03\x04"


def _map_file(path: Path, what: str) -> mmap.mmap | bytes:
    # ACCESS_COPY gives a writable (copy-on-write) view, so torch.frombuffer shares it without
    # complaint while the file itself can never be modified through it.
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise FormatError(f"{what} is missing", path) from None
    except OSError as exc:
        raise FormatError(f"cannot read {what}: {exc}", path) from None


class DirectoryStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self):
        return f"DirectoryStore({str(self.root)!r})"

    def describe(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise FormatError("file is missing", self.root / key) from None
        except OSError as exc:
            raise FormatError(f"cannot read: {exc}", self.root / key) from None

    def mapped(self, key: str) -> memoryview:
        return memoryview(_map_file(self.root / key, "file"))

    def listdir(self, prefix: str) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / prefix).iterdir())
        except FileNotFoundError:
            return []

    def files(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(str(p.relative_to(self.root)).replace(os.sep, "/")
                      for p in base.rglob("*") if p.is_file())

    def size(self, key: str) -> int:
        return (self.root / key).stat().st_size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def zarr_store(self):
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=True)


class ZipFileStore:
    """An uncompressed zip whose members are memory-mapped in place (members are 64-byte aligned)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except Exception as exc:  # a corrupt central directory fails with many types, not only BadZipFile
            raise FormatError(f"not a readable single-file .ctraj ({type(exc).__name__}: {exc})", self.path) from None
        self._infos = {i.filename: i for i in infos if not i.is_dir()}
        self._map = _map_file(self.path, "single-file .ctraj")
        self._offsets: dict[str, int] = {}

    def __repr__(self):
        return f"ZipFileStore({str(self.path)!r})"

    def describe(self, key: str) -> str:
        return f"{self.path}!{key}"

    def exists(self, key: str) -> bool:
        return key in self._infos

    def _data_offset(self, key: str) -> tuple[int, int]:
        info = self._infos.get(key)
        if info is None:
            raise FormatError("member is missing", self.describe(key))
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError("member is compressed; single-file .ctraj members must be stored",
                              self.describe(key))
        if key not in self._offsets:
            header = bytes(self._map[info.header_offset : info.header_offset + 30])
            if len(header) < 30 or header[:4] != ZIP_MAGIC:
                raise FormatError("bad local zip header (truncated file?)", self.describe(key))
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[key] = info.header_offset + 30 + name_len + extra_len
        start = self._offsets[key]
        if start + info.file_size > len(self._map):
            raise FormatError("member runs past the end of the file (truncated?)", self.describe(key))
        return start, info.file_size

    def read_bytes(self, key: str) -> bytes:
        start, size = self._data_offset(key)
        return bytes(self._map[start : start + size])

    def mapped(self, key: str) -> memoryview:
        start, size = self._data_offset(key)
        return memoryview(self._map)[start : start + size]

    def listdir(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/"
        names = {k[len(prefix):].split("/", 1)[0] for k in self._infos if k.startswith(prefix)}
        return sorted(names)

    def files(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/"
        return sorted(k for k in self._infos if k.startswith(prefix))

    def size(self, key: str) -> int:
        return self._infos[key].file_size

    def total_bytes(self) -> int:
        return self.path.stat().st_size

    def zarr_store(self):
        from zarr.storage import ZipStore

        return ZipStore(self.path, mode="r")


def open_store(path: str | os.PathLike):
    p = Path(path)
    if p.is_dir():
        return DirectoryStore(p)
    if not p.exists():
        raise FormatError("no such .ctraj (neither a directory nor a file)", p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        raise FormatError("not a .ctraj: neither a directory nor a single-file (zip) .ctraj", p)
    return ZipFileStore(p)
