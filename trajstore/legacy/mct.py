"""The official MCT code's compressed store: `waypoint_buffer[_tag]_{n}.pt` + `step_buffer[_tag]_{n}.pt`.

Per trajectory the waypoint file holds the waypoint models (a list of parameter lists) and the step
file the per-tensor betas of every point: a flat list of K+1 points for two waypoints, else one list
per piece whose points include both ends (docs/legacy-formats.md §5). Timestep t of piece [a, b] is
`torch.lerp(w_a, w_b, beta)` per tensor, exactly as MCT's `CompressedTrajectoryWithInterpolation`
computes it; at a waypoint epoch the stored waypoint itself is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DegenerateTrajectoryError, FormatError
from . import loading
from .buffer import LegacyBuffer, table_for
from .validation import as_list, describe_difference, signature, trajectories


def _betas(entry, num_layers: int, what: str, where) -> list:
    values = as_list(entry, what, where)
    if len(values) != num_layers:
        raise FormatError(f"{what} holds {len(values)} betas for {num_layers} tensors", where)
    for v in values:
        x = float(v) if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1) else None
        if x is None or not math.isfinite(x):
            raise FormatError(f"{what} holds {v!r}, expected finite scalar betas", where)
    return values


def _pieces(steps, num_waypoints: int, num_layers: int, what: str, where, check: bool = True) -> list[list]:
    """The step entries of one trajectory as one list of points per piece (`check`: validate every beta)."""
    steps = as_list(steps, what, where)
    if not steps:
        raise FormatError(f"{what} is empty", where)
    nested = isinstance(steps[0], (list, tuple)) and steps[0] and isinstance(steps[0][0], (list, tuple))
    pieces = [as_list(p, f"{what}, piece {k}", where) for k, p in enumerate(steps)] if nested else [steps]
    if len(pieces) != num_waypoints - 1:
        raise FormatError(f"{what} has {len(pieces)} piece(s) for {num_waypoints} waypoints", where)
    for k, piece in enumerate(pieces if check else ()):
        if len(piece) < 2:
            raise DegenerateTrajectoryError(f"{what}, piece {k} has {len(piece)} point(s); a piece needs 2", where)
        for j, entry in enumerate(piece):
            _betas(entry, num_layers, f"{what}, piece {k}, point {j}", where)
    return pieces


class MCTPairBuffer(LegacyBuffer):
    """Trajectories materialised from MCT waypoint + step files, one pair of files loaded at a time."""

    def __init__(self, files: Sequence[Path], steps: Sequence[Path], kind: str, architecture=None,
                 hint: str | None = None):
        self.pairs = list(zip(files, steps))
        counts, sig, epochs = [], None, None
        for wfile, sfile in self.pairs:
            waypoints, pieces_of = self._load_pair(wfile, sfile)
            for j, wps in enumerate(waypoints):
                got = signature(wps[0], f"trajectory {j}, waypoint 0", wfile)
                if sig is not None and got != sig:
                    raise DegenerateTrajectoryError(f"trajectory {j} does not have the shapes of the first: "
                                                    f"{describe_difference(sig, got)}", wfile)
                sig = got
                for k, wp in enumerate(wps[1:], 1):
                    if signature(wp, f"trajectory {j}, waypoint {k}", wfile) != sig:
                        raise DegenerateTrajectoryError(f"trajectory {j}: waypoint {k} differs in shape from "
                                                        "waypoint 0", wfile)
                pieces = _pieces(pieces_of[j], len(wps), len(sig), f"trajectory {j} of {sfile.name}", sfile)
                these = tuple(np.cumsum([0] + [len(p) - 1 for p in pieces]).tolist())
                if epochs is not None and these != epochs:
                    raise DegenerateTrajectoryError(f"ragged store: trajectory {j} has waypoints at epochs "
                                                    f"{list(these)}, the first at {list(epochs)}", sfile)
                epochs = these
            counts.append(len(waypoints))
        layers, arch = table_for(sig, architecture, hint, files[0].parent)
        super().__init__([p for pair in self.pairs for p in pair], counts, epochs[-1] + 1, layers, arch)
        self.kind = kind
        self.anchor_epochs = epochs
        self._loaded: tuple[int, list, list] | None = None
        self._moving: set[int] = set()

    def file_of(self, i: int) -> Path:
        return self.pairs[self.locate(i)[0]][0]

    def source_of(self, i: int) -> dict:
        f, j = self.locate(i)
        return {"file": self.pairs[f][0].name, "steps": self.pairs[f][1].name, "index": j}

    @staticmethod
    def _load_pair(wfile: Path, sfile: Path, quiet: bool = False) -> tuple[list, list]:
        loaded = trajectories(loading.load(wfile, quiet=quiet)[0], wfile)
        waypoints = [as_list(w, f"trajectory {j}", wfile) for j, w in enumerate(loaded)]
        steps = trajectories(loading.load(sfile, quiet=quiet)[0], sfile)
        if len(steps) != len(waypoints):
            raise FormatError(f"holds {len(steps)} trajectories, its waypoint file {wfile.name} "
                              f"{len(waypoints)}", sfile)
        for j, wps in enumerate(waypoints):
            if len(wps) < 2:
                raise DegenerateTrajectoryError(f"trajectory {j} has {len(wps)} waypoint(s); it needs 2", wfile)
        return waypoints, steps

    def _expert(self, i: int) -> tuple[list, list[list]]:
        f, j = self.locate(i)
        if self._loaded is None or self._loaded[0] != f:
            self._loaded = None
            for path in self.pairs[f]:  # a rewrite may keep the count and shapes and change the numbers
                self._unchanged(path)
            self._loaded = (f, *self._load_pair(*self.pairs[f], quiet=True))
        wfile, sfile = self.pairs[f]
        waypoints = self._loaded[1][j]
        pieces = _pieces(self._loaded[2][j], len(waypoints), len(self.layers), f"trajectory {j} of {sfile.name}",
                         sfile, check=i not in self._moving)
        if i not in self._moving:
            if all(all(torch.equal(a, b) for a, b in zip(waypoints[0], wp)) for wp in waypoints[1:]):
                raise DegenerateTrajectoryError(f"trajectory {j}: all {len(waypoints)} waypoints are identical",
                                                wfile)
            self._moving.add(i)
        return waypoints, pieces

    def _point(self, waypoints: list, pieces: list[list], t: int) -> list[torch.Tensor]:
        epochs = self.anchor_epochs
        if t in epochs:
            return list(waypoints[epochs.index(t)])
        p = int(np.searchsorted(epochs, t, side="right")) - 1
        betas = pieces[p][t - epochs[p]]
        return [torch.lerp(a, b, float(w)) for a, b, w in zip(waypoints[p], waypoints[p + 1], betas)]

    def trajectory(self, i: int) -> list[list[torch.Tensor]]:
        waypoints, pieces = self._expert(i)
        return [self._point(waypoints, pieces, t) for t in range(self.num_timesteps)]

    def timestep(self, i: int, t: int) -> list[torch.Tensor]:
        t = self._check_t(t)
        return self._point(*self._expert(i), t)

    def waypoints(self, i: int) -> list[list[torch.Tensor]]:
        """The stored waypoint models of expert i (one per anchor epoch)."""
        return [list(wp) for wp in self._expert(i)[0]]

    def betas(self, i: int) -> np.ndarray:
        """(K+1, L) float64 betas in the .ctraj convention: each piece from 0; beta[K] is the stored last value."""
        _, pieces = self._expert(i)
        rows = [[float(b) for b in point] for piece in pieces for point in piece[:-1]]
        rows.append([float(b) for b in pieces[-1][-1]])
        return np.asarray(rows, dtype=np.float64)
