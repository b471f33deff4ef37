"""Upstream's ResNet18, ResNet18BN, ResNet18_AP and ResNet18BN_AP (table: trajstore.architectures.resnet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trajstore.architectures.resnet import BLOCKS, STAGES, STEM, ResNetSpec

from .layers import norm_layer


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, ap: bool):
        super().__init__()
        self.stride, self.ap = stride, ap
        # _AP: a stride-1 convolution, then 2x2 average pooling where upstream's ResNet strides
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=1 if ap else stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if ap:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, bias=False),
                                              nn.AvgPool2d(kernel_size=2, stride=2), norm_layer(norm, planes))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                              norm_layer(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.ap and self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    spec = ResNetSpec

    def __init__(self, config: ResNetSpec = ResNetSpec()):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.channel, STEM, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(config.norm, STEM)
        in_planes = STEM
        for stage, (planes, stride) in enumerate(STAGES, start=1):
            blocks = []
            for block in range(BLOCKS):
                blocks.append(BasicBlock(in_planes, planes, stride if block == 0 else 1, config.norm, config.ap))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.classifier = nn.Linear(config.layers()[-2][1][1], config.num_classes)  # the table's feature count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.config.ap:
            out = F.avg_pool2d(out, 4)
        return self.classifier(out.reshape(out.size(0), -1))


NETWORK = ResNet
