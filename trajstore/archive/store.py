"""Reading a packed archive: the lossless zarr store of full legacy trajectories.

Layout (docs/format.md, "Archive (pack) layout"): a zarr v3 group whose `trajstore_archive`
attribute holds the layer table, counts, the source's files and one sha256 per expert; one array per
layer under `params/`, shape (experts, K+1, numel), holding the tensors' bit patterns as unsigned
integers in chunks of (1, stride, numel). Everything is read through a Store (trajstore.stores), so an
archive at a URL (s3://, memory://, ...) reads as a local one does, chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ChecksumError, FormatError, TrajstoreError, VersionError
from ..format import checksums
from ..format.arguments import short_repr
from ..format.layers import Layer
from ..format.layout import SHA256_HEX, is_int
from ..legacy.buffer import LegacyBuffer
from ..stores.base import ROOT_KEY, Store, is_group
from ..stores.files import DirectoryStore
from ..stores.location import locate, open_store
from . import codec  # noqa: F401  (registers the XOR filter with zarr before any array is opened)

FORMAT = "ctraj-archive"
VERSION = 2  # 2: the root records its own sha256 and each array's zarr.json sha256
ATTRIBUTE = "trajstore_archive"
PARAMS = "params"
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def layer_array(index: int) -> str:
    """The name of layer index's array in the params group."""
    return f"{index:03d}"


def array_name(index: int, group: str = PARAMS) -> str:
    return f"{group}/{layer_array(index)}"


def params_group(meta: dict) -> str:
    """The group the root's archive attribute names for the layer arrays: "params" (or absent), or
    where a replace at a URL (no rename) wrote the new arrays beside the old ones, a `fresh_group`."""
    return meta.get("params_group") or PARAMS


def archive_store(target, storage_options: dict | None = None) -> Store:
    """The Store of the archive at `target`: a Store as it is, else a local path or URL (an archive is
    always a directory: a zarr hierarchy)."""
    if isinstance(target, Store):
        return target
    return open_store(locate(target, storage_options), mode="w")  # "w": the directory form, present or not


def _root_meta(store: Store) -> dict | None:
    try:
        doc = json.loads(store.read_bytes(ROOT_KEY))
    except (TrajstoreError, OSError, ValueError, RecursionError):
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs.get(ATTRIBUTE) if isinstance(attrs, dict) else None


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the types of the archive attribute, if anything."""
    checks = {
        "layers": lambda v: isinstance(v, list) and len(v) > 0,
        "num_timesteps": lambda v: is_int(v) and v >= 2,
        "stride": lambda v: is_int(v) and v >= 1,
        "source": lambda v: isinstance(v, dict),
        "params_group": lambda v: v is None or is_group(v, PARAMS),
        "experts": lambda v: isinstance(v, list) and all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and SHA256_HEX.fullmatch(e["sha256"])
            for e in v),
    }
    for key, ok in checks.items():
        if not ok(meta.get(key)):
            return f"{key!r} is {short_repr(meta.get(key))}"
    return None


def _check_sealed(store: Store, meta: dict, num_layers: int) -> None:
    """Version 2: the root zarr.json matches its own sha256 and lists the sha256 of every array's
    zarr.json (codecs, shape, layer), so no metadata that decides the numbers can change unseen."""
    where = store.describe(ROOT_KEY)
    arrays, digest = meta.get("arrays"), meta.get("sha256")
    if (not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest) or not isinstance(arrays, list)
            or len(arrays) != num_layers or not all(isinstance(a, str) and SHA256_HEX.fullmatch(a) for a in arrays)):
        raise FormatError("malformed archive metadata: 'sha256' and 'arrays' must be sha256 digests, one per layer",
                          where)
    checksums.check_sealed(store.read_bytes(ROOT_KEY), digest, where)
    for index, recorded in enumerate(arrays):
        key = f"{array_name(index, params_group(meta))}/{ROOT_KEY}"
        checksums.check(store.read_bytes(key), recorded, store.describe(key))  # a missing one: FormatError


def sealed_root(store: Store, meta: dict) -> bytes:
    """The root zarr.json of an archive whose arrays `store` holds: a zarr group document with the
    archive attribute `meta`, recording each array's zarr.json sha256 and the root's own sha256 (pack)."""
    group = params_group(meta)
    meta = {**meta, "arrays": [checksums.sha256(store.read_bytes(f"{array_name(i, group)}/{ROOT_KEY}"))
                               for i in range(len(meta["layers"]))], "sha256": checksums.PLACEHOLDER}
    doc = {"attributes": {ATTRIBUTE: meta}, "zarr_format": 3, "node_type": "group"}
    return checksums.seal(json.dumps(doc, indent=2).encode(), store.describe(ROOT_KEY))


def is_archive(path, storage_options: dict | None = None) -> bool:
    """True for a directory (local or at a URL) whose root zarr.json carries the archive attribute."""
    return locate(path, storage_options).kind == "archive"


def trajectory_sha256(steps) -> str:
    """sha256 over a trajectory's tensor bytes, timestep by timestep, tensor by tensor."""
    h = hashlib.sha256()
    for step in steps:
        for t in step:
            h.update(t.detach().contiguous().view(-1).view(SIGNED[t.element_size()]).numpy().tobytes())
    return h.hexdigest()


class ArchiveBuffer(LegacyBuffer):
    """A packed archive behind the LegacyBuffer interface; `timestep(i, t)` decodes only the chunk
    (stride timesteps of one layer) holding t, for each layer."""

    kind = "archive"

    def __init__(self, target, storage_options: dict | None = None):
        import zarr

        store = archive_store(target, storage_options)
        # a local archive is named by its Path (as before), one at a URL by the URL
        self.path = store.root if isinstance(store, DirectoryStore) else store.url
        root_json = store.describe(ROOT_KEY)
        meta = _root_meta(store)
        if meta is None:
            raise FormatError("not a trajstore archive (no trajstore_archive attribute in zarr.json)", self.path)
        if meta.get("format") != FORMAT or not is_int(meta.get("version")) or meta["version"] < 1:
            raise FormatError("malformed archive metadata", root_json)
        if meta["version"] > VERSION:
            raise VersionError(f"written by archive version {meta['version']}; this trajstore reads up to "
                               f"{VERSION} (upgrade trajstore)", self.path)
        problem = _meta_problem(meta)
        if problem:
            raise FormatError(f"malformed archive metadata: {problem}", root_json)
        layers = tuple(Layer.from_json(x, root_json) for x in meta["layers"])
        if meta["version"] >= 2:
            _check_sealed(store, meta, len(layers))
        group = params_group(meta)
        self._experts = list(meta["experts"])
        num_timesteps = meta["num_timesteps"]
        self.stride = meta["stride"]
        self._source = dict(meta["source"])
        path = self.path
        super().__init__([path], [len(self._experts)], num_timesteps, layers, meta.get("architecture"))
        self.path = path
        self.training = dict(meta.get("training") or {})
        self._files = store
        self._store = store.zarr_store(read_only=True)
        self._group = group
        self._arrays = []
        for index, layer in enumerate(layers):
            where = store.describe(array_name(index, group))
            try:
                # zarr_format=3: no probing for version-2 metadata (requests, over a network)
                arr = zarr.open_array(store=self._store, path=array_name(index, group), mode="r", zarr_format=3)
            except Exception as exc:  # zarr reports missing or corrupt metadata with many types
                raise FormatError(f"cannot open the array of layer {layer.name!r} ({type(exc).__name__}: {exc})",
                                  where) from None
            if arr.attrs.get("layer") != layer.to_json():  # the root's table and the array must agree
                raise FormatError(f"array {array_name(index, group)} holds layer {short_repr(arr.attrs.get('layer'))}, "
                                  f"the root's layer table {layer.to_json()}", where)
            want = (len(self._experts), num_timesteps, layer.numel)
            if arr.shape != want or arr.dtype != np.dtype(BITS[layer.torch_dtype.itemsize]):
                raise FormatError(f"array of layer {layer.name!r} is {arr.dtype} {arr.shape}, expected "
                                  f"{np.dtype(BITS[layer.torch_dtype.itemsize])} {want}", where)
            self._arrays.append(arr)

    def __repr__(self):
        return f"<ArchiveBuffer {self.path}: {self.num_experts} experts x {self.num_timesteps} timesteps>"

    @property
    def nbytes(self) -> int:
        return self._files.total_bytes()

    @property
    def source(self) -> dict:
        """What was packed: its kind, path and files (name, bytes, sha256, trajectories)."""
        return dict(self._source)

    def source_files(self) -> list[dict]:
        return [dict(f) for f in self._source.get("files", [])]

    def file_of(self, i: int) -> Path:
        return self.path

    def source_of(self, i: int) -> dict:
        f, j = self.locate(i)
        entry = self._experts[j]
        return {"archive": self._files.url.rstrip("/").rsplit("/", 1)[-1], "file": entry.get("file"),
                "index": entry.get("index")}

    def _read(self, index: int, selection) -> np.ndarray:
        try:
            return self._arrays[index][selection]
        except Exception as exc:  # a corrupt chunk fails its CRC32C or zstd with assorted types
            raise ChecksumError(f"cannot decode layer {self.layers[index].name!r} ({type(exc).__name__}: {exc}); "
                                "the archive is corrupt", self._files.describe(array_name(index, self._group))) from None

    def _tensor(self, bits: np.ndarray, layer: Layer) -> torch.Tensor:
        signed = bits.view(bits.dtype.str.replace("u", "i"))
        return torch.from_numpy(signed).view(layer.torch_dtype)

    def trajectory(self, i: int) -> list[list[torch.Tensor]]:
        """Expert i's timesteps, checked against the sha256 recorded when packing."""
        _, j = self.locate(i)
        per_layer = [self._tensor(self._read(k, (j,)), layer) for k, layer in enumerate(self.layers)]
        steps = [[x[t].view(layer.shape) for x, layer in zip(per_layer, self.layers)]
                 for t in range(self.num_timesteps)]
        self.check(i, steps)
        return steps

    def timestep(self, i: int, t: int) -> list[torch.Tensor]:
        _, j = self.locate(i)
        t = self._check_t(t)
        return [self._tensor(self._read(k, (j, t)), layer).view(layer.shape) for k, layer in enumerate(self.layers)]

    def check(self, i: int, steps) -> None:
        """Raise ChecksumError unless `steps` (expert i's trajectory) hash to what was packed."""
        _, j = self.locate(i)
        if trajectory_sha256(steps) != self._experts[j]["sha256"]:
            raise ChecksumError(f"expert {j} decodes to other bytes than were packed (sha256 mismatch)", self.path)

    def verify(self) -> None:
        """Decode every expert (each chunk checks its CRC32C) and compare with the sha256 recorded at packing."""
        for _ in self.iter_trajectories():  # trajectory() checks each
            pass


def open_archive(path, storage_options: dict | None = None) -> ArchiveBuffer:
    """Open a packed archive (a local path, a URL, or a Store) for reading, with the interface of
    `trajstore.legacy.open_buffer`; `storage_options` go to a URL's filesystem."""
    return ArchiveBuffer(path, storage_options)
