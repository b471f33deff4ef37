"""Local stores: a .ctraj directory (read and write) and the single-file (zip) form (read).

Both expose the same keys ("zarr.json", "experts/000003/anchor_0006.safetensors", ...), so the
reader never knows which form it reads. The zip store reads members through byte ranges of the
file, so the same class reads a single-file .ctraj over fsspec (trajstore.stores.remote).
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid
import zipfile
from pathlib import Path

from ..errors import ExistsError, FormatError
from . import atomic
from .base import Store

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


class DirectoryStore(Store):
    """A directory on a local (or locally mounted) filesystem; anchors are memory-mapped."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def describe(self, key: str) -> str:
        return str(self.root / key) if key else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FormatError("file is missing", self._path(key)) from None
        except OSError as exc:
            raise FormatError(f"cannot read: {exc}", self._path(key)) from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(self.mapped(key)[start:end])

    def mapped(self, key: str) -> memoryview:
        return memoryview(_map_file(self._path(key), "file"))

    def listdir(self, prefix: str) -> list[str]:
        try:
            return sorted(p.name for p in self._path(prefix).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def files(self, prefix: str) -> list[str]:
        found = []
        # os.walk skips a directory that vanishes while it lists (another writer's expert renamed
        # into place), where Path.rglob raises
        for folder, _, names in os.walk(self._path(prefix)):
            found.extend(p for p in (Path(folder, name) for name in names) if p.is_file())
        return sorted(p.relative_to(self.root).as_posix() for p in found)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def present(self) -> bool:
        return self.root.exists() or self.root.is_symlink()

    def make_root(self) -> bool:
        """Create the root directory; False if it exists already (another writer made it first)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.root.mkdir()
        except FileExistsError:
            return False
        return True

    def _parents(self, key: str) -> Path:
        """The path of key, with the directories between the root and it created; never the root
        itself: a store removed while a writer writes to it is an error, not quietly started again
        without its metadata and the files written before."""
        path = self._path(key)
        folder = self.root
        for part in Path(key).parent.parts:
            folder = folder / part
            try:
                folder.mkdir()
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise FormatError("the store was removed while this writer was writing to it (did another "
                                  "process delete it?)", self.root) from None
        return path

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic.write_bytes(self._parents(key), data)

    def create_bytes(self, key: str, data: bytes) -> None:
        atomic.write_bytes(self._parents(key), data, overwrite=False)

    def delete(self, prefix: str) -> None:
        atomic.remove(self._path(prefix))

    def stage(self, final: str) -> str:
        parent, _, name = final.rpartition("/")
        return f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:8]}" if parent else f".tmp-{name}-{uuid.uuid4().hex[:8]}"

    def publish(self, staged: str, final: str, manifest: str, data: bytes) -> None:
        path = self._path(f"{staged}/{manifest}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        atomic.publish_dir(self._path(staged), self._path(final), overwrite=False)

    def discard(self, staged: str, final: str, manifest: str) -> None:
        atomic.remove(self._path(staged))

    def begin_build(self) -> "ScratchStore":
        """A hidden sibling on the same filesystem, renamed into place when finished."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        built = ScratchStore(atomic.Scratch(self.root))
        built.root.mkdir()
        return built

    def finish_build(self, built: "ScratchStore") -> None:
        atomic.publish_dir(built.root, self.root, overwrite=True)
        built.release()

    def abandon_build(self, built: "ScratchStore") -> None:
        built.release()

    def zarr_store(self, read_only: bool = True, prefix: str = ""):
        from zarr.storage import LocalStore

        return LocalStore(self._path(prefix), read_only=read_only)


class ScratchStore(DirectoryStore):
    """A directory store built in an `atomic.Scratch`: `release` removes it unless it was moved into place,
    and a build killed before that is removed by the next one of the same path."""

    def __init__(self, scratch: atomic.Scratch):
        super().__init__(scratch.path)
        self.release = scratch.release


class ZipFileStore(Store):
    """An uncompressed zip whose members are read in place (members are 64-byte aligned).

    A local file is memory-mapped, so anchor tensors are views of the page cache; any other
    `source` (an fsspec file) is read by byte ranges, the central directory first.
    """

    writable = False

    def __init__(self, path: str | os.PathLike, *, fs=None):
        self._fs = fs
        if fs is None:
            self.path = Path(path)
            self.url = str(self.path)
            opener = lambda: open(self.path, "rb")  # noqa: E731
        else:
            self.path = path
            self.url = fs.unstrip_protocol(path)
            self.remote = True
            opener = lambda: fs.open(path, "rb")  # noqa: E731
        try:
            with opener() as f, zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                self._length = f.seek(0, os.SEEK_END)
        except Exception as exc:  # a corrupt central directory fails with many types, not only BadZipFile
            raise FormatError(f"not a readable single-file .ctraj ({type(exc).__name__}: {exc})", self.url) from None
        self._infos = {i.filename: i for i in infos if not i.is_dir()}
        self._map = _map_file(self.path, "single-file .ctraj") if fs is None else None
        self._offsets: dict[str, int] = {}

    def describe(self, key: str) -> str:
        return f"{self.url}!{key}" if key else self.url

    def _raw(self, start: int, end: int) -> bytes:
        if self._map is not None:
            return bytes(self._map[start:end])
        return self._fs.cat_file(self.path, start=start, end=end)

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
            header = self._raw(info.header_offset, info.header_offset + 30)
            if len(header) < 30 or header[:4] != ZIP_MAGIC:
                raise FormatError("bad local zip header (truncated file?)", self.describe(key))
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[key] = info.header_offset + 30 + name_len + extra_len
        start = self._offsets[key]
        if start + info.file_size > self._length:
            raise FormatError("member runs past the end of the file (truncated?)", self.describe(key))
        return start, info.file_size

    def read_bytes(self, key: str) -> bytes:
        start, size = self._data_offset(key)
        return self._raw(start, start + size)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        begin, size = self._data_offset(key)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        return self._raw(begin + start, begin + end) if end > start else b""

    def mapped(self, key: str) -> memoryview:
        start, size = self._data_offset(key)
        if self._map is None:
            return memoryview(bytearray(self._raw(start, start + size)))
        return memoryview(self._map)[start : start + size]

    def listdir(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names = {k[len(prefix):].split("/", 1)[0] for k in self._infos if k.startswith(prefix)}
        return sorted(names)

    def files(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(k for k in self._infos if k.startswith(prefix))

    def size(self, key: str) -> int:
        return self._infos[key].file_size

    def total_bytes(self) -> int:
        return self._length

    def present(self) -> bool:
        return True

    def _read_only(self, *args, **kwargs):
        raise FormatError("a single-file .ctraj is written whole by the writer (single_file=True); it "
                          "cannot be modified in place", self.url)

    write_bytes = create_bytes = delete = stage = publish = discard = _read_only
    begin_build = finish_build = abandon_build = _read_only

    def zarr_store(self, read_only: bool = True, prefix: str = ""):
        if self._fs is not None or not read_only or prefix:
            self._read_only()
        from zarr.storage import ZipStore

        return ZipStore(self.path, mode="r")
