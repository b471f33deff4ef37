"""Upstream's VGG11 (VGG11: instance norm, VGG11BN: batch norm), each 3x3 convolution followed by its
norm and a ReLU, five 2x2 max poolings, one linear layer."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ArchSpec, conv_out, fit_square

CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # upstream's cfg_vgg["VGG11"]
NORMS = {"instancenorm": "VGG11", "batchnorm": "VGG11BN"}


@dataclass(frozen=True)
class VGGSpec(ArchSpec):
    norm: str = "instancenorm"  # "instancenorm" is GroupNorm(C, C), as in every upstream network

    family = "VGG"
    model_names = ", ".join(NORMS.values())

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in NORMS:
            raise ValueError(f"VGG norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    @property
    def name(self) -> str:
        return NORMS[self.norm]

    def layers(self):
        out = []
        index, in_channels = 0, self.channel
        h, w = self.im_size
        for i, x in enumerate(CFG):
            if x == "M":
                h, w = h // 2, w // 2
                index += 1
                continue
            padding = 3 if self.channel == 1 and i == 0 else 1  # upstream pads MNIST's first convolution by 3
            out += [(f"features.{index}.weight", (x, in_channels, 3, 3)), (f"features.{index}.bias", (x,)),
                    (f"features.{index + 1}.weight", (x,)), (f"features.{index + 1}.bias", (x,))]
            h, w = conv_out(h, 3, padding=padding), conv_out(w, 3, padding=padding)
            index += 3  # convolution, norm, ReLU
            in_channels = x
        if min(h, w) < 1:
            raise ValueError(f"VGG11 needs images of at least 32x32 pixels, got {self.im_size}")
        # Upstream's classifier takes 512, the 1x1 feature map of a 32x32 (or padded 28x28) image.
        return out + [("classifier.weight", (self.num_classes, in_channels * h * w)),
                      ("classifier.bias", (self.num_classes,))]

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        norm = {name: norm for norm, name in NORMS.items()}.get(model)
        return None if norm is None else {"norm": norm}

    @classmethod
    def recognise(cls, shapes):
        if len(shapes) != 34 or len(shapes[0]) != 4 or len(shapes[-1]) != 1:
            return []
        # Instance and batch norm have the same parameters: named as the default, VGG11.
        return fit_square(lambda side: cls(channel=shapes[0][1], num_classes=shapes[-1][0], im_size=(side, side)),
                          shapes)


FAMILY = VGGSpec
