"""The ConvNet family of the trajectory-matching code bases, with their exact module names and order.

Legacy buffers store `list(net.parameters())` without names, so the parameter order and module
indices here must match upstream's for buffers to map 1:1 (reference table: docs/legacy-formats.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from trajstore.architectures.convnet import ConvNetSpec, spec_for
from trajstore.errors import InvalidTensorError, TrajstoreError


class ModelError(TrajstoreError, ValueError):
    """An unknown network name or an unsupported configuration."""


# The family's configurations live with the layer tables trajstore infers names from, so the two
# can never disagree; a ConvNet is built from one.
ConvNetConfig = ConvNetSpec


def config_for(model: str, channel: int, num_classes: int, im_size: Sequence[int]) -> ConvNetConfig:
    """Upstream names: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, ConvNetMP, ConvNetAS, ..."""
    try:
        return spec_for(model, channel, num_classes, im_size)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


class ConvNet(nn.Module):
    def __init__(self, config: ConvNetConfig = ConvNetConfig()):
        super().__init__()
        self.config = config
        self.features, feat = self._make_layers(config)
        self.classifier = nn.Linear(feat[0] * feat[1] * feat[2], config.num_classes)

    @staticmethod
    def _make_layers(cfg: ConvNetConfig):
        layers: list[nn.Module] = []
        im_size = (32, 32) if cfg.im_size[0] == 28 else tuple(cfg.im_size)  # upstream pads MNIST to 32
        shape = [cfg.channel, im_size[0], im_size[1]]
        in_channels = cfg.channel
        for d in range(cfg.depth):
            padding = 3 if cfg.channel == 1 and d == 0 else 1
            layers.append(nn.Conv2d(in_channels, cfg.width, kernel_size=3, padding=padding))
            shape[0] = cfg.width
            if cfg.norm == "batchnorm":
                layers.append(nn.BatchNorm2d(cfg.width, affine=True))
            elif cfg.norm == "layernorm":
                layers.append(nn.LayerNorm(list(shape), elementwise_affine=True))
            elif cfg.norm == "instancenorm":
                layers.append(nn.GroupNorm(cfg.width, cfg.width, affine=True))
            elif cfg.norm == "groupnorm":
                layers.append(nn.GroupNorm(4, cfg.width, affine=True))
            layers.append({"relu": nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid(),
                           "leakyrelu": nn.LeakyReLU(negative_slope=0.01)}[cfg.activation])
            in_channels = cfg.width
            if cfg.pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if cfg.pooling == "avgpooling" else nn.MaxPool2d(2, 2))
                shape[1] //= 2
                shape[2] //= 2
        return nn.Sequential(*layers), shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.reshape(out.size(0), -1))


def build(model: str = "ConvNet", channel: int = 3, num_classes: int = 10,
          im_size: Sequence[int] = (32, 32)) -> ConvNet:
    return ConvNet(config_for(model, channel, num_classes, im_size))


def flat_parameters(net: nn.Module) -> torch.Tensor:
    """All parameters, in `parameters()` order, as one vector (MTT's flattening)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


class FunctionalNet:
    """Runs a network from one flat parameter vector, so students can be unrolled and differentiated."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.numels = [p.numel() for _, p in net.named_parameters()]
        self.num_params = sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.numel() != self.num_params:
            raise InvalidTensorError(f"flat vector has {flat.numel()} values, the network {self.num_params}")
        return {n: p.view(s) for n, p, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # buffers go in as copies: BatchNorm's running statistics then update those, never the module's
        buffers = {n: b.clone() for n, b in self.net.named_buffers()}
        return functional_call(self.net, {**self.unflatten(flat), **buffers}, (x,))
