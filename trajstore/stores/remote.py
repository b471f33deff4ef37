"""A store at any fsspec URL: s3://, gs://, hf://, memory://, https:// (read-only), ...

Object stores have no rename, so an expert is published by writing its files under their final keys
and its manifest last, with a create-only write where the backend has one (S3's If-None-Match):
an expert exists only once its manifest does, so readers never see a partial one. Every read is one
request for exactly the bytes asked for; the reader keeps anchors in a local disk cache
(trajstore.stores.cache) so each is fetched once.
"""

from __future__ import annotations

from ..errors import ExistsError, FormatError, TrajstoreError
from .base import ROOT_KEY, Store

# Backends that are read-only by nature; writing to them is refused up front with one clear error.
READ_ONLY_PROTOCOLS = ("http", "https")


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class FsspecStore(Store):
    """A .ctraj (or archive) directory at an fsspec URL."""

    remote = True

    def __init__(self, fs, root: str, url: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        # HTTP serves files by name: no writes, and no listing a reader could rely on
        self.writable = self.listable = not set(_protocols(fs)) & set(READ_ONLY_PROTOCOLS)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _error(self, exc: Exception, key: str, what: str = "cannot read"):
        if isinstance(exc, FileNotFoundError):
            return FormatError("file is missing", self.describe(key))
        return FormatError(f"{what} ({type(exc).__name__}: {exc})", self.describe(key))

    def _fresh(self, key: str) -> str:
        """The path of key, with fsspec's listing cache for it dropped: other processes and machines
        write this store, so existence and listings are always asked of the backend."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return path

    def exists(self, key: str) -> bool:
        try:
            return self.fs.isfile(self._fresh(key))
        except Exception as exc:  # network and permission failures come in many types
            raise self._error(exc, key) from None

    def read_bytes(self, key: str) -> bytes:
        try:  # a range from 0 is one GET everywhere (s3fs sizes whole-object reads with a HEAD first)
            return self.fs.cat_file(self._path(key), start=0)
        except Exception as exc:
            raise self._error(exc, key) from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            return self.fs.cat_file(self._path(key), start=start, end=end)
        except Exception as exc:
            raise self._error(exc, key) from None

    def _relative(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root + "/"
        return path[len(root):] if path.startswith(root) else path

    def listdir(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._fresh(prefix), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._error(exc, prefix, "cannot list") from None
        return sorted({self._relative(p).rsplit("/", 1)[-1] for p in entries} - {""})

    def _find(self, prefix: str, **kwargs) -> dict[str, dict]:
        try:
            found = self.fs.find(self._fresh(prefix), detail=True, **kwargs)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._error(exc, prefix, "cannot list") from None
        return {self._relative(p): info for p, info in found.items() if info.get("type") != "directory"}

    def files(self, prefix: str) -> list[str]:
        return sorted(self._find(prefix))

    def groups_with(self, prefix: str, name: str) -> list[str]:
        # one flat listing (a page per 1000 keys on S3) instead of a request per entry or level
        keys = self._find(prefix)
        head = f"{prefix}/" if prefix else ""
        return sorted(k[len(head):].split("/", 1)[0] for k in keys
                      if k.startswith(head) and k[len(head):].count("/") == 1 and k.endswith(f"/{name}"))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except Exception as exc:
            raise self._error(exc, key) from None

    def total_bytes(self) -> int:
        return sum(int(info.get("size") or 0) for info in self._find("").values())

    def present(self) -> bool:
        try:
            return self.fs.exists(self._fresh(""))
        except Exception as exc:
            raise self._error(exc, "", "cannot reach") from None

    # -- writing ------------------------------------------------------------------------------

    def _put(self, key: str, data: bytes, mode: str) -> None:
        self._writable()
        try:
            self.fs.pipe_file(self._path(key), bytes(data), mode=mode)
        except FileExistsError:
            raise ExistsError("already exists", self.describe(key)) from None
        except Exception as exc:
            if mode == "create" and "PreconditionFailed" in f"{type(exc).__name__} {exc}":
                raise ExistsError("already exists", self.describe(key)) from None
            raise TrajstoreError(f"cannot write ({type(exc).__name__}: {exc})", self.describe(key)) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data, "overwrite")

    def create_bytes(self, key: str, data: bytes) -> None:
        if self.exists(key):  # backends without conditional writes still refuse the common case
            raise ExistsError("already exists", self.describe(key))
        try:
            self._put(key, data, "create")
        except TypeError:  # an fsspec backend whose pipe_file has no `mode`
            self._put(key, data, "overwrite")

    def delete(self, prefix: str) -> None:
        self._writable()
        if not prefix and self.fs.isfile(self.root):  # a single-file .ctraj at this URL
            self._remove([""])
        self._remove(self._find(prefix) if prefix == "" or not self.exists(prefix) else [prefix])

    def _remove(self, keys) -> None:
        """Remove these keys, the root metadata first: from then on nothing here opens as a store."""
        for key in sorted(keys, key=lambda k: (k != ROOT_KEY, k)):
            try:
                self.fs.rm_file(self._path(key))
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise TrajstoreError(f"cannot delete ({type(exc).__name__}: {exc})", self.describe(key)) from None

    def zarr_store(self, read_only: bool = True, prefix: str = ""):
        from zarr.storage import FsspecStore as ZarrFsspecStore

        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        # zarr's fsspec store speaks asyncio on its own event loop. This store's (sync) filesystem,
        # wrapped, serves it: a fresh async instance of an async backend (s3fs) would open an HTTP
        # session on zarr's loop that nothing closes ("Unclosed client session" at exit).
        return ZarrFsspecStore(AsyncFileSystemWrapper(self.fs, asynchronous=True), read_only=read_only,
                               path=self._path(prefix))

    # -- replacing a store: new keys, the root last (docs/format.md §8) ---------------------------

    def begin_build(self) -> "FsspecBuild":
        self._writable()
        return FsspecBuild(self)

    def finish_build(self, built: "FsspecBuild") -> None:
        if built.root_doc is None:
            raise TrajstoreError("the replacement has no root metadata; nothing was switched", self.url)
        self.write_bytes(ROOT_KEY, built.root_doc)  # the switch: one PUT, all or nothing
        self._remove([k for k in self._find("") if k != ROOT_KEY and k not in built.written])

    def abandon_build(self, built: "FsspecBuild") -> None:
        self._remove(built.written)

    def stage(self, final: str) -> str:
        return final  # no rename: files go straight to their keys; the manifest, last, publishes

    def publish(self, staged: str, final: str, manifest: str, data: bytes) -> None:
        self.create_bytes(f"{final}/{manifest}", data)

    def discard(self, staged: str, final: str, manifest: str) -> None:
        # An unpublished group is invisible; remove its files unless someone published it meanwhile.
        if not self.exists(f"{final}/{manifest}"):
            self.delete(staged)


class FsspecBuild(FsspecStore):
    """A replacement built among the keys of the store it replaces, since an object store cannot rename.

    Its writer puts every group under keys the old tree does not use (a fresh experts group), so the
    old tree stays whole and readable; the root metadata is held here until `finish_build` writes it,
    last, in one PUT: readers switch from the old tree to the new one at that instant. An interrupted
    replace leaves the old root, and only keys that no root names.
    """

    shares_keys = True

    def __init__(self, target: FsspecStore):
        super().__init__(target.fs, target.root, target.url)
        self.root_doc: bytes | None = None
        self.written: set[str] = set()  # every key this build wrote, kept by finish_build

    def exists(self, key: str) -> bool:
        return self.root_doc is not None if key == ROOT_KEY else super().exists(key)

    def read_bytes(self, key: str) -> bytes:
        if key != ROOT_KEY:
            return super().read_bytes(key)
        if self.root_doc is None:
            raise FormatError("file is missing", self.describe(key))
        return self.root_doc

    def _put(self, key: str, data: bytes, mode: str) -> None:
        if key == ROOT_KEY:
            self.root_doc = bytes(data)
            return
        self.written.add(key)
        super()._put(key, data, mode)
