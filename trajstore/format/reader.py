"""The lazy reader: `trajstore.open(path)` and the Expert objects it hands out."""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from . import anchorfile, checksums
from .arguments import real, short_repr
from .arrays import check_beta, check_step_norms, decode_array
from .beta import locate, piece_weights
from ..errors import FormatError, IndexTypeError, OutOfRangeError, TrajstoreError, os_errors
from .layers import DTYPE_NAMES
from .layout import (BETA, ROOT_META, STEP_NORMS, StoreMeta, anchor_name, decode_manifest, expert_dir,
                     expert_id_of)
from ..stores.cache import DiskCache
from ..stores.location import locate as locate_target, open_store

DEFAULT_CACHE_BYTES = 1 << 30


def _device(device, where=None) -> torch.device:
    try:
        return torch.device("cpu") if device is None else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TrajstoreError(f"device={short_repr(device)} is not a torch device ({exc})", where) from None


def _dtype(dtype, where=None):
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise TrajstoreError(f"dtype={short_repr(dtype)} is not supported; use one of "
                             f"{', '.join(str(d) for d in DTYPE_NAMES)} (or None for the stored dtype)", where)
    return dtype


# (significand bits, frexp exponent of the smallest normal) of each anchor dtype, to round a weight to it
_PRECISION = {torch.float64: (53, -1021), torch.float32: (24, -125), torch.float16: (11, -13),
              torch.bfloat16: (8, -125)}


def _round_weight(w: float, dtype: torch.dtype) -> float:
    """w (float64, in [0, 1]) rounded once to dtype, to nearest with ties to even (round() is exact here)."""
    bits, emin = _PRECISION[dtype]
    if w == 0.0:
        return 0.0
    scale = bits - max(math.frexp(w)[1], emin)
    return math.ldexp(round(math.ldexp(w, scale)), -scale)


def lerp(x: torch.Tensor, y: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """docs/format.md §7 step 4, bit for bit on every device: x + w*(y - x) for w < 0.5, else
    y - (1 - w)*(y - x), each operation rounded to the tensor dtype, the factor rounded to it first.

    Not torch.lerp: its fused multiply-add (and float32 arithmetic for 16-bit types) rounds once, so it
    differs from a reader written from the spec in the last bit, and between CPU builds and CUDA.
    Separate sub/mul/add kernels round after every operation on every backend.
    """
    out = torch.sub(y, x, out=out)
    if w < 0.5:
        return out.mul_(_round_weight(w, out.dtype)).add_(x)
    return torch.sub(y, out.mul_(_round_weight(1.0 - w, out.dtype)), out=out)


def lerp_layers(xs: list[torch.Tensor], ys: list[torch.Tensor], ws: list[float]) -> list[torch.Tensor]:
    """lerp() of every layer in a few fused foreach launches (one per operation, not per layer: what a
    GPU wants), with the same roundings: each foreach operation rounds every element on its own."""
    d = list(torch._foreach_sub(ys, xs))
    low = [i for i, w in enumerate(ws) if w < 0.5]
    high = [i for i, w in enumerate(ws) if not w < 0.5]
    if low:
        part = [d[i] for i in low]
        torch._foreach_mul_(part, [_round_weight(ws[i], d[i].dtype) for i in low])
        torch._foreach_add_(part, [xs[i] for i in low])
    if high:
        part = [d[i] for i in high]
        torch._foreach_mul_(part, [_round_weight(1.0 - ws[i], d[i].dtype) for i in high])
        for i, t in zip(high, torch._foreach_sub([ys[i] for i in high], part)):
            d[i] = t
    return d


def _index(i, n: int, what: str, path) -> int:
    """A list-style integer index into n items, as a non-negative int; IndexError/TypeError-compatible errors."""
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise IndexTypeError(f"{what} indices must be integers or slices, not {type(i).__name__} "
                             f"(for a real position c use .at(c))", path)
    if not -n <= i < n:
        raise OutOfRangeError(f"{what} index {int(i)} out of range: there are {n} {what}s", path)
    return int(i) % n


class Expert:
    """One convexified trajectory: anchors, per-layer betas, and theta(c) for any real c in [0, K]."""

    def __init__(self, store: "CTraj", position: int, expert_id: int):
        self._s = store
        self.position = position
        self.id = expert_id
        self._dir = expert_dir(expert_id, store.meta.experts_group)
        self._files: dict[str, str] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._provenance: dict = {}
        self._beta_rows: list[list[float]] | None = None  # beta as Python floats, for `at`

    def __repr__(self):
        return f"<Expert {self.position} (id {self.id}) of {self._s.path}>"

    @property
    def anchor_epochs(self) -> tuple[int, ...]:
        return self._s.anchor_epochs

    @property
    def provenance(self) -> dict:
        """Where this expert came from (source file, training log, ...), as its writer recorded it."""
        self._manifest()
        return self._provenance

    @property
    def num_timesteps(self) -> int:
        return self._s.num_timesteps

    # -- upstream's shape: `len(traj)` timesteps, `traj[t]` a list of tensors in parameter order ----------

    def __len__(self) -> int:
        return self.num_timesteps

    def __getitem__(self, t):
        """Timestep t (negative counts from the end) as upstream's `buffer[i][t]`: a list of tensors in
        parameter order (theta(t), interpolated where t is not an anchor); a slice gives a list of those."""
        if isinstance(t, slice):
            return [self[k] for k in range(*t.indices(self.num_timesteps))]
        k = _index(t, self.num_timesteps, "timestep", self._s.path)
        return list(self.at(k).values())

    def __iter__(self):
        return (self[t] for t in range(self.num_timesteps))

    def _manifest(self) -> dict[str, str]:
        if self._files is None:
            key = f"{self._dir}/{ROOT_META}"
            data, where = self._s._store.read_bytes(key), self._s._describe(key)
            files, self._provenance = decode_manifest(data, where, self.id, self.anchor_epochs)
            recorded = self._s.meta.experts
            if recorded is not None and self._s.verify_checksums:  # version 2: the root covers the manifest
                checksums.check(data, recorded[self._dir.rsplit("/", 1)[-1]], where)
            self._files = files
        return self._files

    def _bytes(self, rel: str, mapped: bool = False, fresh: bool = False):
        """A file of the expert, checked against the manifest; `fresh`: from the store itself, never
        from the disk cache, and checked whatever `verify_checksums` says (verify)."""
        files = self._manifest()
        key = f"{self._dir}/{rel}"
        where = self._s._describe(key)
        if rel not in files:
            raise FormatError("file is not listed in the expert's manifest", where)
        store = self._s._store
        if mapped and store.remote and not fresh:  # fetched once into the local disk cache, verified there
            return self._s._disk_cache().get(str(files[rel]), lambda: store.read_bytes(key), where)
        data = store.mapped(key) if mapped else store.read_bytes(key)
        if self._s.verify_checksums or fresh:
            checksums.check(data, files[rel], where)
        return data

    def _array(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        if name not in self._arrays:
            # only files of the manifest, each checked first: zarr would decode anything it finds
            files = {rel: self._bytes(rel) for rel in self._manifest() if rel.startswith(f"{name}/")}
            where = self._s._describe(f"{self._dir}/{name}")
            values = decode_array(files, name, shape, where)
            if name == BETA:
                check_beta(values, self.anchor_epochs, where)
            else:
                check_step_norms(values, where)
            self._arrays[name] = values
        return self._arrays[name]

    @property
    def beta(self) -> np.ndarray:
        """(K+1, L) float64: per-layer position along each piece (0 at its first anchor)."""
        return self._array(BETA, (self.num_timesteps, len(self._s.layers)))

    @property
    def step_norms(self) -> np.ndarray:
        """(K, L) float64: ||theta_l(t+1) - theta_l(t)|| of the original trajectory."""
        return self._array(STEP_NORMS, (self.num_timesteps - 1, len(self._s.layers)))

    def anchor(self, epoch: int, *, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """The stored checkpoint at an anchor epoch, as fresh tensors."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch not in self.anchor_epochs:
            raise OutOfRangeError(f"epoch {epoch} is not an anchor; anchors are {list(self.anchor_epochs)}",
                                  self._s.path)
        tensors = self._s._anchor(self, int(epoch), _device(device, self._s.path), _dtype(dtype, self._s.path))
        return {layer.name: t.view(layer.shape).clone() for layer, t in zip(self._s.layers, tensors)}

    @property
    def anchors(self) -> dict[int, dict[str, torch.Tensor]]:
        return {e: self.anchor(e) for e in self.anchor_epochs}

    def at(self, c: float, flat: bool = False, device=None, dtype=None, out: torch.Tensor | None = None):
        """theta(c), Eq. 10: a name -> tensor dict, or with flat=True one vector in parameter order.

        With flat=True, `out` may be a preallocated vector to fill (saves an allocation per call).
        """
        path = self._s.path
        if self._beta_rows is None:
            self._beta_rows = self.beta.tolist()
        epochs = self._s.meta.anchor_epochs
        try:
            piece, ws = piece_weights(self._beta_rows, epochs, c)
        except OutOfRangeError as exc:
            raise OutOfRangeError(str(exc), path) from None
        dev, dtype = _device(device, path), _dtype(dtype, path)
        if out is not None and (not flat or not isinstance(out, torch.Tensor)):
            raise TrajstoreError(f"out= takes a torch.Tensor, and only with flat=True (got {type(out).__name__})",
                                 path)
        a = self._s._anchor(self, epochs[piece], dev, dtype)
        b = self._s._anchor(self, epochs[piece + 1], dev, dtype)
        if flat:
            # On the CPU the per-layer lerps (three passes each) are the floor, so the Python around them is
            # kept minimal. On a GPU each operation is a kernel launch: foreach launches over all layers
            # and one cat replace the per-layer launches, with the same roundings (docs/format.md §7).
            if dtype is None and not self._s._uniform_dtype:
                raise TrajstoreError("layers have different dtypes; pass dtype= for a flat vector", self._s.path)
            if out is None:
                out = torch.empty(self._s.num_params, dtype=a[0].dtype, device=dev)
            elif out.shape != (self._s.num_params,) or out.dtype != a[0].dtype or out.device != a[0].device:
                raise TrajstoreError(f"out must be a {a[0].dtype} vector of {self._s.num_params} values on "
                                     f"{a[0].device}", self._s.path)
            if dev.type == "cuda":
                return torch.cat(lerp_layers(a, b, ws), out=out)
            for ta, tb, w, o in zip(a, b, ws, self._s._layer_views(out)):
                lerp(ta, tb, w, out=o)
            return out
        return {layer.name: lerp(ta, tb, w).view(layer.shape)
                for layer, ta, tb, w in zip(self._s.layers, a, b, ws)}

    def window(self, c: float, m: float, flat: bool = False, device=None, dtype=None):
        """(theta(c), theta(min(c + m, K))): the start and target of one matching iteration."""
        try:
            locate(c, self.anchor_epochs)
            c, m = real(c, "position c"), real(m, "window length m")
        except OutOfRangeError as exc:
            raise OutOfRangeError(str(exc), self._s.path) from None
        if m < 0:
            raise OutOfRangeError(f"window length m={m} must be a finite number >= 0", self._s.path)
        end = min(c + m, float(self.num_timesteps - 1))
        return (self.at(c, flat=flat, device=device, dtype=dtype),
                self.at(end, flat=flat, device=device, dtype=dtype))

    def verify(self) -> None:
        """Re-read every file of this expert against its checksum and structure."""
        files = self._manifest()
        for epoch in self.anchor_epochs:
            if anchor_name(epoch) not in files:
                raise FormatError(f"anchor of epoch {epoch} is missing", self._s._describe(self._dir))
        store = self._s._store
        found = store.files(self._dir) if store.listable else []  # https:// cannot look for extra files
        unlisted = sorted(set(found) - {f"{self._dir}/{rel}" for rel in files} - {f"{self._dir}/{ROOT_META}"})
        if unlisted:  # §3: a reader refuses a file the manifest does not list
            raise FormatError("file is not listed in the expert's manifest (added or renamed after writing?)",
                              self._s._describe(unlisted[0]))
        for rel in files:
            data = self._bytes(rel, mapped=True, fresh=True)
            if rel.endswith(".safetensors"):
                anchorfile.decode(data, self._s.layers, self._s._describe(f"{self._dir}/{rel}"))
        self._arrays.clear()  # re-read both arrays: shapes and finiteness
        self._beta_rows = None
        _ = self.beta, self.step_norms


class CTraj:
    """An open .ctraj store (directory or single file). Obtain with `trajstore.open(path)`."""

    def __init__(self, path, *, verify_checksums: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 storage_options: dict | None = None, cache_dir=None, disk_cache_bytes: int | None = None):
        location = locate_target(path, storage_options)
        self.path = location.path if location.path is not None else location.url  # Path, or a URL
        self.verify_checksums = verify_checksums
        self._store = open_store(location)
        self._disk = None
        self._disk_settings = (cache_dir, disk_cache_bytes)
        meta = StoreMeta.decode(self._store.read_bytes(ROOT_META), self._describe(ROOT_META),
                                check=verify_checksums)
        if not meta.complete:
            raise FormatError("unfinished write: the writer was interrupted before closing the store "
                              "(resume it with append=True, or remove it)", self.path)
        self.meta = meta
        self.layers = meta.layers
        self._numels = [layer.numel for layer in meta.layers]
        self.num_params = sum(self._numels)
        self._uniform_dtype = len({layer.dtype for layer in meta.layers}) <= 1
        self._out_views: tuple = (None, 0, None)  # the last flat `out` (weakref, data pointer) and its layer views
        self._ids, self._unlisted = self._expert_ids()
        self._experts: dict[int, Expert] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"<CTraj {self.path}: {self.num_experts} experts, {self.num_timesteps} timesteps, "
                f"anchors {list(self.anchor_epochs)}, {len(self.layers)} layers>")

    def _expert_ids(self) -> tuple[list[int], list[int] | None]:
        """(the store's expert ids, ids of published experts the root does not list yet, or None: not
        looked for yet).

        A version-2 root lists its experts as of the last close, so an expert deleted or renamed is an
        error, and one published since (an append in progress or interrupted) is not yet part of the
        store. Only canonical names count: "1" or digits of other scripts never alias expert 000001.
        """
        group = self.meta.experts_group
        listed = None if self.meta.experts is None else {expert_id_of(name) for name in self.meta.experts}
        if listed is not None and self._store.remote:
            # a remote reader never lists (https:// cannot): a missing expert shows when it is read,
            # and the unlisted ones are looked for only when asked (verify, inspect)
            return sorted(listed), None
        present = {i for i in map(expert_id_of, self._store.groups_with(group, ROOT_META)) if i is not None}
        if listed is None:  # version 1: whatever is there
            return sorted(present), []
        missing = sorted(listed - present)
        if missing:
            raise FormatError("expert listed in the root metadata is missing (its zarr.json was deleted or renamed); "
                              "restore it from a copy", self._describe(f"{expert_dir(missing[0], group)}/{ROOT_META}"))
        return sorted(listed), sorted(present - listed)

    @property
    def unlisted_ids(self) -> list[int]:
        """Ids of experts published but not (yet) listed by the root: an append in progress or interrupted."""
        if self._unlisted is None:  # a store that cannot list (https://) has none that can be found
            names = self._store.groups_with(self.meta.experts_group, ROOT_META) if self._store.listable else []
            self._unlisted = sorted({expert_id_of(n) for n in names} - set(self._ids) - {None})
        return list(self._unlisted)

    def _describe(self, key: str):
        return self._store.describe(key)

    def _disk_cache(self) -> DiskCache:
        with self._lock:
            if self._disk is None:
                self._disk = DiskCache(*self._disk_settings)
            return self._disk

    # -- the public table ---------------------------------------------------------------------

    num_timesteps = property(lambda self: self.meta.num_timesteps, doc="K + 1")
    anchor_epochs = property(lambda self: self.meta.anchor_epochs)
    architecture = property(lambda self: self.meta.architecture)
    training = property(lambda self: self.meta.training)
    provenance = property(lambda self: self.meta.provenance)
    smoothing = property(lambda self: self.meta.smoothing)
    expert_ids = property(lambda self: list(self._ids), doc="stored ids, in position order")

    @property
    def num_experts(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Bytes stored (on disk, or in the bucket)."""
        if self._store.listable:
            return self._store.total_bytes()
        # https:// cannot list: the files the metadata names (each expert's manifest is read for it)
        group = self.meta.experts_group
        keys = [ROOT_META, f"{group}/{ROOT_META}"]
        for expert in self:
            keys += [f"{expert._dir}/{ROOT_META}", *(f"{expert._dir}/{rel}" for rel in expert._manifest())]
        return sum(self._store.size(key) for key in keys)

    def __len__(self):
        return self.num_experts

    def __iter__(self):
        return (self.expert(i) for i in range(self.num_experts))

    def __getitem__(self, i):
        """Expert i (negative counts from the end); a slice gives a list of experts."""
        if isinstance(i, slice):
            return [self.expert(k) for k in range(*i.indices(self.num_experts))]
        return self.expert(_index(i, self.num_experts, "expert", self.path))

    def expert(self, i: int) -> Expert:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -self.num_experts <= i < self.num_experts:
            raise OutOfRangeError(f"expert index {i!r} out of range: the store has {self.num_experts} experts",
                                  self.path)
        i = int(i) % self.num_experts
        if i not in self._experts:
            self._experts[i] = Expert(self, i, self._ids[i])
        return self._experts[i]

    @os_errors()
    def verify(self) -> None:
        """Check every expert's files against their checksums; raises the first problem found."""
        for expert in self:
            expert.verify()

    def _layer_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat split per layer; the views of the last vector are kept, as callers reuse one `out`."""
        ref, ptr, views = self._out_views
        if ref is not None and ref() is flat and flat.data_ptr() == ptr:
            return views
        views = flat.split(self._numels)
        self._out_views = (weakref.ref(flat), flat.data_ptr(), views)
        return views

    # -- anchor cache -------------------------------------------------------------------------

    def _anchor(self, expert: Expert, epoch: int, device: torch.device, dtype) -> list[torch.Tensor]:
        """An anchor's layers as flat tensors: zero-copy mmap views on the CPU, cached copies elsewhere."""
        key = (expert.id, epoch, str(device), dtype)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        rel = anchor_name(epoch)
        buf = expert._bytes(rel, mapped=True)
        tensors = [t.reshape(-1) for t in anchorfile.decode(buf, self.layers, self._describe(f"{expert._dir}/{rel}"))]
        if device.type != "cpu" or dtype is not None:
            tensors = [t.to(device=device, dtype=dtype or t.dtype, copy=True) for t in tensors]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            self._cache[key] = tensors
            self._cached += nbytes
            while self._cached > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(t.numel() * t.element_size() for t in old)
        return tensors

    def close(self) -> None:
        self._cache.clear()
        self._experts.clear()
        self._cached = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(path: str | os.PathLike, *, verify_checksums: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES,
         storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
         disk_cache_bytes: int | None = None) -> CTraj:
    """Open a .ctraj (directory or single file; a path or any fsspec URL such as s3://bucket/x.ctraj)
    for reading. Nothing but metadata is read yet.

    `cache_bytes` bounds the anchors held in memory. `storage_options` go to the URL's fsspec
    filesystem (endpoint, credentials, ...). Anchors of a remote store are fetched once into a local
    disk cache (`cache_dir`, at most `disk_cache_bytes`; defaults in trajstore.stores.cache) and
    verified against the manifest before use."""
    with os_errors(path):
        return CTraj(path, verify_checksums=verify_checksums, cache_bytes=cache_bytes,
                     storage_options=storage_options, cache_dir=cache_dir, disk_cache_bytes=disk_cache_bytes)
