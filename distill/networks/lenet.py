"""Upstream's LeNet (table: trajstore.architectures.lenet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trajstore.architectures.lenet import LeNetSpec


class LeNet(nn.Module):
    spec = LeNetSpec

    def __init__(self, config: LeNetSpec = LeNetSpec()):
        super().__init__()
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(config.channel, 6, kernel_size=5, padding=2 if config.channel == 1 else 0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        h, w = (config.feature_side(s) for s in config.im_size)
        self.fc_1 = nn.Linear(16 * h * w, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = F.relu(self.fc_1(out.reshape(out.size(0), -1)))
        return self.fc_3(F.relu(self.fc_2(out)))


NETWORK = LeNet
