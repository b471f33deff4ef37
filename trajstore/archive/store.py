"""Reading a packed archive: the lossless zarr store of full legacy trajectories.

Layout (docs/format.md, "Archive (pack) layout"): a zarr v3 group whose `trajstore_archive`
attribute holds the layer table, counts, the source's files and one sha256 per expert; one array per
layer under `params/`, shape (experts, K+1, numel), holding the tensors' bit patterns as unsigned
integers in chunks of (1, stride, numel).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ChecksumError, FormatError, VersionError
from ..format.layers import Layer
from ..legacy.buffer import LegacyBuffer
from ..stores.base import ROOT_KEY
from ..stores.location import ARCHIVE_ATTRIBUTE, locate, open_store
from . import codec  # noqa: F401  (registers the XOR filter with zarr before any array is opened)

FORMAT = "ctraj-archive"
VERSION = 1
ATTRIBUTE = ARCHIVE_ATTRIBUTE
PARAMS = "params"
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def array_name(index: int) -> str:
    return f"{PARAMS}/{index:03d}"


def is_archive(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
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

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None):
        import zarr

        location = locate(path, storage_options)
        self.path = location.path if location.path is not None else location.url  # Path, or a URL
        self._name = location.name
        meta = location.archive_attributes() if location.is_dir() else None
        if meta is None:
            raise FormatError("not a trajstore archive (no trajstore_archive attribute in zarr.json)", self.path)
        self._files = open_store(location)
        if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
            raise FormatError("malformed archive metadata", self._files.describe(ROOT_KEY))
        if meta["version"] > VERSION:
            raise VersionError(f"written by archive version {meta['version']}; this trajstore reads up to "
                               f"{VERSION} (upgrade trajstore)", self.path)
        try:
            layers = tuple(Layer.from_json(x, self.path) for x in meta["layers"])
            self._experts = list(meta["experts"])
            num_timesteps = int(meta["num_timesteps"])
            self.stride = int(meta["stride"])
            self._source = dict(meta["source"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"malformed archive metadata ({exc})", self._files.describe(ROOT_KEY)) from None
        path = self.path
        super().__init__([Path(location.name)], [len(self._experts)], num_timesteps, layers, meta.get("architecture"))
        self.path = path
        self.training = dict(meta.get("training") or {})
        self._store = self._files.zarr_store()
        self._arrays = []
        for index, layer in enumerate(layers):
            where = self._files.describe(array_name(index))
            try:
                arr = zarr.open_array(store=self._store, path=array_name(index), mode="r")
            except Exception as exc:  # zarr reports missing or corrupt metadata with many types
                raise FormatError(f"cannot open the array of layer {layer.name!r} ({type(exc).__name__}: {exc})",
                                  where) from None
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
        return {"archive": self._name, "file": entry.get("file"), "index": entry.get("index")}

    def _read(self, index: int, selection) -> np.ndarray:
        try:
            return self._arrays[index][selection]
        except Exception as exc:  # a corrupt chunk fails its CRC32C or zstd with assorted types
            raise ChecksumError(f"cannot decode layer {self.layers[index].name!r} ({type(exc).__name__}: {exc}); "
                                "the archive is corrupt", self._files.describe(array_name(index))) from None

    def _tensor(self, bits: np.ndarray, layer: Layer) -> torch.Tensor:
        signed = bits.view(bits.dtype.str.replace("u", "i"))
        return torch.from_numpy(signed).view(layer.torch_dtype)

    def trajectory(self, i: int) -> list[list[torch.Tensor]]:
        _, j = self.locate(i)
        per_layer = [self._tensor(self._read(k, (j,)), layer) for k, layer in enumerate(self.layers)]
        return [[x[t].view(layer.shape) for x, layer in zip(per_layer, self.layers)]
                for t in range(self.num_timesteps)]

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
        for i, steps in enumerate(self.iter_trajectories()):
            self.check(i, steps)


def open_archive(path: str | os.PathLike, storage_options: dict | None = None) -> ArchiveBuffer:
    """Open a packed archive (a path or URL) for reading, with the interface of `trajstore.legacy.open_buffer`."""
    return ArchiveBuffer(path, storage_options)
