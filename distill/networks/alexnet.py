"""Upstream's AlexNet (table: trajstore.architectures.alexnet)."""

from __future__ import annotations

import torch
from torch import nn

from trajstore.architectures.alexnet import CONVS, AlexNetSpec


class AlexNet(nn.Module):
    spec = AlexNetSpec

    def __init__(self, config: AlexNetSpec = AlexNetSpec()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = config.channel
        for i, (channels, kernel, padding, pool) in enumerate(CONVS):
            if i == 0 and config.channel == 1:
                padding = 4
            layers += [nn.Conv2d(in_channels, channels, kernel_size=kernel, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(config.layers()[-2][1][1], config.num_classes)  # the table's feature count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.fc(out.reshape(out.size(0), -1))


NETWORK = AlexNet
