"""The ConvNet family of the trajectory-matching code bases, with their exact module names and order.

Legacy buffers store `list(net.parameters())` without names, so the parameter order and module
indices here must match upstream's for buffers to map 1:1 (reference table: legacy-buffers.md §3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from trajstore.errors import InvalidTensorError, TrajstoreError

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")

# Upstream model names -> overrides of the default ConvNet (width 128, depth 3, relu, instancenorm, avgpool).
_SUFFIXES = {
    "BN": {"norm": "batchnorm"}, "LN": {"norm": "layernorm"}, "IN": {"norm": "instancenorm"},
    "GN": {"norm": "groupnorm"}, "NN": {"norm": "none"},
    "AP": {"pooling": "avgpooling"}, "MP": {"pooling": "maxpooling"}, "NP": {"pooling": "none"},
    "AS": {"activation": "sigmoid"}, "AR": {"activation": "relu"}, "AL": {"activation": "leakyrelu"},
}


class ModelError(TrajstoreError, ValueError):
    """An unknown network name or an unsupported configuration."""


@dataclass(frozen=True)
class ConvNetConfig:
    channel: int = 3
    num_classes: int = 10
    im_size: tuple[int, int] = (32, 32)
    width: int = 128
    depth: int = 3
    activation: str = "relu"
    norm: str = "instancenorm"
    pooling: str = "avgpooling"

    def to_json(self) -> dict:
        d = asdict(self)
        d["im_size"] = list(self.im_size)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ConvNetConfig":
        d = dict(d)
        d.pop("name", None)
        d["im_size"] = tuple(d.get("im_size", (32, 32)))
        return cls(**d)


def config_for(model: str, channel: int, num_classes: int, im_size: Sequence[int]) -> ConvNetConfig:
    """Upstream names: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, ConvNetMP, ConvNetAS, ..."""
    base = ConvNetConfig(channel=channel, num_classes=num_classes, im_size=tuple(im_size))
    m = re.fullmatch(r"ConvNet(?:D(\d+)|W(\d+)|([A-Z]{2}))?", model)
    if not m:
        raise ModelError(f"unknown model {model!r}: expected ConvNet, ConvNetD<depth>, ConvNetW<width>, "
                         f"or ConvNet{{{','.join(_SUFFIXES)}}}")
    depth, width, suffix = m.groups()
    overrides: dict = {}
    if depth:
        overrides["depth"] = int(depth)
    if width:
        overrides["width"] = int(width)
    if suffix:
        if suffix not in _SUFFIXES:
            raise ModelError(f"unknown ConvNet variant {model!r}")
        overrides.update(_SUFFIXES[suffix])
    return ConvNetConfig(**{**base.__dict__, **overrides})


class ConvNet(nn.Module):
    def __init__(self, config: ConvNetConfig = ConvNetConfig()):
        super().__init__()
        if config.norm not in NORMS or config.pooling not in POOLINGS or config.activation not in ACTIVATIONS:
            raise ModelError(f"unsupported ConvNet configuration {config}")
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
        return functional_call(self.net, self.unflatten(flat), (x,))
