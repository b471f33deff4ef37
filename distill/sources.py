"""Where each distillation iteration's start and target parameters come from.

MCT reads them from a `.ctraj` (any real position c, Eq. 10); classic MTT reads two stored integer
timesteps of a legacy buffer or packed archive. Both hand out flat vectors in parameter order, so the
matching engine never knows which one it is talking to.

Experts are visited as upstream MTT (and the MCT code) visit them: the buffer is shuffled, walked in
order, and shuffled again once every expert has been used (`ExpertWalk`), so no expert repeats before
all have been seen. Discrete starts are `randint(0, max_start)`: integers 0..max_start-1, upper bound
excluded, as upstream's `np.random.randint(0, args.max_start_epoch)`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from trajstore import FormatError, OutOfRangeError, TrajstoreError


@dataclass(frozen=True)
class SampleInfo:
    """Which expert and which two positions one iteration matched."""

    expert: int
    start: float
    target: float

    def to_json(self) -> dict:
        return asdict(self)


class ExpertWalk:
    """Which expert each iteration uses: shuffled passes over all experts, as upstream walks its buffer
    (`random.shuffle(buffer)`, take the next, reshuffle when the pass is over). The permutation comes
    from the caller's generator, so a run stays reproducible from its seed; `state_dict` resumes a pass."""

    def __init__(self, num_experts: int):
        if num_experts < 1:
            raise OutOfRangeError(f"a source needs at least 1 expert, got {num_experts}")
        self.num_experts = int(num_experts)
        self.order: list[int] = []
        self.position = 0

    def next(self, rng: np.random.Generator) -> int:
        if self.position >= len(self.order):
            self.order = [int(e) for e in rng.permutation(self.num_experts)]
            self.position = 0
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        try:
            order, position = [int(e) for e in state["order"]], int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrajstoreError(f"saved expert walk is not readable ({type(exc).__name__}: {exc})") from None
        if (order and sorted(order) != list(range(self.num_experts))) or not 0 <= position <= len(order):
            raise TrajstoreError(f"saved expert walk (order {order}, position {position}) does not fit "
                                 f"{self.num_experts} experts")
        self.order, self.position = order, position


def _pick_expert(source, rng: np.random.Generator, expert: int | None, path) -> int:
    if expert is None:
        return source.walk.next(rng)
    if isinstance(expert, bool) or not isinstance(expert, numbers.Integral) or not 0 <= expert < source.num_experts:
        raise OutOfRangeError(f"expert={expert!r} is not one of the {source.num_experts} experts", path)
    return int(expert)


@runtime_checkable
class TrajectorySource(Protocol):
    """Expert trajectories to sample (start, target) pairs from."""

    walk: ExpertWalk

    @property
    def num_experts(self) -> int: ...

    @property
    def max_position(self) -> int:
        """K: the last position of every trajectory."""

    def sample(self, rng: np.random.Generator, max_start: float, m: float, *, discrete: bool = False,
               device=None, dtype=None, expert: int | None = None) -> tuple[torch.Tensor, torch.Tensor, SampleInfo]:
        """`expert` (default: the next one of `walk`), its start point and the point m later, as flat
        vectors on `device`."""


def _real(x, name: str, path) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise OutOfRangeError(f"{name}={x!r} must be a finite number", path)
    return float(x)


def _integer(x, name: str, path) -> int:
    if _real(x, name, path) != int(x):
        raise OutOfRangeError(f"{name}={x!r} must be an integer", path)
    return int(x)


class ConvexifiedSource:
    """MCT: a start c anywhere on a convexified trajectory, the target at min(c + M, K)."""

    def __init__(self, ctraj):
        self.ctraj = ctraj
        self.walk = ExpertWalk(ctraj.num_experts)

    @property
    def num_experts(self) -> int:
        return self.ctraj.num_experts

    @property
    def max_position(self) -> int:
        return self.ctraj.num_timesteps - 1

    def sample(self, rng: np.random.Generator, max_start: float, m: float, *, discrete: bool = False,
               device=None, dtype=None, expert: int | None = None) -> tuple[torch.Tensor, torch.Tensor, SampleInfo]:
        """c ~ U[0, max_start] (with `discrete`: an integer 0..max_start-1, as MTT and the MCT code's
        ablation draw it); real-valued m is allowed.

        max_start must stay below K so that the target always lies strictly after the start; a
        discrete draw needs max_start >= 1.
        """
        k, path = self.max_position, self.ctraj.path
        if _real(m, "expert_epochs M", path) <= 0:
            raise OutOfRangeError(f"expert_epochs M={m!r} must be > 0", path)
        top = _integer(max_start, "max_start_epoch", path) if discrete else _real(max_start, "max_start_epoch", path)
        if not 0 <= top < k or (discrete and top < 1):
            raise OutOfRangeError(f"max_start_epoch={max_start!r} must lie in [{int(discrete)}, K={k}) so that the "
                                  f"target differs from the start"
                                  + (" and a discrete start 0..max_start_epoch-1 exists" if discrete else ""), path)
        expert = _pick_expert(self, rng, expert, path)
        c = float(rng.integers(top)) if discrete else float(rng.uniform(0.0, top))
        start, target = self.ctraj.expert(expert).window(c, m, flat=True, device=device, dtype=dtype)
        return start, target, SampleInfo(expert, c, min(c + float(m), float(k)))


class LegacySource:
    """Classic MTT: integer start s = randint(0, max_start_epoch) (upper bound excluded, as upstream),
    target s + M, reading only those two timesteps of one trajectory.

    `buffer` is anything with `.num_experts`, `.num_timesteps`, `.layers` and `.timestep(i, t)` returning the
    timestep's tensors in parameter order (`trajstore.legacy.open_buffer`, `trajstore.archive.open_archive`).
    `path` is named in error messages (default: the buffer's own `.path`, when it has one).
    """

    def __init__(self, buffer, path: str | os.PathLike | None = None):
        self.buffer = buffer
        self.path = path if path is not None else getattr(buffer, "path", None)
        self.walk = ExpertWalk(buffer.num_experts)

    @property
    def num_experts(self) -> int:
        return self.buffer.num_experts

    @property
    def max_position(self) -> int:
        return self.buffer.num_timesteps - 1

    def sample(self, rng: np.random.Generator, max_start: float, m: float, *, discrete: bool = True,
               device=None, dtype=None, expert: int | None = None) -> tuple[torch.Tensor, torch.Tensor, SampleInfo]:
        """`discrete` is accepted for the common interface; a legacy buffer only has integer timesteps."""
        k = self.max_position
        m = _integer(m, "expert_epochs M (a legacy buffer has only integer timesteps)", self.path)
        top = _integer(max_start, "max_start_epoch", self.path)
        if m <= 0 or not 1 <= top <= k - m + 1:
            raise OutOfRangeError(f"max_start_epoch={max_start!r} and expert_epochs M={m} need M > 0 and "
                                  f"1 <= max_start_epoch <= K - M + 1 = {k - m + 1} (starts are drawn from "
                                  f"0..max_start_epoch-1, targets must stay within K={k})", self.path)
        expert = _pick_expert(self, rng, expert, self.path)
        s = int(rng.integers(top))
        start = self._flat(expert, s, device, dtype)
        target = self._flat(expert, s + m, device, dtype)
        return start, target, SampleInfo(expert, float(s), float(s + m))

    def _flat(self, expert: int, t: int, device, dtype) -> torch.Tensor:
        tensors = self.buffer.timestep(expert, t)
        shapes = [tuple(layer.shape) for layer in self.buffer.layers]
        got = [tuple(p.shape) for p in tensors]
        if got != shapes:
            raise FormatError(f"expert {expert} timestep {t} holds tensors of shapes {got}, "
                              f"the layer table {shapes}", self.path)
        flat = torch.cat([p.reshape(-1) for p in tensors])
        return flat.to(device=device, dtype=dtype or flat.dtype)


def check_zca(source_training_meta: dict, zca: bool, path: str | os.PathLike) -> None:
    """Refuse to distill with ZCA from a store trained without it, or the reverse.

    Experts trained on whitened images live in a different input space; matching them on unwhitened
    synthetic images (or the reverse) silently produces garbage. A store that does not record
    `training["zca"]` cannot be checked and is accepted.
    """
    recorded = (source_training_meta or {}).get("zca")
    if recorded is None:
        return
    if not isinstance(recorded, bool):
        raise FormatError(f'training metadata "zca" is {recorded!r}; expected true or false', path)
    if recorded != bool(zca):
        made, run = ("with", "without") if recorded else ("without", "with")
        raise TrajstoreError(f"the experts were trained {made} ZCA whitening but this run is {run} it: "
                             f"run {made} ZCA as well, or use experts trained {run} it", path)
