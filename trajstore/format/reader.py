"""The lazy reader: `trajstore.open(path)` and the Expert objects it hands out."""

from __future__ import annotations

import functools
import itertools
import math
import os
import struct
import threading
import weakref
from collections import OrderedDict, deque

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


_CPU = torch.device("cpu")
_DEVICE_NAMES = {"cpu": _CPU}  # device strings met so far (torch parses a string on every call)


def _device(device, where=None) -> torch.device:
    if device is None:
        return _CPU
    if device.__class__ is str:
        found = _DEVICE_NAMES.get(device)
        if found is not None:
            return found
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TrajstoreError(f"device={short_repr(device)} is not a torch device ({exc})", where) from None
    if device.__class__ is str and len(_DEVICE_NAMES) < 64:
        _DEVICE_NAMES[device] = found
    return found


def _dtype(dtype, where=None):
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise TrajstoreError(f"dtype={short_repr(dtype)} is not supported; use one of "
                             f"{', '.join(str(d) for d in DTYPE_NAMES)} (or None for the stored dtype)", where)
    return dtype


# (significand bits, frexp exponent of the smallest normal) of each anchor dtype, to round a weight to it
_PRECISION = {torch.float64: (53, -1021), torch.float32: (24, -125), torch.float16: (11, -13),
              torch.bfloat16: (8, -125)}


def _round_weight(w: float, dtype: torch.dtype) -> float:
    """w (float64, in [-1, 1]) rounded once to dtype, to nearest with ties to even (round() is exact here);
    symmetric, so -w rounds to minus what w does (and -0.0 stays -0.0)."""
    bits, emin = _PRECISION[dtype]
    if w == 0.0:
        return w
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


# The dtypes numpy computes in. Each ufunc rounds its result once and nothing is fused across ufuncs;
# numpy's float16 operations compute in float32 and round to float16, which gives the same bits (float32
# holds every float16 sum and product to twice float16's precision). bfloat16 has no numpy type.
_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


class _FlatLerp:
    """lerp() of every layer of a flat vector on the CPU, in a few numpy calls instead of three per layer.

    out = base + f*d, with d = y - x rounded (cached per piece by the reader) and per layer either
    f = round(w), base = x (w < 0.5) or f = -round(1 - w), base = y: y + (-r)*d is y - r*d bit for bit
    (negation is exact and rounding to nearest is symmetric), so this is docs/format.md §7, rounded twice.
    A large layer is multiplied on its own with a scalar factor, a run of small layers in one call with
    a factor per value; the additions run over the stretches of layers that share a base (one call over
    the whole vector when every layer has the same). numpy, not torch: a numpy call costs a third of a
    torch call, and the large layers are bandwidth-bound either way.

    What does not depend on c is made once here: the parts, and per thread and dtype a buffer of the
    layers' factors with a 0-d view of each large layer's (a 0-d array operand costs numpy half what a
    scalar does: no scalar conversion per call) and a buffer of the small layers' per-value factors, so
    that a call fills one number per layer, gathers the small layers' into place, and runs the passes.
    A call after other work finds all this cold (benchmarks/RESULTS.md §4), so it touches few objects.
    """

    BIG = 4096  # values from which a layer gets its own multiply

    def __init__(self, numels: list[int]):
        bounds = [0, *itertools.accumulate(numels)]
        self.bounds, self.num_layers = bounds, len(numels)
        self.parts: list[slice] = []  # the vector's parts, each multiplied in one call
        self.factor_of: list[int | slice] = []  # per part: its layer (a scalar factor) or its slice of `small`
        small = []  # per value of the small layers, in order: its layer
        layer = 0
        while layer < len(numels):
            end = layer + 1
            if numels[layer] < self.BIG:
                while end < len(numels) and numels[end] < self.BIG:
                    end += 1
            if bounds[end] > bounds[layer]:
                self.parts.append(slice(bounds[layer], bounds[end]))
                n = len(small)
                self.factor_of.append(layer if numels[layer] >= self.BIG else slice(n, n + bounds[end] - bounds[layer]))
                if numels[layer] < self.BIG:
                    small += itertools.chain.from_iterable(itertools.repeat(k, numels[k]) for k in range(layer, end))
            layer = end
        self.small_index = np.array(small, dtype=np.intp) if small else None
        self._stretches: dict[bytes, list[tuple[slice, bool]]] = {}
        self._local = threading.local()  # per thread: {numpy dtype: (factors, per part its factor, small factors)}

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[part] for part in self.parts]

    def stretches(self, from_y: np.ndarray) -> list[tuple[slice, bool]]:
        """The vector as maximal stretches of layers with the same base (from_y: per layer, base is y)."""
        key = from_y.tobytes()
        found = self._stretches.get(key)
        if found is None:
            found, start = [], 0
            for layer in range(1, len(from_y) + 1):
                if layer == len(from_y) or from_y[layer] != from_y[start]:
                    if self.bounds[layer] > self.bounds[start]:
                        found.append((slice(self.bounds[start], self.bounds[layer]), bool(from_y[start])))
                    start = layer
            if len(self._stretches) < 4096:  # the masks met so far: a few per piece in practice
                self._stretches[key] = found
        return found

    def _buffer(self, dtype: np.dtype) -> tuple:
        """This thread's buffers for dtype, made on its first call: the layers' factors, the function that
        writes Python floats into them (struct's, with a C cast per value: a third of what numpy's
        conversion of a list costs cold), per part its factor (a 0-d view into the factors for a large layer,
        a slice of the small layers' per-value factors for a run of small ones), and the small layers'
        per-value factors (or None)."""
        factors = np.zeros(self.num_layers, dtype=dtype)
        # native order and sizes, one code per value: f float32, d float64, e float16 (given values that
        # float16 holds exactly: _round_weight's)
        pack = functools.partial(struct.Struct(f"{self.num_layers}{dtype.char}").pack_into,
                                 memoryview(factors).cast("B"), 0)
        small = None if self.small_index is None else np.zeros(len(self.small_index), dtype=dtype)
        per_part = [factors[f:f + 1].reshape(()) if f.__class__ is int else small[f] for f in self.factor_of]
        held = self._local.__dict__[dtype] = (factors, pack, per_part, small)
        return held

    def __call__(self, x: np.ndarray, y: np.ndarray, d_parts: list[np.ndarray], fs: list[float], out: np.ndarray,
                 out_parts: list[np.ndarray]) -> None:
        """out = the point with per layer the float64 factor f from the nearer anchor: f = w (w < 0.5) or
        f = -(1 - w) (piece_weights(..., nearer=True); -0.0 for w = 1: y - 0*d and y + (-0)*d agree only then)."""
        held = self._local.__dict__.get(out.dtype)  # (inline: a call less, on the path that runs cold)
        factors, pack, per_part, small = held if held is not None else self._buffer(out.dtype)
        # Each factor rounded once from float64: for float32 and float64 by struct's C cast (the hardware's IEEE
        # conversion); float16 by _round_weight, as a cast through float32 would round twice.
        if out.dtype.itemsize == 2:
            pack(*[_round_weight(f, torch.float16) for f in fs])
        else:
            pack(*fs)
        # The base of the additions: x where every factor is positive, y where every one is negative; else (a
        # factor 0, whose sign says its base, or both signs) per stretch of layers, from the factors' signs.
        base = x if min(fs, default=1.0) > 0.0 else y if max(fs, default=1.0) < 0.0 else None
        if small is not None:
            factors.take(self.small_index, out=small, mode="wrap")  # "wrap": no buffered copy (indices are valid)
        multiply = np.multiply
        for d, o, f in zip(d_parts, out_parts, per_part):
            multiply(d, f, o)
        if base is not None:
            np.add(out, base, out)
        else:
            for part, from_y in self.stretches(np.signbit(factors)):
                np.add(out[part], y[part] if from_y else x[part], out[part])


class _Address:
    """Memory by address, for numpy: an array over it has this as its base, not the tensor that owns it
    (CTraj._array_of)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, address: int, length: int, dtype):
        self.__array_interface__ = {"data": (address, False), "shape": (length,), "typestr": np.dtype(dtype).str,
                                    "version": 3}


class _Anchor:
    """A cached anchor: its layers (1-D) and, when they share a dtype, the flat vector they are views of
    (with its numpy view on the CPU in a numpy dtype, for _FlatLerp)."""

    __slots__ = ("flat", "layers", "array")

    def __init__(self, flat: torch.Tensor | None, layers: list[torch.Tensor]):
        self.flat, self.layers = flat, layers
        self.array = flat.numpy() if flat is not None and flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES \
            else None


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
        held = self._s._anchor(self, int(epoch), _device(device, self._s.path), _dtype(dtype, self._s.path))
        return {layer.name: t.view(layer.shape).clone() for layer, t in zip(self._s.layers, held.layers)}

    @property
    def anchors(self) -> dict[int, dict[str, torch.Tensor]]:
        return {e: self.anchor(e) for e in self.anchor_epochs}

    def at(self, c: float, flat: bool = False, device=None, dtype=None, out: torch.Tensor | None = None):
        """theta(c), Eq. 10: a name -> tensor dict, or with flat=True one vector in parameter order.

        With flat=True, `out` may be a preallocated vector to fill (saves an allocation per call).
        """
        s = self._s
        rows = self._beta_rows
        if rows is None:
            rows = self._beta_rows = self.beta.tolist()
        dev = _CPU if device is None else _device(device, s.path)
        dtype = None if dtype is None else _dtype(dtype, s.path)
        if out is not None and (not flat or not isinstance(out, torch.Tensor)):
            raise TrajstoreError(f"out= takes a torch.Tensor, and only with flat=True (got {type(out).__name__})",
                                 s.path)
        # a flat vector on the CPU in a numpy dtype: _FlatLerp over the piece's cached y - x, which takes
        # each weight from the nearer anchor
        numpy = flat and (dev is _CPU or dev.type == "cpu") and (dtype or s._stored_dtype) in _NUMPY_DTYPES
        try:
            piece, ws = piece_weights(rows, s.meta.anchor_epochs, c, numpy)
        except OutOfRangeError as exc:
            raise OutOfRangeError(str(exc), s.path) from None
        slot = s._slots.get(self.id)  # the piece this expert read last, while cached (CTraj._piece)
        if slot is not None and slot[0] == (piece, dev, dtype, numpy):
            a, b, d_parts = slot[1]
            touched = s._touched  # a use of its entries, applied to the cache's order later
            touched.append(slot[2])
            if len(touched) > 1024:  # a long run of slot reads (no other cache use in between)
                s._settle(lock=True)
        else:
            a, b, d_parts = s._piece(self, piece, dev, dtype, numpy)
        if flat:
            if numpy:  # whole-vector numpy passes over the cached y - x
                if out is None:
                    out = torch.empty_like(a.flat)  # its dtype and device (fewer arguments to parse)
                elif out.requires_grad or out.dtype is not a.flat.dtype or not out.is_cpu or out.shape != s._flat_shape:
                    s._check_out(out, a.flat)  # (the same tests, with the message)
                s._flat_lerp(a.array, b.array, d_parts, ws, *s._array_of(out))
                return out
            if a.flat is None:
                raise TrajstoreError("layers have different dtypes; pass dtype= for a flat vector", s.path)
            reused = out is not None  # a caller's `out`, which comes again: its views are kept
            if reused:
                s._check_out(out, a.flat)
            else:
                out = torch.empty(s.num_params, dtype=a.flat.dtype, device=dev)
            if dev.type == "cuda":  # each operation a kernel launch: foreach launches over all layers, one cat
                return torch.cat(lerp_layers(a.layers, b.layers, ws), out=out)
            for ta, tb, w, o in zip(a.layers, b.layers, ws, s._layer_views(out, reused)):
                lerp(ta, tb, w, out=o)
            return out
        return {layer.name: lerp(ta, tb, w).view(layer.shape)
                for layer, ta, tb, w in zip(s.layers, a.layers, b.layers, ws)}

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
        dtypes = {layer.torch_dtype for layer in meta.layers}
        self._stored_dtype = next(iter(dtypes)) if len(dtypes) == 1 else None  # the layers' one dtype, if one
        self._out_views: tuple = (None, 0, None)  # the last flat `out` (weakref, data pointer) and its layer views
        self._flat_shape = (self.num_params,)
        self._views = threading.local()  # per thread: numpy views of flat CPU vectors by address (_array_of)
        self._flat_lerp = _FlatLerp(self._numels)
        self._ids, self._unlisted = self._expert_ids()
        self._experts: dict[int, Expert] = {}
        self._cache: OrderedDict = OrderedDict()
        self._slots: dict[int, tuple] = {}  # expert id -> the piece it read last, while cached (_piece)
        self._touched: deque = deque()  # the slots' uses not yet applied to the cache's order (_piece)
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

    def _layer_views(self, flat: torch.Tensor, keep: bool) -> list[torch.Tensor]:
        """flat split per layer; with keep, the views of the last vector are kept, as callers reuse one `out`
        (never those of a new vector: they would keep the caller's previous result alive)."""
        ref, ptr, views = self._out_views
        if ref is not None and ref() is flat and flat.data_ptr() == ptr:
            return views
        views = flat.split(self._numels)
        if keep:
            self._out_views = (weakref.ref(flat), flat.data_ptr(), views)
        return views

    def _check_out(self, out: torch.Tensor, like: torch.Tensor) -> None:
        """A caller's `out` must be a vector like the flat anchor `like`, free of autograd."""
        if out.shape != (self.num_params,) or out.dtype != like.dtype or out.device != like.device:
            raise TrajstoreError(f"out must be a {like.dtype} vector of {self.num_params} values on "
                                 f"{like.device}", self.path)
        if out.requires_grad:
            raise TrajstoreError("out must not require grad (pass a tensor made under torch.no_grad())", self.path)

    def _array_of(self, flat: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """A flat CPU vector as a numpy array over its memory and that array's parts for _FlatLerp.

        For a contiguous vector (every new one, and a caller's `out` as a rule) they are kept per thread by
        address: a caller reuses one `out` (or two: a window's start and target), and the allocator hands a
        freed vector's memory to the next request of its size, so a caller that drops each new point before
        asking for the next gets the same address again and again. They are made over the bare address
        (__array_interface__, see _Address), so that they hold no reference to any tensor (a vector stays
        its caller's alone), and are used only for the vector that owns that memory now: a contiguous
        vector of this length and dtype at that address (which `at` has checked)."""
        if not flat.is_contiguous():  # (an `out` that is a strided view): a strided numpy view, each call
            array = flat.numpy()
            return array, self._flat_lerp.split(array)
        key = (flat.data_ptr(), flat.dtype)
        held = self._views.__dict__
        found = held.get(key)
        if found is None:
            if len(held) >= 8:  # a few addresses per thread: those in use again and again
                held.clear()
            array = np.asarray(_Address(key[0], self.num_params, _NUMPY_DTYPES[flat.dtype]))
            found = held[key] = (array, self._flat_lerp.split(array))
        return found

    # -- anchor cache -------------------------------------------------------------------------

    def _anchor(self, expert: Expert, epoch: int, device: torch.device, dtype) -> "_Anchor":
        """An anchor in the evaluation dtype on the device: its layers as views into one flat vector (copied
        out of the memory-mapped file once, then cached) when they share a dtype, else one tensor each.
        Cached under (expert id, epoch, device, dtype) (torch.device compares as its str: "cuda" is not
        "cuda:0"); _piece looks these keys up too."""
        key = (expert.id, epoch, device, dtype)
        hit = self._hit(key)
        if hit is not None:
            return hit
        rel = anchor_name(epoch)
        buf = expert._bytes(rel, mapped=True)
        tensors = [t.reshape(-1) for t in anchorfile.decode(buf, self.layers, self._describe(f"{expert._dir}/{rel}"))]
        if dtype is not None or self._stored_dtype is not None:
            flat = torch.empty(self.num_params, dtype=dtype or self._stored_dtype,
                               device=device)
            views = flat.split(self._numels)
            for view, t in zip(views, tensors):
                view.copy_(t)
            held = _Anchor(flat, list(views))
        else:
            if device.type != "cpu":
                tensors = [t.to(device=device, copy=True) for t in tensors]
            held = _Anchor(None, tensors)
        return self._keep(key, held, sum(t.numel() * t.element_size() for t in held.layers))

    def _piece(self, expert: Expert, piece: int, device: torch.device, dtype, difference: bool):
        """(anchor a, anchor b, y - x or None) for the given piece of the expert: the difference (numpy, rounded
        to the dtype, split into _FlatLerp's parts) only with `difference`, which `at` asks for a flat vector on
        the CPU in a numpy dtype. It does not depend on c, so it is cached beside the anchors.

        It also sets the expert's slot, from which `at` reads the piece again while it is the one the expert
        read last (one comparison instead of hashing and reordering three cache keys, on every call): the
        slot exists only while all its entries are cached (an eviction drops the slot of the entry's
        expert), and `at` queues each use of it, applied to the cache's order before the cache is next read
        or changed, so eviction stays least recently used first."""
        epochs = self.meta.anchor_epochs
        a, b = epochs[piece], epochs[piece + 1]
        keys = ((expert.id, a, device, dtype), (expert.id, b, device, dtype), (expert.id, a, b, device, dtype))
        keys = keys if difference else keys[:2]
        x = self._anchor(expert, a, device, dtype)
        y = self._anchor(expert, b, device, dtype)
        d = None
        if difference:
            d = self._hit(keys[2])
            if d is None:
                d = np.subtract(y.array, x.array)
                d = self._keep(keys[2], self._flat_lerp.split(d), d.nbytes, pinned=keys[:2])
        found = (x, y, d)
        with self._lock:  # the piece's slot, if all its entries are held (a difference may not fit)
            cache = self._cache
            if all(key in cache for key in keys):
                self._settle()
                for key in keys:  # used in this order: as the slot's queued uses replay it
                    cache.move_to_end(key)
                self._slots[expert.id] = ((piece, device, dtype, difference), found, keys)
        return found

    def _settle(self, lock: bool = False) -> None:
        """Apply the queued uses of slots (_piece) to the cache's order; the caller holds the lock, or with
        lock=True this takes it."""
        if lock:
            with self._lock:
                return self._settle()
        cache, touched = self._cache, self._touched
        while touched:
            for key in touched.popleft():
                if key in cache:  # not if evicted meanwhile
                    cache.move_to_end(key)

    def _hit(self, key):
        with self._lock:
            self._settle()
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
            return hit[0]

    def _keep(self, key, value, nbytes: int, pinned: tuple = ()):
        """Cache value (least recently used first out, `cache_bytes` for everything held). An anchor may push
        out any older entry, and the newest stays even alone over the limit; a difference (pinned: its two
        anchors) never pushes out its own anchors and is not kept where it does not fit beside them.
        An eviction drops the slot (_piece) of the evicted entry's expert."""
        with self._lock:
            self._settle()
            if key in self._cache:  # another thread read it meanwhile
                return self._cache[key][0]
            self._cache[key] = (value, nbytes)
            self._cached += nbytes
            for old in [k for k in self._cache if k != key and k not in pinned]:
                if self._cached <= self._cache_bytes:
                    break
                self._cached -= self._cache.pop(old)[1]
                self._slots.pop(old[0], None)
            if pinned and self._cached > self._cache_bytes:
                self._cached -= self._cache.pop(key)[1]
                self._slots.pop(key[0], None)
        return value

    def close(self) -> None:
        with self._lock:
            self._slots.clear()
            self._touched.clear()
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

    `cache_bytes` bounds what is held in memory: the anchors read (each copied into one flat vector)
    and, for flat vectors on the CPU, each piece's y - x (one more anchor's bytes). `storage_options`
    go to the URL's fsspec filesystem (endpoint, credentials, ...). Anchors of a remote store are
    fetched once into a local disk cache (`cache_dir`, at most `disk_cache_bytes`; defaults in
    trajstore.stores.cache) and verified against the manifest before use."""
    with os_errors(path):
        return CTraj(path, verify_checksums=verify_checksums, cache_bytes=cache_bytes,
                     storage_options=storage_options, cache_dir=cache_dir, disk_cache_bytes=disk_cache_bytes)
