"""The store interface: the bytes of a .ctraj (or an archive) addressed by keys relative to its root.

Modelled on zarr-python's stores: everything above this layer (reader, writer, archive, converters)
speaks keys such as "zarr.json" or "experts/000003/anchor_0006.safetensors" and never a path, so
the same code reads and writes a local directory, a single-file zip, or any fsspec URL.

Publishing an expert is the one operation whose mechanism differs by backend, so it is part of the
interface: a local directory writes the expert into a hidden sibling and renames it into place; an
object store (no rename) writes the expert's files under their final keys and its manifest last,
since an expert exists only once its manifest does (docs/format.md, §1 and §8).
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod

from ..errors import TrajstoreError

ROOT_KEY = "zarr.json"  # the root group document; a store without it holds nothing readable


def fresh_group(base: str) -> str:
    """`<base>.<16 hex digits>`: a group name the tree being replaced does not use, for a build that
    shares its keys (`Store.shares_keys`); the new root, written last, names it (docs/format.md §8)."""
    return f"{base}.{uuid.uuid4().hex[:16]}"


def is_group(name, base: str) -> bool:
    """name is `base` or a `fresh_group(base)` name: a root's group field never leads out of the store."""
    return isinstance(name, str) and re.fullmatch(rf"{re.escape(base)}(\.[0-9a-f]{{16}})?", name) is not None


class Store(ABC):
    """Keyed bytes. Keys use "/" and never start with one; "" is the root."""

    #: True when reads go over a network (the reader then caches anchors on local disk).
    remote = False
    #: False for stores that can only be read (a single-file zip, an https:// URL).
    writable = True
    #: False where keys cannot be listed (https://): readers then go by the metadata alone.
    listable = True
    #: True for a build (`begin_build`) that writes among the keys of the tree it replaces (an object
    #: store has no rename): its writer must use keys the old tree does not, and the root metadata,
    #: written last, switches readers from the old tree to the new one.
    shares_keys = False

    url: str  # what the user named, for messages

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r})"

    def describe(self, key: str) -> str:
        """How error messages name a key: the full path or URL of that file."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    # -- reading ------------------------------------------------------------------------------

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if the key is a file of the store."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole file; a missing or unreadable file is a FormatError naming it."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file, fetching no more than that where the backend allows."""

    def mapped(self, key: str):
        """The whole file as a writable buffer torch can view without copying (a memory map where
        possible; elsewhere the fetched bytes, which torch refuses to view read-only without a warning)."""
        return memoryview(bytearray(self.read_bytes(key)))

    @abstractmethod
    def listdir(self, prefix: str) -> list[str]:
        """Names directly under prefix (files and sub-prefixes), sorted; [] if there are none."""

    @abstractmethod
    def files(self, prefix: str) -> list[str]:
        """Every file key under prefix, recursively, sorted."""

    def groups_with(self, prefix: str, name: str) -> list[str]:
        """Names of the entries directly under prefix that hold a file `name` (e.g. the experts that
        have a manifest). Object stores override this with one recursive listing."""
        return [n for n in self.listdir(prefix) if self.exists(f"{prefix}/{n}/{name}")]

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes of one file."""

    @abstractmethod
    def total_bytes(self) -> int:
        """Bytes of every file of the store."""

    @abstractmethod
    def present(self) -> bool:
        """True if anything at all is stored at this location."""

    # -- writing ------------------------------------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise TrajstoreError("this location can only be read", self.url)

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one file whole: readers see the old bytes or the new, never a part."""

    @abstractmethod
    def create_bytes(self, key: str, data: bytes) -> None:
        """Write one file that must not exist yet; ExistsError if it does (or appears meanwhile)."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove a file, or every file under a prefix ("" removes the whole store)."""

    @abstractmethod
    def stage(self, final: str) -> str:
        """Where to write the files of the group that will be published at `final`."""

    @abstractmethod
    def publish(self, staged: str, final: str, manifest: str, data: bytes) -> None:
        """Write the group's manifest (its key relative to the group) and make the group visible at
        `final` in one step; ExistsError (and nothing changed at `final`) if it is already there."""

    @abstractmethod
    def discard(self, staged: str, final: str, manifest: str) -> None:
        """Remove what an unpublished group left at `staged`."""

    @abstractmethod
    def begin_build(self) -> "Store":
        """A store to build a complete new tree in, replacing what is here; the old tree stays whole
        and readable until `finish_build` makes the new one the store at this location."""

    @abstractmethod
    def finish_build(self, built: "Store") -> None:
        """Make the tree built by `begin_build` the store at this location, then remove the old one."""

    @abstractmethod
    def abandon_build(self, built: "Store") -> None:
        """Give up a build: remove what was built; the old tree is untouched."""

    @abstractmethod
    def zarr_store(self, read_only: bool = True, prefix: str = ""):
        """The same location (or the group at `prefix` in it, as the zarr store's root) as a zarr-python
        store, for arrays too large to read whole (the archive)."""
