"""Per-layer beta schedules (MCT Eq. 9) and the continuous-c lookup of Eq. 10, on a piecewise path."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

from ..errors import OutOfRangeError, TrajstoreError
from .arguments import integer, integers, real


def check_anchor_epochs(anchor_epochs: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """Anchors are strictly increasing integer epochs from 0 to K = num_timesteps - 1."""
    epochs = integers(anchor_epochs, "anchor_epochs")
    num_timesteps = integer(num_timesteps, "num_timesteps")
    last = num_timesteps - 1
    if num_timesteps < 2:
        raise TrajstoreError(f"a trajectory needs at least 2 timesteps, got {num_timesteps}")
    if len(epochs) < 2 or epochs[0] != 0 or epochs[-1] != last:
        raise TrajstoreError(f"anchor epochs {list(epochs)} must start at 0 and end at K={last}")
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise TrajstoreError(f"anchor epochs {list(epochs)} must be strictly increasing")
    return epochs


def anchor_epochs_with(waypoints: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """Anchor epochs for the given inner waypoints (e.g. (6, 25) for MCT's CIFAR-10 setting)."""
    last = integer(num_timesteps, "num_timesteps") - 1
    inner = sorted(set(integers(waypoints, "waypoints")))
    bad = [w for w in inner if not 0 < w < last]
    if bad:
        raise TrajstoreError(f"waypoints {bad} lie outside the open range (0, {last})")
    return check_anchor_epochs([0, *inner, last], num_timesteps)


def beta_from_norms(step_norms: np.ndarray, anchor_epochs: Sequence[int]) -> np.ndarray:
    """beta[t, l]: layer l's cumulative step length from its piece's first anchor, over the piece's.

    step_norms[t, l] is ||theta_l(t+1) - theta_l(t)||. Each piece is normalised on its own, so beta is
    0 at the piece's first anchor and reaches 1 at its last; at an inner anchor the stored value is 0,
    the start of the next piece (the end of a piece is 1 by definition and is not stored). A layer that
    never moves within a piece gets a linear schedule, which is as good as any for identical endpoints.
    """
    norms = np.asarray(step_norms, dtype=np.float64)
    K, L = norms.shape
    epochs = check_anchor_epochs(anchor_epochs, K + 1)
    beta = np.zeros((K + 1, L), dtype=np.float64)
    for a, b in zip(epochs, epochs[1:]):
        cum = np.cumsum(norms[a:b], axis=0)  # cum[i] = length from a to a+i+1
        total = cum[-1]
        moving = total > 0
        linear = (np.arange(1, b - a + 1, dtype=np.float64) / (b - a))[:, None]
        frac = np.where(moving, cum / np.where(moving, total, 1.0), linear)
        beta[a + 1 : b] = frac[:-1]
    beta[epochs[-1]] = 1.0
    return beta


def locate(c: float, anchor_epochs: Sequence[int]) -> tuple[int, int, int, float]:
    """Position c -> (piece index, floor(c), ceil(c), eta) with the piece that contains c.

    An inner anchor belongs to the piece that starts there, so c = e_j reads anchor e_j exactly.
    """
    last = anchor_epochs[-1]
    if c.__class__ is not float or not 0.0 <= c <= last:  # the usual call (a float in range) passes in one test
        c = real(c, "position c")
        if c < 0 or c > last:
            raise OutOfRangeError(f"position c={c} is outside [0, {last}]")
    piece = bisect.bisect_right(anchor_epochs, c, 0, len(anchor_epochs) - 1) - 1
    lo = int(c)  # floor and ceil: c >= 0
    hi = lo if lo == c else lo + 1
    return piece, lo, hi, c - lo


def piece_weights(beta: np.ndarray | Sequence[Sequence[float]], anchor_epochs: Sequence[int],
                  c: float, nearer: bool = False) -> tuple[int, np.ndarray | list[float]]:
    """Eq. 10 on a piecewise path: (piece index, per-layer weight of the piece's end anchor) at c.

    beta may also be given as rows of Python floats (`beta.tolist()`); the weights then come back as
    a list, with the same float64 arithmetic and so the same values, without numpy's per-call cost.
    With nearer (rows only), each weight w comes as the factor of docs/format.md §7's lerp from the nearer
    anchor: w below 0.5, else -(1 - w) (negative: back from the end anchor; -0.0 at w = 1), computed in
    the same pass (the reader's flat CPU path, where a second pass over the layers costs a cold call more).
    """
    piece, lo, hi, eta = locate(c, anchor_epochs)
    end = anchor_epochs[piece + 1]
    b_lo = beta[lo]
    if beta.__class__ is not list and isinstance(beta, np.ndarray):  # (the rows, from `at`, without the lookup)
        b_hi = np.ones_like(b_lo) if hi == end else beta[hi]
        return piece, (1.0 - eta) * b_lo + eta * b_hi
    b_hi = [1.0] * len(b_lo) if hi == end else beta[hi]
    if nearer:
        return piece, [w if (w := (1.0 - eta) * x + eta * y) < 0.5 else -(1.0 - w) for x, y in zip(b_lo, b_hi)]
    return piece, [(1.0 - eta) * x + eta * y for x, y in zip(b_lo, b_hi)]


# Anchor smoothing (docs/format.md §4.1). The MCT code smooths the anchors it keeps in two ways:
#   "binomial"        convexify.py: an inner anchor e becomes 0.5 theta(e) + 0.25 (theta(e-1) + theta(e+1)),
#                     the end 0.5 theta(K) + 0.25 (theta(K-2) + theta(K-1)); betas follow the smoothed path.
#   "neighbour-mean"  exps/trajectory_compression.py, the store its distill_compressed.py reads: an inner
#                     anchor becomes (theta(e-1) + theta(e+1)) / 2, the end (theta(K-1) + theta(K)) / 2;
#                     betas come from the raw trajectory's step norms.
# "mct" (stores written before both were offered) is binomial anchors with betas from the raw norms.
SMOOTHINGS = ("binomial", "neighbour-mean")
LEGACY_SMOOTHINGS = ("mct",)


def smooth_inner(smoothing: str, before, here, after):
    """The stored inner anchor for theta(e-1), theta(e), theta(e+1) (lists of layer tensors)."""
    if smoothing == "neighbour-mean":
        return [(b + a) / 2 for b, a in zip(before, after)]
    return [0.5 * h + 0.25 * b + 0.25 * a for b, h, a in zip(before, here, after)]


def smooth_end(smoothing: str, k2, k1, k):
    """The stored end anchor for theta(K-2), theta(K-1), theta(K) (k2 is unused by neighbour-mean)."""
    if smoothing == "neighbour-mean":
        return [(y + x) / 2 for y, x in zip(k1, k)]
    return [0.5 * x + 0.25 * y + 0.25 * z for x, y, z in zip(k, k2, k1)]


def betas_follow_smoothed_path(smoothing: str | None) -> bool:
    return smoothing == "binomial"
