"""Upstream's AlexNet (the CIFAR-sized one): five convolutions of 128-192-256-192-192 channels, one linear layer."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ArchSpec, conv_out, fit_square

# (out channels, kernel, padding, max pooling after) per convolution; the first is padded by 4 on
# 1-channel (MNIST) images and 2 otherwise. Module indices count the ReLU and pooling modules too.
CONVS = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))


@dataclass(frozen=True)
class AlexNetSpec(ArchSpec):
    family = "AlexNet"
    model_names = "AlexNet"

    @property
    def name(self) -> str:
        return "AlexNet"

    def layers(self):
        out = []
        index, in_channels = 0, self.channel
        h, w = self.im_size
        for i, (channels, kernel, padding, pool) in enumerate(CONVS):
            if i == 0 and self.channel == 1:
                padding = 4
            out += [(f"features.{index}.weight", (channels, in_channels, kernel, kernel)),
                    (f"features.{index}.bias", (channels,))]
            h, w = conv_out(h, kernel, padding=padding), conv_out(w, kernel, padding=padding)
            index += 2  # the convolution and its ReLU
            if pool:
                h, w = h // 2, w // 2
                index += 1
            in_channels = channels
        if min(h, w) < 1:
            raise ValueError(f"AlexNet needs images of at least 8x8 pixels, got {self.im_size}")
        # Upstream's fc takes 192*4*4, the feature map of a 32x32 (or padded 28x28) image.
        return out + [("fc.weight", (self.num_classes, in_channels * h * w)), ("fc.bias", (self.num_classes,))]

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        return {} if model == "AlexNet" else None

    @classmethod
    def recognise(cls, shapes):
        if len(shapes) != 12 or len(shapes[0]) != 4 or len(shapes[-1]) != 1:
            return []
        return fit_square(lambda side: cls(channel=shapes[0][1], num_classes=shapes[-1][0], im_size=(side, side)),
                          shapes)


FAMILY = AlexNetSpec
