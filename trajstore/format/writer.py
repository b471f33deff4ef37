"""The streaming writer: experts arrive one timestep at a time and only anchors + norms are kept."""

from __future__ import annotations

import datetime
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import anchorfile, checksums
from ..stores.base import fresh_group
from ..stores.files import DirectoryStore
from ..stores.location import locate, open_store
from .arguments import integer
from .beta import (LEGACY_SMOOTHINGS, SMOOTHINGS, anchor_epochs_with, beta_from_norms, betas_follow_smoothed_path,
                   check_anchor_epochs, smooth_end, smooth_inner)
from ..errors import ExistsError, FormatError, InvalidTensorError, TrajstoreError, os_errors
from .layers import as_tensor_list, layer_table
from .layout import (BETA, EXPERTS, ROOT_META, STEP_NORMS, StoreMeta, anchor_name, expert_dir, expert_id_of,
                     group_json)
from .singlefile import publish_single_file


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tool() -> str:
    from .. import __version__

    return f"trajstore {__version__}"


def encode_zarr_array(name: str, data: np.ndarray) -> dict[str, bytes]:
    """The files of a one-chunk zarr v3 array `name` holding data, by key: encoded in memory, so they
    are written (and checksummed) through whatever store the .ctraj lives in."""
    import zarr
    from zarr.storage import MemoryStore

    held: dict = {}
    # every chunk is written, even an all-zero one: readers refuse a chunk the manifest does not list
    zarr.create_array(MemoryStore(held), name=name, data=data, chunks=data.shape, overwrite=False,
                      config={"write_empty_chunks": True})
    return {key: buf.to_bytes() for key, buf in sorted(held.items()) if key.startswith(f"{name}/")}


class ExpertWriter:
    """Receives one expert's timesteps in order; `close()` publishes the expert atomically."""

    def __init__(self, writer: "Writer", expert_id: int, provenance: dict | None):
        self._w = writer
        self.id = expert_id
        self._provenance = provenance or {}
        meta = writer.meta
        self._layers = meta.layers
        self._last = meta.num_timesteps - 1
        self._epochs = set(meta.anchor_epochs)
        self._t = 0
        self._history: deque[list[torch.Tensor]] = deque(maxlen=3)
        self._norms = np.zeros((self._last, len(self._layers)), dtype=np.float64)
        self._path_norms = np.zeros_like(self._norms)  # of the smoothed path (binomial smoothing's betas)
        self._path_last: list[torch.Tensor] | None = None
        self._anchors: dict[int, list[torch.Tensor]] = {}
        self._done = False

    @property
    def timesteps_written(self) -> int:
        return self._t

    def append(self, params) -> None:
        """Add the next timestep: tensors in layer order, a name -> tensor mapping, or a module."""
        if self._done:
            raise TrajstoreError(f"expert {self.id} is already closed", self._w.path)
        if self._t > self._last:
            raise InvalidTensorError(f"expert {self.id}: more than {self._last + 1} timesteps", self._w.path)
        where = f"expert {self.id} timestep {self._t}"
        tensors = [t.to("cpu", copy=True) for t in as_tensor_list(params, self._layers, where)]
        for layer, t in zip(self._layers, tensors):
            if not torch.isfinite(t).all():
                raise InvalidTensorError(f"{where}: layer {layer.name!r} has NaN or infinite values",
                                         self._w.path)
        t = self._t
        if t > 0:
            prev = self._history[-1]
            self._norms[t - 1] = [torch.linalg.vector_norm(a.double() - b.double()).item()
                                  for a, b in zip(tensors, prev)]
        self._history.append(tensors)
        smoothing = self._w.meta.smoothing
        if smoothing is None:
            if t in self._epochs:
                self._anchors[t] = tensors
        else:  # point t-1 of the smoothed path is known once theta(t) has arrived; the end at once
            if t > 0:
                inner = t - 1 in self._epochs and t - 1 > 0
                self._settle(t - 1, smooth_inner(smoothing, *self._history) if inner else self._history[-2])
            if t == self._last:
                k2 = self._history[-3] if len(self._history) == 3 else None
                if k2 is None and smoothing != "neighbour-mean":
                    raise InvalidTensorError(f"{smoothing} smoothing of the end point needs K >= 2", self._w.path)
                self._settle(t, smooth_end(smoothing, k2, self._history[-2], self._history[-1]))
        self._t += 1

    def _settle(self, t: int, point: list[torch.Tensor]) -> None:
        """Point t of the smoothed path: an anchor if t is one; its step from point t-1 measured."""
        if t in self._epochs:
            self._anchors[t] = point
        if self._path_last is not None:
            self._path_norms[t - 1] = [torch.linalg.vector_norm(a.double() - b.double()).item()
                                       for a, b in zip(point, self._path_last)]
        self._path_last = point

    def extend(self, timesteps: Iterable) -> None:
        for params in timesteps:
            self.append(params)

    def close(self) -> int:
        if self._done:
            return self.id
        if self._t != self._last + 1:
            self.abort()
            raise InvalidTensorError(f"expert {self.id} got {self._t} timesteps, expected "
                                     f"{self._last + 1}; nothing was written for it", self._w.path)
        self._done = True
        beta_norms = self._path_norms if betas_follow_smoothed_path(self._w.meta.smoothing) else self._norms
        with os_errors(self._w.path):
            self._w._publish_expert(self.id, self._anchors, self._norms, self._provenance, beta_norms)
        return self.id

    def abort(self) -> None:
        self._done = True
        self._w._release(self.id)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Writer:
    """Writes a .ctraj; use `trajstore.create(...)` to make one."""

    @os_errors(arg="path")
    def __init__(self, path, layers, num_timesteps: int, *, anchor_epochs: Sequence[int] | None = None,
                 waypoints: Sequence[int] = (), smoothing: str | None = None, architecture: dict | None = None,
                 training: dict | None = None, provenance: dict | None = None, single_file: bool = False,
                 overwrite: bool = False, append: bool = False, storage_options: dict | None = None):
        layers = layer_table(layers)
        num_timesteps = integer(num_timesteps, "num_timesteps", path)
        if anchor_epochs is None:
            anchor_epochs = anchor_epochs_with(waypoints, num_timesteps)
        elif waypoints:
            raise TrajstoreError("give anchor_epochs or waypoints, not both")
        if smoothing not in (None, *SMOOTHINGS, *LEGACY_SMOOTHINGS):  # "mct": to append to stores that use it
            raise TrajstoreError(f"unknown smoothing {smoothing!r}; known: {list(SMOOTHINGS)}")
        prov = {"created": _now(), "tool": _tool(), **(provenance or {})}
        self.meta = StoreMeta(layers=layers, num_timesteps=num_timesteps,
                              anchor_epochs=check_anchor_epochs(anchor_epochs, num_timesteps),
                              smoothing=smoothing, architecture=architecture, training=dict(training or {}),
                              provenance=prov)
        self.single_file = single_file
        self._overwrite = overwrite
        self._target = locate(path, storage_options)
        self.path = self._target.path if self._target.path is not None else self._target.url  # Path, or a URL
        if isinstance(self.path, Path) and self.path.is_symlink() and not self.path.exists():
            # creating it would fail and joining it would wait for metadata that never comes
            raise ExistsError("is a dangling symbolic link; remove it or choose another output", self.path)
        self._taken: set[int] = set()
        self._closed = False
        self._replacing = False
        self._created = False  # this writer wrote the root metadata: the store is its own to remove
        target = open_store(self._target, mode="w")
        target._writable()
        exists = self._target.exists()  # asked once: another writer may create it meanwhile (then joined below)
        if overwrite and exists and self._target.remote:
            self._check_same_form()
        if single_file:
            if append:
                raise TrajstoreError("a single-file .ctraj cannot be appended to; write the directory "
                                     "form and convert it when done", self.path)
            if exists and not overwrite:
                raise ExistsError("already exists (pass overwrite=True / --force to replace it)", self.path)
            # built beside the file (for the final rename), or for a URL in the temporary directory
            beside = self._target.path or Path(tempfile.gettempdir()) / self._target.name
            self._store = DirectoryStore(beside).begin_build()
            self._init_root()
        elif exists and append:
            self._store = target
            self._join_existing()
        elif exists and not overwrite:
            hint = "" if target.exists(ROOT_META) else " (an unfinished write: pass append=True to resume)"
            raise ExistsError(f"already exists{hint}; pass overwrite=True / --force to replace it", self.path)
        elif exists:  # replace: the old store stays whole and readable until close
            self._store = target.begin_build()
            self._replacing = True
            if self._store.shares_keys:  # no rename: the new experts go where the old tree has none
                self.meta.experts_group = fresh_group(EXPERTS)
            self._init_root()
        else:
            self._store = target
            if isinstance(target, DirectoryStore) and not target.make_root():
                self._join_existing()  # another process created it first
            else:
                self._init_root()
        self._target_store = target

    @property
    def created(self) -> bool:
        """Whether this writer created the store (wrote its first root metadata), rather than joining a
        store another writer had started (append=True, or writers starting one store at once)."""
        return self._created

    # -- store level -------------------------------------------------------------------------

    def _check_same_form(self) -> None:
        """At a URL a store is replaced in one step only by one of the same form: a new root over the
        old tree's keys, or one object over another (docs/format.md §8)."""
        form, want = self._target.form, "file" if self.single_file else "directory"
        if form != want:
            held = {"file": "a single-file .ctraj", "directory": "a directory-form .ctraj"}.get(form, "no .ctraj")
            raise ExistsError(f"holds {held}; at a URL only a store of the same form replaces it (it cannot "
                              "switch in one step): delete it first or choose another URL", self.path)

    def _init_root(self) -> None:
        store = self._store
        if isinstance(store, DirectoryStore):
            store.root.mkdir(parents=True, exist_ok=True)
        store.write_bytes(f"{self.meta.experts_group}/{ROOT_META}", group_json())
        try:  # create-only: of writers starting one store at once, one writes the metadata
            store.create_bytes(ROOT_META, self.meta.encode())
        except ExistsError:
            self._join_existing()
        else:
            self._created = True

    def _join_existing(self) -> None:
        store = self._store
        deadline = time.monotonic() + 30
        while not store.exists(ROOT_META):  # a concurrent creator is between mkdir and its metadata
            if time.monotonic() > deadline:
                raise FormatError("exists but holds no .ctraj metadata", self.path)
            time.sleep(0.05)
        existing = StoreMeta.decode(store.read_bytes(ROOT_META), store.describe(ROOT_META))
        diffs = existing.same_layout(self.meta)
        if diffs:
            raise TrajstoreError("cannot append: the existing store has another layout: " + "; ".join(diffs),
                                 self.path)
        self.meta.provenance = existing.provenance
        self.meta.architecture = existing.architecture if existing.architecture is not None else self.meta.architecture
        self.meta.training = existing.training or self.meta.training
        self.meta.complete = existing.complete
        self.meta.experts_group = existing.experts_group

    def existing_experts(self) -> list[int]:
        """Ids of the experts already complete in this store (for resuming)."""
        found = self._store.groups_with(self.meta.experts_group, ROOT_META)
        return sorted(i for i in map(expert_id_of, found) if i is not None)

    def next_id(self) -> int:
        used = set(self.existing_experts()) | self._taken
        return max(used) + 1 if used else 0

    def expert(self, index: int | None = None, *, provenance: dict | None = None) -> ExpertWriter:
        """Start writing one expert. Concurrent processes should pass disjoint explicit indices."""
        if self._closed:
            raise TrajstoreError("the writer is closed", self.path)
        expert_id = self.next_id() if index is None else integer(index, "expert index", self.path)
        if expert_id < 0:
            raise TrajstoreError(f"expert index {expert_id} is negative", self.path)
        if expert_id in self._taken or expert_id in self.existing_experts():
            raise ExistsError(f"expert {expert_id} already exists", self.path)
        self._taken.add(expert_id)
        return ExpertWriter(self, expert_id, provenance)

    def write_expert(self, timesteps: Iterable, index: int | None = None, *, provenance: dict | None = None) -> int:
        with self.expert(index, provenance=provenance) as ew:
            ew.extend(timesteps)
        return ew.id

    def _release(self, expert_id: int) -> None:
        self._taken.discard(expert_id)

    def _publish_expert(self, expert_id: int, anchors: Mapping[int, list[torch.Tensor]], norms: np.ndarray,
                        provenance: dict, beta_norms: np.ndarray) -> None:
        """Files first, the manifest last: the store publishes the expert in one step (a rename, or
        on an object store the create-only write of its manifest), so no reader sees part of it."""
        meta, store = self.meta, self._store
        final = expert_dir(expert_id, meta.experts_group)
        if store.exists(f"{final}/{ROOT_META}"):
            raise ExistsError(f"expert {expert_id} already exists", self.path)
        staged = store.stage(final)
        published = False
        try:
            contents = {anchor_name(epoch): anchorfile.encode(meta.layers, anchors[epoch], {"epoch": str(epoch)})
                        for epoch in meta.anchor_epochs}
            contents.update(encode_zarr_array(BETA, beta_from_norms(beta_norms, meta.anchor_epochs)))
            contents.update(encode_zarr_array(STEP_NORMS, norms))
            files: dict[str, str] = {}
            for rel, data in contents.items():
                store.write_bytes(f"{staged}/{rel}", data)
                files[rel] = checksums.sha256(data)  # the group document holds the manifest itself
            attrs = {"trajstore_expert": {"id": expert_id, "files": files,
                                          "provenance": {"written": _now(), **provenance}}}
            store.publish(staged, final, ROOT_META, group_json(attrs))
            published = True
        finally:
            if not published:
                store.discard(staged, final, ROOT_META)

    def close(self):
        """Mark the store complete and publish it; returns its path (a Path, or the URL)."""
        if self._closed:
            return self.path
        self._closed = True
        was_complete, self.meta.complete = self.meta.complete, True
        try:
            with os_errors(self.path):
                self._finish()
        except BaseException:  # e.g. a full disk: remove what was built, as abort() does
            self.meta.complete = was_complete
            self.abort()
            raise
        return self.path

    def _finish(self) -> None:
        self._record_experts()
        if self.single_file:
            try:
                publish_single_file(self._store.root, self._target, overwrite=self._overwrite)
            finally:
                self._store.release()
        elif self._replacing:
            self._target_store.finish_build(self._store)

    def _record_experts(self) -> None:
        """Write the root metadata listing every published expert with its manifest's sha256.

        Writers appending at once each rewrite the root on close, so each checks afterwards that no
        expert appeared that its list lacks, and writes again if one did: the root written last then
        lists every expert published before any writer's close (docs/format.md §8).
        """
        store = self._store
        while True:
            ids = self.existing_experts()
            names = [expert_dir(i).rsplit("/", 1)[-1] for i in ids]
            self.meta.experts = {name: checksums.sha256(store.read_bytes(f"{self.meta.experts_group}/{name}/{ROOT_META}"))
                                 for name in names}
            store.write_bytes(ROOT_META, self.meta.encode())
            if set(self.existing_experts()) <= set(ids):
                return

    def abort(self) -> None:
        """Give up: a replacing output is removed, and a new one if no other writer has written to it;
        an appended-to store keeps its finished experts."""
        self._closed = True
        if self.single_file:
            self._store.release()
        elif self._replacing:
            self._target_store.abandon_build(self._store)
        elif self._created and not self.meta.complete:
            self._remove_if_alone()

    def _remove_if_alone(self) -> None:
        """Remove the store this writer created, unless it holds a file this writer did not write.

        Other writers may have joined it (append=True): their experts, half-written experts, temporary
        files and claims live in it, and a store removed under them lost files they were writing (an
        expert published without some of its files). A writer that joined but has written nothing yet
        cannot be seen; if the store goes meanwhile, its next write fails (docs/format.md §8).
        """
        own = {ROOT_META, f"{self.meta.experts_group}/{ROOT_META}"}
        if set(self._store.files("")) <= own:
            self._store.delete("")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def create(path, layers, num_timesteps: int, **kwargs) -> Writer:
    """Start a .ctraj at `path`. See `Writer` for the options (anchors, smoothing, single-file, append)."""
    return Writer(path, layers, num_timesteps, **kwargs)
