"""Checks that a legacy buffer holds real trajectories: plain nesting, float tensors, one shape table,
one length, and timesteps that actually move (docs/legacy-formats.md §1 lists what goes wrong upstream)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DegenerateTrajectoryError, FormatError
from ..format.layers import DTYPE_NAMES

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def as_list(obj, what: str, where) -> list:
    if not isinstance(obj, (list, tuple)):
        raise FormatError(f"{what} is a {type(obj).__name__}, expected a list (the MTT layout: a list of "
                          "trajectories, each a list of timesteps, each a list of parameter tensors)", where)
    return list(obj)


def trajectories(obj, where) -> list:
    trajs = as_list(obj, "the file's object", where)
    if not trajs:
        raise FormatError("holds no trajectories (an empty list)", where)
    return trajs


def signature(timestep, what: str, where) -> Signature:
    tensors = as_list(timestep, what, where)
    if not tensors:
        raise FormatError(f"{what} holds no tensors", where)
    sig = []
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{what}, entry {j} is a {type(t).__name__}, not a tensor", where)
        if t.dtype not in DTYPE_NAMES:
            raise FormatError(f"{what}, tensor {j} has dtype {t.dtype}; parameters must be floating point "
                              "(float32, float16, bfloat16, float64)", where)
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            # e.g. a stride-0 view of one stored value claiming terabytes: copying it would allocate them
            raise FormatError(f"{what}, tensor {j} claims {tuple(t.shape)} = {t.numel():,} values but the file "
                              f"stores {t.untyped_storage().nbytes():,} bytes for it; refused before allocating "
                              "anything (not a saved parameter tensor)", where)
        sig.append((tuple(t.shape), t.dtype))
    return tuple(sig)


def describe_difference(a: Signature, b: Signature) -> str:
    if len(a) != len(b):
        return f"{len(b)} tensors instead of {len(a)}"
    j = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"tensor {j} is {tuple(b[j][0])} {b[j][1]} instead of {tuple(a[j][0])} {a[j][1]}"


def check_trajectory(traj, what: str, where, num_timesteps: int | None, sig: Signature | None) -> tuple[int, Signature]:
    """Structure of one trajectory against the buffer's length and shape table (None: this one sets them)."""
    steps = as_list(traj, what, where)
    if len(steps) < 2:
        raise DegenerateTrajectoryError(f"{what} has {len(steps)} timestep(s); a trajectory needs at least 2", where)
    if num_timesteps is not None and len(steps) != num_timesteps:
        raise DegenerateTrajectoryError(f"ragged buffer: {what} has {len(steps)} timesteps, the first trajectory "
                                        f"{num_timesteps}", where)
    first = signature(steps[0], f"{what}, timestep 0", where)
    if sig is not None and first != sig:
        raise DegenerateTrajectoryError(f"{what} does not have the shapes of the first trajectory: "
                                        f"{describe_difference(sig, first)}", where)
    for t, step in enumerate(steps[1:], 1):
        got = signature(step, f"{what}, timestep {t}", where)
        if got != first:
            raise DegenerateTrajectoryError(f"{what}, timestep {t} differs in shape from timestep 0: "
                                            f"{describe_difference(first, got)}", where)
    if all(_same_storage(steps[0], step) for step in steps[1:]):
        raise DegenerateTrajectoryError(
            f"{what}: all {len(steps)} timesteps alias one storage, so every timestep is the final model (what "
            "upstream buffer code writes when run on a CPU, where .cpu() returns the live tensor); "
            "regenerate the buffer saving copies (p.detach().cpu().clone())", where)
    return len(steps), first


def _same_storage(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
               and x.storage_offset() == y.storage_offset() for x, y in zip(a, b))


def check_moves(steps: Sequence[Sequence[torch.Tensor]], what: str, where) -> None:
    """Refuse a trajectory whose timesteps are all equal (reads two timesteps unless they are equal)."""
    if not all(torch.equal(a, b) for a, b in zip(steps[0], steps[-1])):
        return
    if all(all(torch.equal(a, b) for a, b in zip(steps[0], step)) for step in steps[1:-1]):
        raise DegenerateTrajectoryError(f"{what}: all {len(steps)} timesteps are identical; there is no "
                                        "trajectory to convexify", where)
