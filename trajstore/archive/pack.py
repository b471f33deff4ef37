"""`pack` a legacy buffer into the lossless archive and `unpack` it back into MTT buffer files."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..progress import progress_bar
from .. import __version__
from ..stores import atomic
from ..stores.base import ROOT_KEY, fresh_group
from ..stores.files import ScratchStore
from ..stores.location import locate, open_store, where
from ..stores.overlap import check_separate, check_targets_separate
from ..errors import ExistsError, FormatError, TrajstoreError, os_errors
from ..format.layers import Layer
from ..legacy.mct import MCTPairBuffer
from .codec import XorDeltaCodec
from .store import (BITS, FORMAT, PARAMS, SIGNED, VERSION, ArchiveBuffer, layer_array, open_archive, sealed_root,
                    trajectory_sha256)
from ..tools.reports import WriteReport
from ..tools.threads import single_threaded

# Chosen by measurement on trained ConvNet trajectories (docs/format.md, "Archive (pack) layout"): a
# chunk holds STRIDE timesteps of one layer (51 = 3 x 17), so reading any (expert, t) decodes one
# chunk per layer, within 1% of the size of whole-trajectory chunks; blosc's byte shuffle + zstd at
# level 1 in 1 MiB blocks was as small as higher levels and the fastest.
STRIDE = 17
BLOSC = {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20}


@dataclass(frozen=True)
class PackReport(WriteReport):
    def __str__(self) -> str:
        return (f"packed {self.experts} experts x {self.num_timesteps} timesteps into {self.out}: "
                f"{self.bytes_written:,} bytes = {100 * self.ratio:.1f}% of the source's {self.source_bytes:,} bytes")


def _codecs(layer: Layer) -> dict:
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    return {"filters": [XorDeltaCodec(axis=1)], "serializer": BytesCodec(endian="little"),
            "compressors": [BloscCodec(typesize=layer.torch_dtype.itemsize, **BLOSC), Crc32cCodec()]}


def _bits(tensors: list[torch.Tensor]) -> np.ndarray:
    """(timesteps, numel) unsigned bit patterns of one layer's tensors."""
    stacked = torch.stack([t.detach().reshape(-1) for t in tensors])
    return stacked.view(SIGNED[stacked.element_size()]).numpy().view(BITS[stacked.element_size()])


@single_threaded()
@os_errors(arg="out")
def pack(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
         architecture=None, kind: str | None = None, storage_options: dict | None = None) -> PackReport:
    """Losslessly pack every trajectory of the legacy buffer `src` into a new archive at `out`.

    Either may be a URL (s3://bucket/full.zarr; `storage_options` go to its filesystem). The archive's
    root zarr.json is written last, after every array has been written and read back: a local archive
    is built beside `out` and swapped into place in one rename; at a URL (an object store has no
    rename) the arrays go to their keys and the root, one PUT, makes them an archive. Replacing one at
    a URL (`overwrite`) writes the new arrays under a fresh group beside the old archive's keys, so the
    old archive opens, whole, until the new root's PUT switches readers; then the old keys are deleted.
    An interrupted pack never leaves `out` without the old archive (docs/format.md, "Archive").
    """
    import zarr

    from ..tools.convert import open_source

    source_at, target = locate(src, storage_options), locate(out, storage_options)
    check_targets_separate([source_at], target)
    out_store = open_store(target, mode="w")
    out_store._writable()
    present = out_store.present()
    if present and not overwrite:
        raise ExistsError("already exists (pass overwrite=True / --force to replace it)", target.url)
    if source_at.kind == "archive":
        raise TrajstoreError("is already a packed archive", source_at.url)
    source = open_source(source_at, architecture=architecture, kind=kind)
    if isinstance(source, MCTPairBuffer):
        raise FormatError(f"is an MCT waypoint store ({source.kind}), already compressed; convert it to a "
                          ".ctraj instead (packing keeps full trajectories)", source_at.url)
    if not source_at.remote and not target.remote:
        check_separate(source.files, target.path)
    group, replacing = PARAMS, target.remote and present
    if not target.remote:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        build = ScratchStore(atomic.Scratch(target.path))
    elif replacing:  # among the old archive's keys: a group it does not use; the root is held until the switch
        build, group = out_store.begin_build(), fresh_group(PARAMS)
    else:
        build = out_store
    try:
        store = build.zarr_store(read_only=False, prefix=group)
        zarr.open_group(store=store, mode="w-", zarr_format=3)  # <group>/zarr.json
        arrays = []
        shape = (source.num_experts, source.num_timesteps)
        for index, layer in enumerate(source.layers):
            arrays.append(zarr.create_array(
                store, name=layer_array(index), shape=(*shape, layer.numel), dtype=BITS[layer.torch_dtype.itemsize],
                chunks=(1, min(STRIDE, source.num_timesteps), max(layer.numel, 1)), fill_value=0,
                attributes={"layer": layer.to_json()}, config={"write_empty_chunks": True}, **_codecs(layer)))
        experts = []
        with progress_bar(total=source.num_experts, unit="expert", desc="pack", disable=not progress) as bar:
            for i, steps in enumerate(source.iter_trajectories()):
                for index, arr in enumerate(arrays):
                    arr[i] = _bits([step[index] for step in steps])
                experts.append({**source.source_of(i), "sha256": trajectory_sha256(steps)})
                bar.update()
        meta = {
            "format": FORMAT, "version": VERSION, "num_experts": source.num_experts,
            "num_timesteps": source.num_timesteps, "stride": min(STRIDE, source.num_timesteps),
            "layers": [layer.to_json() for layer in source.layers], "architecture": source.architecture,
            "training": source.training, "experts": experts,
            "source": {"path": where(src), "kind": source.kind, "bytes": source.nbytes,
                       "files": [{**f, "trajectories": n} for f, n in zip(source.source_files(), source.file_counts)]},
            "provenance": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "tool": f"trajstore {__version__}"},
            **({"params_group": group} if group != PARAMS else {}),
        }
        root = sealed_root(build, meta)
        build.write_bytes(ROOT_KEY, root)  # a build at a URL replacing an archive holds it until the switch
        packed = open_archive(build)  # what was written must read back before it replaces anything
        keys = build.files(group)
        written = len(root) + sum(build.size(key) for key in keys)
        if not target.remote:
            atomic.publish_dir(build.root, target.path, overwrite=overwrite)
        elif replacing:
            build.written.update(keys)  # kept by the switch, which deletes every other key
    except BaseException:
        build.delete(group if replacing else "")
        raise
    finally:
        if isinstance(build, ScratchStore):
            build.release()
    if replacing:
        out_store.finish_build(build)  # the root's PUT switches readers; a failure after it keeps the new archive
    return PackReport(out=target.path if target.path is not None else target.url, experts=packed.num_experts,
                      num_timesteps=packed.num_timesteps, bytes_written=written, source_bytes=source.nbytes)


@single_threaded()
@os_errors(arg="out_dir")
def unpack(archive: str | os.PathLike, out_dir: str | os.PathLike, *, per_file: int | None = 10,
           overwrite: bool = False, progress: bool = True, storage_options: dict | None = None) -> list:
    """Write the archive's trajectories as MTT buffer files `replay_buffer_{n}.pt` in `out_dir`,
    `per_file` per file (None: the packed source's own file names and partition), each tensor
    bit-identical to the source: every expert is checked against the sha256 recorded when packing.
    Either may be a URL (`storage_options` go to its filesystem); returns the files written (Paths,
    or URLs)."""
    from ..tools.export import write_buffer_dir

    source_at, target = locate(archive, storage_options), locate(out_dir, storage_options)
    check_targets_separate([source_at], target)
    buf: ArchiveBuffer = open_archive(source_at)
    if per_file is None:
        groups: dict[str, list[int]] = {}
        for i in range(buf.num_experts):
            groups.setdefault(buf.source_of(i)["file"], []).append(i)
        plan = list(groups.items())
    elif per_file < 1:
        raise TrajstoreError(f"per_file must be at least 1, got {per_file}")
    else:
        plan = [(f"replay_buffer_{n}.pt", list(range(first, min(first + per_file, buf.num_experts))))
                for n, first in enumerate(range(0, buf.num_experts, per_file))]

    def files(bar):
        for name, experts in plan:
            trajectories = []
            for i in experts:
                steps = buf.trajectory(i)  # checked against the sha256 recorded when packing
                trajectories.append([[t.clone() for t in step] for step in steps])  # a storage per tensor
                bar.update()
            yield name, trajectories

    with progress_bar(total=buf.num_experts, unit="expert", desc="unpack", disable=not progress) as bar:
        return write_buffer_dir(target, files(bar), overwrite=overwrite)
