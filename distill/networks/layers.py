"""Building blocks every upstream network shares (no family of its own)."""

from __future__ import annotations

from torch import nn


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Upstream's "instancenorm" is GroupNorm(C, C) (affine, no running statistics); "batchnorm" is
    BatchNorm2d, whose running statistics are buffers, not parameters (see FunctionalNet)."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}")


def activation(name: str) -> nn.Module:
    return {"relu": lambda: nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid,
            "leakyrelu": lambda: nn.LeakyReLU(negative_slope=0.01)}[name]()
