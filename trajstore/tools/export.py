"""`export_mtt`: a .ctraj -> a legacy MTT buffer of its convexified trajectories.

Any MTT-family `distill.py` then trains on the convexified trajectories unchanged: files
`replay_buffer_0.pt`, `_1`, ... (numbered from 0 without gaps, as upstream readers probe them), each
`torch.save` of a plain list of trajectories, each the K+1 timesteps theta(0..K) materialised with
`Expert.at(t)`, each timestep a list of contiguous CPU float32 tensors in parameter order.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..progress import progress_bar
from ..stores import atomic
from ..stores.location import Location, open_store
from ..stores.overlap import check_separate
from ..errors import ExistsError, StorageError, TrajstoreError, os_errors
from ..format.reader import open as open_ctraj
from .threads import single_threaded


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An output directory may be absent or empty; anything else is replaced only with overwrite."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise ExistsError("exists and is not a directory", out_dir)
    if any(out_dir.iterdir()) and not overwrite:
        raise ExistsError("already exists and is not empty (pass overwrite=True / --force to replace it)", out_dir)


def write_buffer_dir(out_dir, files: Iterable[tuple[str, list]], *, overwrite: bool) -> list:
    """`torch.save` each (name, trajectories) of `files` into a hidden sibling of `out_dir`, then move it
    into place: the directory appears complete or not at all. `files` is consumed lazily, so only one
    file's trajectories are held at a time. `out_dir` may be a Location at a URL (`_write_buffer_url`)."""
    if isinstance(out_dir, Location):
        if out_dir.remote:
            return _write_buffer_url(out_dir, files, overwrite=overwrite)
        out_dir = out_dir.path
    check_out_dir(out_dir, overwrite)
    with os_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = atomic.Scratch(out_dir)
    tmp, names = scratch.path, []
    try:
        with os_errors(out_dir):
            tmp.mkdir()
            for name, trajectories in files:
                _save(trajectories, tmp / name, out_dir / name)
                names.append(name)
                del trajectories
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # an empty directory made beforehand is taken as "write here"
            atomic.publish_dir(tmp, out_dir, overwrite=overwrite)
    finally:
        scratch.release()
    return [out_dir / name for name in names]


def _write_buffer_url(location: Location, files: Iterable[tuple[str, list]], *, overwrite: bool) -> list[str]:
    """The buffer files at a URL. An object store has no rename, so the directory cannot appear whole:
    each file is one PUT (all or nothing), and the first file is written last (kept in a local
    temporary file meanwhile), so an interrupted upload leaves no `replay_buffer_0.pt` and upstream
    readers, which start at 0, find nothing rather than part of the buffer. `overwrite` deletes what
    is there first; a failure deletes what was written."""
    store = open_store(location, mode="w")
    store._writable()
    if store.files(""):
        if not overwrite:
            raise ExistsError("already exists and is not empty (pass overwrite=True / --force to replace it)",
                              location.url)
        store.delete("")
    names: list[str] = []
    try:
        with tempfile.TemporaryFile() as first:
            for name, trajectories in files:
                if not names:
                    _save(trajectories, first, store.describe(name))
                else:
                    held = io.BytesIO()
                    _save(trajectories, held, store.describe(name))
                    store.write_bytes(name, held.getvalue())
                names.append(name)
                del trajectories
            if names:
                first.seek(0)
                store.write_bytes(names[0], first.read())
    except BaseException:
        store.delete("")
        raise
    return [store.describe(name) for name in names]


def _save(obj, path, final) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as exc:  # torch reports a failed write (a full disk) as a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "write failed"
        raise StorageError(f"cannot write it (torch: {first}); check the free disk space", final) from None


@single_threaded()
@os_errors(arg="out_dir")
def export_mtt(ctraj_path: str | os.PathLike, out_dir: str | os.PathLike, *, per_file: int = 10,
               overwrite: bool = False, progress: bool = True, storage_options: dict | None = None) -> list[Path]:
    """Write the MTT buffer files of every expert of `ctraj_path` into `out_dir`; returns the files.

    An existing non-empty directory is replaced only with `overwrite`. One output file (per_file
    trajectories) is held in memory at a time, as upstream does.
    """
    if per_file < 1:
        raise TrajstoreError(f"per_file must be at least 1, got {per_file}")
    check_separate([ctraj_path], out_dir)
    check_out_dir(Path(out_dir), overwrite)  # before the progress bar starts
    store = open_ctraj(ctraj_path, storage_options=storage_options)
    # float32 stores are read zero-copy; others are cast, since MTT buffers hold float32
    dtype = None if all(layer.dtype == "F32" for layer in store.layers) else torch.float32

    def files(bar):
        for n, first in enumerate(range(0, store.num_experts, per_file)):
            trajectories = []
            for i in range(first, min(first + per_file, store.num_experts)):
                expert = store.expert(i)
                trajectories.append([[t.contiguous() for t in expert.at(c, dtype=dtype).values()]
                                     for c in range(store.num_timesteps)])
                bar.update()
            yield f"replay_buffer_{n}.pt", trajectories

    with progress_bar(total=store.num_experts, unit="expert", desc="export", disable=not progress) as bar:
        return write_buffer_dir(Path(out_dir), files(bar), overwrite=overwrite)
