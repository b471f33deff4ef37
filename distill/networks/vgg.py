"""Upstream's VGG11 and VGG11BN (table: trajstore.architectures.vgg)."""

from __future__ import annotations

import torch
from torch import nn

from trajstore.architectures.vgg import CFG, VGGSpec

from .layers import norm_layer


class VGG(nn.Module):
    spec = VGGSpec

    def __init__(self, config: VGGSpec = VGGSpec()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = config.channel
        for i, x in enumerate(CFG):
            if x == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            padding = 3 if config.channel == 1 and i == 0 else 1
            layers += [nn.Conv2d(in_channels, x, kernel_size=3, padding=padding), norm_layer(config.norm, x),
                       nn.ReLU(inplace=True)]
            in_channels = x
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))  # upstream's (a no-op), kept for its index
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(config.layers()[-2][1][1], config.num_classes)  # the table's feature count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.reshape(out.size(0), -1))


NETWORK = VGG
