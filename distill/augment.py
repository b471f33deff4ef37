"""Differentiable siamese augmentation (DSA) as the trajectory-matching family uses it.

Upstream (DC/DSA `DiffAugment`, mode "S") picks ONE operation of the strategy per call and applies it
with per-image random parameters; gradients flow to the images through every operation. Here the
randomness comes from one generator seeded by an integer, so a transform can be replayed exactly (the
same seed gives the same operation and parameters), which is what lets real and synthetic batches share
a transform and lets an unrolled student be recomputed step by step. Parameters are drawn on the CPU and
moved to the images' device, so a seed means the same transform on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .defaults import DSA_STRATEGY as STRATEGY


@dataclass(frozen=True)
class DSAParams:
    """Upstream's `ParamDiffAug` values (docs/legacy-formats.md §6)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


class _Draw:
    """Random numbers for one call: per image, or one value shared by the batch (upstream's batch mode)."""

    def __init__(self, generator: torch.Generator | None, n: int, batchwise: bool, x: torch.Tensor,
                 rows: tuple[int, int] | None = None):
        self.g, self.n, self.batchwise, self.x = generator, n, batchwise, x
        # x is rows [first, first + n) of a batch of `total`: draw for the whole batch, keep x's rows.
        self.first, self.total = rows if rows is not None else (0, n)

    def _shape(self, *rest: int) -> tuple[int, ...]:
        return (1 if self.batchwise else self.total, *rest)

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        return t.expand(self.n, *t.shape[1:]) if self.batchwise else t[self.first:self.first + self.n]

    def rand(self, *rest: int) -> torch.Tensor:
        t = torch.rand(self._shape(*rest), generator=self.g)
        return self._spread(t).to(device=self.x.device, dtype=self.x.dtype)

    def randint(self, low: int, high: int, *rest: int) -> torch.Tensor:
        t = torch.randint(low, high, self._shape(*rest), generator=self.g)
        return self._spread(t).to(device=self.x.device)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, p: DSAParams, d: _Draw):
    r = p.ratio_scale
    sx = d.rand() * (r - 1.0 / r) + 1.0 / r
    sy = d.rand() * (r - 1.0 / r) + 1.0 / r
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x, p: DSAParams, d: _Draw):
    a = (d.rand() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
    return _affine(x, theta)


def _flip(x, p: DSAParams, d: _Draw):
    return torch.where(d.rand(1, 1, 1) < p.prob_flip, x.flip(3), x)


def _color(x, p: DSAParams, d: _Draw):
    x = x + (d.rand(1, 1, 1) - 0.5) * p.brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (d.rand(1, 1, 1) * p.saturation) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (d.rand(1, 1, 1) + p.contrast) + mean


def _grid(x: torch.Tensor, h: int, w: int):
    dev = x.device
    return torch.meshgrid(torch.arange(x.size(0), device=dev), torch.arange(h, device=dev),
                          torch.arange(w, device=dev), indexing="ij")


def _crop(x, p: DSAParams, d: _Draw):
    # Shift by up to ratio * size, filling with zeros: upstream pads one zero pixel and clamps onto it.
    sx, sy = int(x.size(2) * p.ratio_crop_pad + 0.5), int(x.size(3) * p.ratio_crop_pad + 0.5)
    tx = d.randint(-sx, sx + 1, 1, 1)
    ty = d.randint(-sy, sy + 1, 1, 1)
    b, gx, gy = _grid(x, x.size(2), x.size(3))
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[b, gx, gy].permute(0, 3, 1, 2)


def _cutout(x, p: DSAParams, d: _Draw):
    cx, cy = int(x.size(2) * p.ratio_cutout + 0.5), int(x.size(3) * p.ratio_cutout + 0.5)
    ox = d.randint(0, x.size(2) + (1 - cx % 2), 1, 1)
    oy = d.randint(0, x.size(3) + (1 - cy % 2), 1, 1)
    b, gx, gy = _grid(x, cx, cy)
    gx = torch.clamp(gx + ox - cx // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cy // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[b, gx, gy] = 0
    return x * mask.unsqueeze(1)


OPERATIONS: dict[str, Callable] = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip,
                                   "scale": _scale, "rotate": _rotate}


def strategy_operations(strategy: str) -> list[str]:
    """The operations of a strategy like "color_crop_cutout_flip_scale_rotate" ("" or "none": none)."""
    names = [] if strategy.lower() in ("", "none") else strategy.split("_")
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown DSA operations {unknown} in strategy {strategy!r}; known: {list(OPERATIONS)}")
    return names


def dsa(x: torch.Tensor, seed: int | None, strategy: str = STRATEGY, params: DSAParams = DSAParams(), *,
        batchwise: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply one randomly chosen operation of `strategy` to a batch (N, C, H, W), differentiably.

    seed: an integer replays the same operation and parameters (for the same batch size); None draws
    from torch's global generator. batchwise=True gives every image the same parameters, upstream's
    siamese batch mode, so batches of different sizes can share one transform. rows=(first, total):
    x is rows [first, first + N) of a batch of `total` images, and gets exactly those rows' transform
    (how data-parallel processes augment their share of one batch).
    """
    names = strategy_operations(strategy)
    if x.dim() != 4:
        raise ValueError(f"DSA needs a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if not names:
        return x
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    name = names[int(torch.randint(len(names), (1,), generator=g))]
    if rows is not None and not (0 <= rows[0] and rows[0] + x.size(0) <= rows[1]):
        raise ValueError(f"rows {rows} do not hold a batch of {x.size(0)} images")
    return OPERATIONS[name](x, params, _Draw(g, x.size(0), batchwise, x, rows)).contiguous()


def seeded_dsa(generator: torch.Generator, strategy: str = STRATEGY,
               params: DSAParams = DSAParams()) -> Callable[[torch.Tensor], torch.Tensor]:
    """A DSA callable for training loops: each call draws its seed from `generator`, so runs replay."""

    def augment(x: torch.Tensor) -> torch.Tensor:
        return dsa(x, int(torch.randint(2**62, (1,), generator=generator)), strategy, params)

    return augment
