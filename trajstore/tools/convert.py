"""`convert`: a legacy buffer (any layout of trajstore.legacy) or a packed archive -> a .ctraj.

Experts are streamed through the .ctraj writer one timestep at a time; the writer keeps only the
previous timesteps, the running step norms and the anchors, and each source timestep's mapped pages
are released once written, so memory stays far below one source file (and one trajectory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..progress import progress_bar
from ..stores import atomic
from ..stores.overlap import check_separate, check_targets_separate
from ..archive import open_archive
from ..stores.location import locate, open_store, where
from ..format.beta import anchor_epochs_with
from ..errors import ExistsError, InvalidTensorError, os_errors
from ..legacy import LegacyBuffer, open_buffer
from ..legacy.fetch import open_remote_buffer
from ..format.reader import open as open_ctraj
from ..format.writer import create
from .reports import WriteReport
from .threads import single_threaded


@dataclass(frozen=True)
class ConvertReport(WriteReport):
    anchor_epochs: tuple[int, ...] = ()

    def __str__(self) -> str:
        return (f"wrote {self.out}: {self.experts} experts x {self.num_timesteps} timesteps, anchors "
                f"{list(self.anchor_epochs)}; {self.bytes_written:,} bytes = {100 * self.ratio:.2f}% of the "
                f"source's {self.source_bytes:,} bytes")


def open_source(src: str | os.PathLike, *, architecture=None, kind: str | None = None,
                storage_options: dict | None = None) -> LegacyBuffer:
    """Full trajectories from a legacy buffer or a packed archive (a path or a URL), behind the
    LegacyBuffer interface; what `src` is, is trajstore.stores.location's decision. A legacy buffer at
    a URL is read from a temporary local copy (trajstore.legacy.fetch)."""
    location = locate(src, storage_options)
    if location.kind == "archive":
        return open_archive(location)
    if location.remote:
        return open_remote_buffer(location, architecture=architecture, kind=kind)
    return open_buffer(location.path, architecture=architecture, kind=kind)


@single_threaded()
@os_errors(arg="out")
def convert(src: str | os.PathLike, out: str | os.PathLike, *, waypoints: Sequence[int] = (),
            smoothing: str | None = None, single_file: bool = False, overwrite: bool = False,
            architecture=None, progress: bool = True, kind: str | None = None,
            training: dict | None = None, storage_options: dict | None = None) -> ConvertReport:
    """Convexify every expert of `src` into a new .ctraj at `out`.

    Anchors are epochs 0 and K plus `waypoints` (MCT uses 6, 25 for CIFAR-10); an MCT waypoint store
    keeps its own waypoints unless others are given. `smoothing` ("binomial" or "neighbour-mean", the
    MCT code's two; docs/format.md §4.1) smooths inner and end anchors. `architecture` names the tensors (see `trajstore.legacy.open_buffer`);
    `training` is merged over what the buffer's directory name says (dataset, ZCA). `out` may be a URL
    (s3://bucket/experts.ctraj); `storage_options` go to its fsspec filesystem.
    """
    target = locate(out, storage_options)
    if target.remote:
        source_at = locate(src, storage_options)
        check_targets_separate([source_at], target)
        if target.exists() and not overwrite:
            raise ExistsError("already exists (pass overwrite=True / --force to replace it)", target.url)
        source = open_source(source_at, architecture=architecture, kind=kind)
        out = target.url
    else:
        out = target.path
        check_separate([src], out)
        if (out.exists() or out.is_symlink()) and not overwrite:  # before scanning and hashing the whole source
            raise ExistsError("already exists (pass overwrite=True / --force to replace it)", out)
        if out.is_symlink() and not out.exists():
            raise ExistsError("is a dangling symbolic link; remove it or choose another output", out)
        source = open_source(src, architecture=architecture, kind=kind, storage_options=storage_options)
        check_separate(source.files, out)
    if waypoints:
        anchors = anchor_epochs_with(waypoints, source.num_timesteps)
    else:
        anchors = source.anchor_epochs or (0, source.num_timesteps - 1)
    info = {"epochs": source.num_timesteps - 1, **source.training, **(training or {})}
    provenance = {
        "converted_from": where(source.path),
        "source_kind": source.kind,
        "sources": source.source_files(),
    }
    # Built under a hidden name of our own and moved into place when complete: a failure removes only
    # that, never an `out` another process may have created meanwhile, and a conversion is never joined.
    # An object store has no rename: the store is written in place and opens only once complete (a
    # replace writes new keys beside the old store and switches with its root: docs/format.md §8).
    if target.remote:
        build, published, replacing, owned = target, False, target.exists(), False
    else:
        with os_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
        scratch = atomic.Scratch(out)
        build = scratch.path
    try:
        with create(build, source.layers, source.num_timesteps, anchor_epochs=anchors, smoothing=smoothing,
                    architecture=source.architecture, training=info, provenance=provenance,
                    single_file=single_file, overwrite=overwrite and target.remote) as writer:
            if target.remote and not (replacing or single_file):  # written at the URL's own keys
                owned = writer.created
                if not owned:  # another process started a store there after our check: never joined, never removed
                    raise ExistsError("was created by another process during this conversion; it is left as "
                                      "it is (choose another output, or --force to replace it)", target.url)
            for i in progress_bar(range(source.num_experts), unit="expert", desc="convert", disable=not progress):
                origin = source.source_of(i)
                try:
                    writer.write_expert(source.timesteps(i), provenance={"source": origin})
                except InvalidTensorError as exc:  # e.g. NaN weights: name the source, not the output
                    raise InvalidTensorError(f"trajectory {origin['index']} cannot be stored: {exc}",
                                             source.file_of(i)) from None
        if target.remote:
            published = True
        else:
            with os_errors(out):
                publish = atomic.publish_file if single_file else atomic.publish_dir
                publish(build, out, overwrite=overwrite)
    finally:
        if not target.remote:
            scratch.release()
        elif not published and owned:  # only a store this created: a failed replace leaves the old one (the
            # writer removed its build) and a single file is uploaded whole or not at all
            open_store(target, mode="w").delete("")
    store = open_ctraj(target)
    return ConvertReport(out=store.path, experts=store.num_experts, num_timesteps=store.num_timesteps,
                         anchor_epochs=store.anchor_epochs, bytes_written=store.nbytes,
                         source_bytes=source.nbytes)
