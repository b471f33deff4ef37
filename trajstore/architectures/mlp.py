"""Upstream's MLP: three linear layers, 128 hidden units, ReLU."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import DATASET_SIDES, ArchSpec

HIDDEN = 128


@dataclass(frozen=True)
class MLPSpec(ArchSpec):
    family = "MLP"
    model_names = "MLP"

    @property
    def name(self) -> str:
        return "MLP"

    @property
    def in_features(self) -> int:
        # Upstream hard-codes 28*28*1 (MNIST) or 32*32*3; the flattened image is that on its datasets.
        return self.channel * self.im_size[0] * self.im_size[1]

    def layers(self):
        return [("fc_1.weight", (HIDDEN, self.in_features)), ("fc_1.bias", (HIDDEN,)),
                ("fc_2.weight", (HIDDEN, HIDDEN)), ("fc_2.bias", (HIDDEN,)),
                ("fc_3.weight", (self.num_classes, HIDDEN)), ("fc_3.bias", (self.num_classes,))]

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        return {} if model == "MLP" else None

    @classmethod
    def recognise(cls, shapes):
        if len(shapes) != 6 or len(shapes[0]) != 2 or len(shapes[4]) != 2:
            return []
        features, classes = shapes[0][1], shapes[4][0]
        found = []
        for channel in (3, 1):  # colour first: the flattened size alone cannot tell
            side = math.isqrt(features // channel)
            if features % channel == 0 and side * side * channel == features and side:
                spec = cls(channel=channel, num_classes=classes, im_size=(side, side))
                if spec.shapes() == shapes:
                    found.append((side in DATASET_SIDES, spec))
        found.sort(key=lambda cs: not cs[0])
        return found


FAMILY = MLPSpec
