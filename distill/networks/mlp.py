"""Upstream's MLP (table: trajstore.architectures.mlp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trajstore.architectures.mlp import HIDDEN, MLPSpec


class MLP(nn.Module):
    spec = MLPSpec

    def __init__(self, config: MLPSpec = MLPSpec()):
        super().__init__()
        self.config = config
        self.fc_1 = nn.Linear(config.in_features, HIDDEN)
        self.fc_2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc_3 = nn.Linear(HIDDEN, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.fc_1(x.reshape(x.size(0), -1)))
        return self.fc_3(F.relu(self.fc_2(out)))


NETWORK = MLP
