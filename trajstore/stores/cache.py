"""The local disk cache of remote anchors: each fetched once, verified, memory-mapped from disk.

Files are named by their sha256 (the one the expert's manifest records), so stores sharing an
anchor share its entry and a cached file is checked against the name it was fetched for before use;
a corrupt or truncated entry is dropped and fetched again. The cache is bounded: past its size the
least recently used entries are removed (files other processes have mapped stay readable to them).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import ChecksumError, TrajstoreError
from . import atomic
from .files import _map_file

# Defaults, decided here only: `trajstore.open(..., cache_dir=, disk_cache_bytes=)` and these
# environment variables override them.
CACHE_DIR_ENV = "TRAJSTORE_CACHE_DIR"
CACHE_BYTES_ENV = "TRAJSTORE_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 4 << 30


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trajstore" / "anchors"


def default_cache_bytes() -> int:
    value = os.environ.get(CACHE_BYTES_ENV)
    if not value:
        return DEFAULT_CACHE_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise TrajstoreError(f"{CACHE_BYTES_ENV}={value!r} is not a number of bytes") from None
    if limit < 0:
        raise TrajstoreError(f"{CACHE_BYTES_ENV}={value!r} must be >= 0")
    return limit


class DiskCache:
    """Content-addressed files under `directory`, at most `max_bytes` in all (the newest entry is
    kept even when it alone is larger)."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = default_cache_bytes() if max_bytes is None else int(max_bytes)
        self._lock = threading.Lock()
        self.fetched = 0  # entries downloaded by this process (the benchmark and tests read it)

    def _entry(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ChecksumError(f"recorded sha256 {sha256!r} is malformed", self.dir)
        return self.dir / sha256[:2] / sha256

    def get(self, sha256: str, fetch: Callable[[], bytes], where) -> memoryview:
        """The verified bytes whose sha256 is `sha256`, from the cache or else from `fetch()`."""
        from ..format.checksums import check  # the one definition of a file's checksum

        path = self._entry(sha256)
        if path.is_file():
            data = memoryview(_map_file(path, "cached anchor"))
            try:
                check(data, sha256, path)
            except ChecksumError:  # damaged on disk: fetch again rather than fail
                path.unlink(missing_ok=True)
            else:
                os.utime(path)  # most recently used
                return data
        data = fetch()
        check(data, sha256, where)  # never cache (or use) bytes that do not match the manifest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only cache must not stop reading: serve from memory
            tmp.unlink(missing_ok=True)
            return memoryview(data)
        with self._lock:
            self.fetched += 1
            self._evict(keep=path)
        return memoryview(_map_file(path, "cached anchor"))

    def _evict(self, keep: Path) -> None:
        entries = []
        for p in self.dir.glob("??/*"):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p != keep:
                atomic.remove(p)
                total -= size

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("??/*") if p.is_file())
