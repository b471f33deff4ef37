"""Upstream's LeNet: two 5x5 convolutions (6 and 16 channels) with max pooling, then 120-84-classes."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ArchSpec, conv_out, fit_square


@dataclass(frozen=True)
class LeNetSpec(ArchSpec):
    family = "LeNet"
    model_names = "LeNet"

    @property
    def name(self) -> str:
        return "LeNet"

    def feature_side(self, side: int) -> int:
        side = conv_out(side, 5, padding=2 if self.channel == 1 else 0) // 2  # MNIST is padded by 2
        side = conv_out(side, 5) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 12x12 pixels, got {self.im_size}")
        return side

    def layers(self):
        # Upstream's fc_1 takes 16*5*5, the feature map of a 32x32 (or padded 28x28) image.
        h, w = (self.feature_side(s) for s in self.im_size)
        return [("features.0.weight", (6, self.channel, 5, 5)), ("features.0.bias", (6,)),
                ("features.3.weight", (16, 6, 5, 5)), ("features.3.bias", (16,)),
                ("fc_1.weight", (120, 16 * h * w)), ("fc_1.bias", (120,)),
                ("fc_2.weight", (84, 120)), ("fc_2.bias", (84,)),
                ("fc_3.weight", (self.num_classes, 84)), ("fc_3.bias", (self.num_classes,))]

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        return {} if model == "LeNet" else None

    @classmethod
    def recognise(cls, shapes):
        if len(shapes) != 10 or len(shapes[0]) != 4 or len(shapes[-1]) != 1:
            return []
        return fit_square(lambda side: cls(channel=shapes[0][1], num_classes=shapes[-1][0], im_size=(side, side)),
                          shapes)


FAMILY = LeNetSpec
