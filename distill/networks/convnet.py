"""Upstream's ConvNet, with its exact module names and order (the table: trajstore.architectures.convnet)."""

from __future__ import annotations

import torch
from torch import nn

from trajstore.architectures.convnet import ConvNetSpec

from .layers import activation, norm_layer


class ConvNet(nn.Module):
    spec = ConvNetSpec

    def __init__(self, config: ConvNetSpec = ConvNetSpec()):
        super().__init__()
        self.config = config
        self.features, feat = self._make_layers(config)
        self.classifier = nn.Linear(feat[0] * feat[1] * feat[2], config.num_classes)

    @staticmethod
    def _make_layers(cfg: ConvNetSpec):
        layers: list[nn.Module] = []
        im_size = (32, 32) if cfg.im_size[0] == 28 else tuple(cfg.im_size)  # upstream pads MNIST to 32
        shape = [cfg.channel, im_size[0], im_size[1]]
        in_channels = cfg.channel
        for d in range(cfg.depth):
            padding = 3 if cfg.channel == 1 and d == 0 else 1
            layers.append(nn.Conv2d(in_channels, cfg.width, kernel_size=3, padding=padding))
            shape[0] = cfg.width
            if cfg.norm == "layernorm":
                layers.append(nn.LayerNorm(list(shape), elementwise_affine=True))
            elif cfg.norm == "groupnorm":
                layers.append(nn.GroupNorm(4, cfg.width, affine=True))
            elif cfg.norm != "none":
                layers.append(norm_layer(cfg.norm, cfg.width))
            layers.append(activation(cfg.activation))
            in_channels = cfg.width
            if cfg.pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if cfg.pooling == "avgpooling" else nn.MaxPool2d(2, 2))
                shape[1] //= 2
                shape[2] //= 2
        return nn.Sequential(*layers), shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.reshape(out.size(0), -1))


NETWORK = ConvNet
