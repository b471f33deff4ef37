"""Upstream's ResNet18 family: ResNet18 / ResNet18BN (strided convolutions, 4x4 average pooling at the
end) and ResNet18_AP / ResNet18BN_AP (stride-1 convolutions followed by 2x2 average pooling, no pooling
at the end), with instance norm (GroupNorm(C, C)) or batch norm. Convolutions have no bias."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ArchSpec, conv_out, fit_square

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (planes, stride of the first block) of layer1..layer4
BLOCKS = 2  # BasicBlocks per stage: [2, 2, 2, 2]
STEM = 64
NORM_SUFFIX = {"instancenorm": "", "batchnorm": "BN"}


@dataclass(frozen=True)
class ResNetSpec(ArchSpec):
    norm: str = "instancenorm"
    ap: bool = False  # the _AP variant: downsampling by average pooling instead of strided convolutions

    family = "ResNet"
    model_names = "ResNet18, ResNet18BN, ResNet18_AP, ResNet18BN_AP"

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in NORM_SUFFIX or not isinstance(self.ap, bool):
            raise ValueError(f"unsupported ResNet configuration {self}")

    @property
    def name(self) -> str:
        return f"ResNet18{NORM_SUFFIX[self.norm]}{'_AP' if self.ap else ''}"

    def _down(self, side: int) -> int:
        return side // 2 if self.ap else conv_out(side, 3, stride=2, padding=1)

    def layers(self):
        out = [("conv1.weight", (STEM, self.channel, 3, 3)), ("bn1.weight", (STEM,)), ("bn1.bias", (STEM,))]
        in_planes = STEM
        h, w = self.im_size
        for stage, (planes, first_stride) in enumerate(STAGES, start=1):
            for block in range(BLOCKS):
                stride = first_stride if block == 0 else 1
                p = f"layer{stage}.{block}."
                out += [(p + "conv1.weight", (planes, in_planes, 3, 3)),
                        (p + "bn1.weight", (planes,)), (p + "bn1.bias", (planes,)),
                        (p + "conv2.weight", (planes, planes, 3, 3)),
                        (p + "bn2.weight", (planes,)), (p + "bn2.bias", (planes,))]
                if stride != 1 or in_planes != planes:
                    norm_index = 2 if self.ap else 1  # _AP puts its AvgPool2d between the 1x1 conv and the norm
                    out += [(p + "shortcut.0.weight", (planes, in_planes, 1, 1)),
                            (p + f"shortcut.{norm_index}.weight", (planes,)),
                            (p + f"shortcut.{norm_index}.bias", (planes,))]
                if stride != 1:
                    h, w = self._down(h), self._down(w)
                in_planes = planes
        if not self.ap:  # F.avg_pool2d(out, 4)
            h, w = h // 4, w // 4
        if min(h, w) < 1:
            raise ValueError(f"{self.name} needs larger images than {self.im_size}")
        # Upstream's classifier takes 512 (ResNet18) or 512*4*4 (_AP; 512*3*3 on MNIST): the feature
        # map of a 32x32 (28x28) image.
        return out + [("classifier.weight", (self.num_classes, in_planes * h * w)),
                      ("classifier.bias", (self.num_classes,))]

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        for norm, suffix in NORM_SUFFIX.items():
            for ap in (False, True):
                if model == f"ResNet18{suffix}{'_AP' if ap else ''}":
                    return {"norm": norm, "ap": ap}
        return None

    @classmethod
    def recognise(cls, shapes):
        if len(shapes) != 62 or len(shapes[0]) != 4 or len(shapes[-1]) != 1:
            return []
        found = []
        for ap in (False, True):  # the shortcut norms' names differ; batch and instance norm do not
            found += fit_square(lambda side: cls(channel=shapes[0][1], num_classes=shapes[-1][0],
                                                 im_size=(side, side), ap=ap), shapes)
        found.sort(key=lambda cs: not cs[0])
        return found


FAMILY = ResNetSpec
