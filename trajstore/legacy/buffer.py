"""Read access to legacy buffers: the interface every source of full trajectories offers, and the
reader for the MTT layout (`replay_buffer_{n}.pt` and MCT's dense `convexified_*` files)."""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..architectures import name_tensors
from ..errors import FormatError, OutOfRangeError
from ..format.layers import DTYPE_NAMES, Layer, layer_table
from . import loading
from .validation import Signature, check_moves, check_trajectory, trajectories


class LegacyBuffer:
    """Experts of full trajectories, read one source file at a time.

    `trajectory(i)` and `timestep(i, t)` hand out read-only tensors (memory-mapped views where the
    file allows): copy them before modifying.
    """

    kind: str = "replay_buffer"
    anchor_epochs: tuple[int, ...] | None = None  # the stored waypoints of an already convexified store

    def __init__(self, files: Sequence[Path], counts: Sequence[int], num_timesteps: int,
                 layers: tuple[Layer, ...], architecture: dict | None):
        self.files = tuple(Path(f) for f in files)
        self.path = self.files[0].parent  # what the user pointed at, for messages (open_buffer sets it)
        self._counts = list(counts)
        self._starts = [0]
        for c in self._counts:
            self._starts.append(self._starts[-1] + c)
        self.num_timesteps = num_timesteps
        self.layers = layers
        self.architecture = architecture
        self.training: dict = {}
        self._stamps = {f: _stamp(f) for f in self.files}

    def _unchanged(self, path: Path) -> None:
        """Refuse a file rewritten since opening: its trajectories may differ while their count does not."""
        if _stamp(path) != self._stamps[path]:
            raise FormatError("the file changed since the buffer was opened (size, time or inode differ); "
                              "open the buffer again", path)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.kind}: {self.num_experts} experts x {self.num_timesteps} timesteps "
                f"in {len(self._counts)} file(s) under {self.files[0].parent}>")

    @property
    def file_counts(self) -> list[int]:
        """Trajectories in each source file."""
        return list(self._counts)

    @property
    def num_experts(self) -> int:
        return self._starts[-1]

    @property
    def num_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the source files on disk."""
        return sum(os.path.getsize(f) for f in self.files)

    def __len__(self) -> int:
        return self.num_experts

    def locate(self, i: int) -> tuple[int, int]:
        """(file index, position in that file) of expert i."""
        k = _index(i)
        if k is None or not 0 <= k < self.num_experts:
            raise OutOfRangeError(f"expert index {i!r} out of range: the buffer has {self.num_experts} experts",
                                  self.files[0].parent)
        f = bisect.bisect_right(self._starts, k) - 1
        return f, k - self._starts[f]

    def source_files(self) -> list[dict]:
        """The files read, with size and sha256, for provenance records."""
        return [{"file": f.name, "bytes": f.stat().st_size, "sha256": loading.file_sha256(f)} for f in self.files]

    def file_of(self, i: int) -> Path:
        """The file holding expert i (for messages)."""
        return self.files[self.locate(i)[0]]

    def source_of(self, i: int) -> dict:
        """Where expert i comes from, for provenance records."""
        f, j = self.locate(i)
        return {"file": self.files[f].name, "index": j}

    def _check_t(self, t: int) -> int:
        k = _index(t)
        if k is None or not 0 <= k < self.num_timesteps:
            raise OutOfRangeError(f"timestep {t!r} out of range [0, {self.num_timesteps - 1}]", self.files[0].parent)
        return k

    def trajectory(self, i: int) -> list[list[torch.Tensor]]:
        """All timesteps of expert i, each a list of tensors in parameter order."""
        raise NotImplementedError

    def timestep(self, i: int, t: int) -> list[torch.Tensor]:
        """Timestep t of expert i as a list of tensors in parameter order."""
        raise NotImplementedError

    def release(self, traj: list[list[torch.Tensor]]) -> None:
        """Tell the buffer a trajectory from `trajectory()` is no longer needed (frees mapped pages)."""

    def timesteps(self, i: int) -> Iterator[list[torch.Tensor]]:
        """Expert i's timesteps in order, each released once the loop moves on (for streaming writers)."""
        for step in self.trajectory(i):
            yield step
            self.release([step])

    def iter_trajectories(self) -> Iterator[list[list[torch.Tensor]]]:
        """Every expert's trajectory in order; each is released once the loop moves on (do not keep it)."""
        for i in range(self.num_experts):
            traj = self.trajectory(i)
            yield traj
            self.release(traj)

    def verify(self) -> None:
        """Read every trajectory once, so any refusal of the buffer surfaces now."""
        for _ in self.iter_trajectories():
            pass


class ReplayBuffer(LegacyBuffer):
    """The MTT layout: each file a list of trajectories, a trajectory a list of timesteps, a timestep the
    list of `net.parameters()`. Opening scans every file's structure (no tensor data is read)."""

    def __init__(self, files: Sequence[Path], kind: str = "replay_buffer", architecture=None,
                 hint: str | None = None):
        counts, num_timesteps, sig, first = [], None, None, None
        for f in files:
            obj, mapped = loading.load(f)
            trajs = trajectories(obj, f)
            for j, traj in enumerate(trajs):
                num_timesteps, sig = check_trajectory(traj, f"trajectory {j}", f, num_timesteps, sig)
            counts.append(len(trajs))
            first = first or (0, trajs, _mapped(trajs, mapped))  # kept: reading usually starts here
            del obj, trajs
        layers, arch = table_for(sig, architecture, hint, files[0].parent)
        super().__init__(files, counts, num_timesteps, layers, arch)
        self.kind = kind
        self._loaded: tuple[int, list, frozenset[int]] | None = first
        self._moving: set[int] = set()

    def _file(self, f: int) -> list:
        if self._loaded is None or self._loaded[0] != f:
            self._loaded = None  # drop the previous file before mapping the next
            self._unchanged(self.files[f])
            obj, mapped = loading.load(self.files[f], quiet=True)
            trajs = trajectories(obj, self.files[f])
            if len(trajs) != self._counts[f]:
                raise FormatError(f"now holds {len(trajs)} trajectories, {self._counts[f]} when opened "
                                      "(the file changed)", self.files[f])
            self._loaded = (f, trajs, _mapped(trajs, mapped))
        return self._loaded[1]

    def _traj(self, i: int) -> list:
        f, j = self.locate(i)
        traj = self._file(f)[j]
        if i not in self._moving:
            check_trajectory(traj, f"trajectory {j}", self.files[f], self.num_timesteps, self._sig)
            check_moves(traj, f"trajectory {j}", self.files[f])
            self._moving.add(i)
        return traj

    @property
    def _sig(self) -> Signature:
        return tuple((layer.shape, layer.torch_dtype) for layer in self.layers)

    def trajectory(self, i: int) -> list[list[torch.Tensor]]:
        return [list(step) for step in self._traj(i)]

    def timestep(self, i: int, t: int) -> list[torch.Tensor]:
        return list(self._traj(i)[self._check_t(t)])

    def release(self, traj: list[list[torch.Tensor]]) -> None:
        if self._loaded is not None:  # only storages of the file mapped now: never ordinary memory
            mapped = self._loaded[2]
            loading.release(t for step in traj for t in step if t.untyped_storage().data_ptr() in mapped)


def _mapped(trajs: list, mapped: bool) -> frozenset[int]:
    """Addresses of the storages of a memory-mapped file's tensors (none if the file was read into memory)."""
    if not mapped:
        return frozenset()
    lists = (list, tuple)
    return frozenset(t.untyped_storage().data_ptr() for traj in trajs if isinstance(traj, lists)
                     for step in traj if isinstance(step, lists) for t in step if isinstance(t, torch.Tensor))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _index(i) -> int | None:
    try:
        return operator.index(i)
    except TypeError:
        return None


def table_for(sig: Signature, architecture, hint: str | None, where) -> tuple[tuple[Layer, ...], dict | None]:
    """The layer table for a buffer's shape signature: named from the architecture, the hint or the shapes."""
    naming = name_tensors([shape for shape, _ in sig], architecture, hint=hint, where=where)
    layers = layer_table([(n, shape, DTYPE_NAMES[dtype]) for n, (shape, dtype) in zip(naming.names, sig)])
    return layers, naming.architecture
