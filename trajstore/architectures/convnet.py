"""The ConvNet family (upstream `networks.ConvNet` with `utils.get_network`'s names), as shapes alone.

Legacy buffers store `list(net.parameters())` without names. This table gives the names and shapes
that `distill.networks.convnet` (and upstream) produce for every ConvNet variant, so a converter can
name a buffer's tensors by matching shapes; trajstore must not import distill, and a test
cross-checks the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .base import ArchSpec

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")

# Upstream model names -> overrides of the default ConvNet (width 128, depth 3, relu, instancenorm, avgpool).
SUFFIXES = {
    "BN": {"norm": "batchnorm"}, "LN": {"norm": "layernorm"}, "IN": {"norm": "instancenorm"},
    "GN": {"norm": "groupnorm"}, "NN": {"norm": "none"},
    "AP": {"pooling": "avgpooling"}, "MP": {"pooling": "maxpooling"}, "NP": {"pooling": "none"},
    "AS": {"activation": "sigmoid"}, "AR": {"activation": "relu"}, "AL": {"activation": "leakyrelu"},
}
MODEL_PATTERN = re.compile(r"ConvNet(?:D(\d+)|W(\d+)|([A-Z]{2}))?")

# Image sides of the datasets this family trains on (MNIST is padded to 32); used only to choose
# between shape-identical readings of a buffer, e.g. "pooled 32x32" against "unpooled 4x4".
DATASET_SIDES = (32, 64, 128)

@dataclass(frozen=True)
class ConvNetSpec(ArchSpec):
    """One member of the family; the fields and defaults of `distill.networks.ConvNetConfig`."""

    width: int = 128
    depth: int = 3
    activation: str = "relu"
    norm: str = "instancenorm"
    pooling: str = "avgpooling"

    family = "ConvNet"
    model_names = f"ConvNet, ConvNetD<depth>, ConvNetW<width>, or ConvNet{{{','.join(SUFFIXES)}}}"

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in NORMS or self.pooling not in POOLINGS or self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported ConvNet configuration {self}")
        if min(self.width, self.depth) < 1:
            raise ValueError(f"ConvNet sizes must be positive: {self}")

    @property
    def name(self) -> str:
        """The upstream model name when one exists (ConvNet, ConvNetD4, ConvNetBN, ...), else "ConvNet"."""
        base = ConvNetSpec(self.channel, self.num_classes, self.im_size)
        diffs = {k for k in ("width", "depth", "activation", "norm", "pooling")
                 if getattr(self, k) != getattr(base, k)}
        if diffs == {"depth"}:
            return f"ConvNetD{self.depth}"
        if diffs == {"width"}:
            return f"ConvNetW{self.width}"
        for suffix, override in SUFFIXES.items():
            if len(diffs) == 1 and replace(base, **override) == self:
                return f"ConvNet{suffix}"
        return "ConvNet"

    def layers(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter in `parameters()` order."""
        out: list[tuple[str, tuple[int, ...]]] = []
        h, w = (32, 32) if self.im_size[0] == 28 else self.im_size  # upstream pads MNIST to 32
        index = 0
        in_channels = self.channel
        for _ in range(self.depth):
            out += [(f"features.{index}.weight", (self.width, in_channels, 3, 3)),
                    (f"features.{index}.bias", (self.width,))]
            index += 1
            if self.norm != "none":
                shape = (self.width, h, w) if self.norm == "layernorm" else (self.width,)
                out += [(f"features.{index}.weight", shape), (f"features.{index}.bias", shape)]
                index += 1
            index += 1  # the activation
            if self.pooling != "none":
                index += 1
                h, w = h // 2, w // 2
            in_channels = self.width
        out += [("classifier.weight", (self.num_classes, self.width * h * w)),
                ("classifier.bias", (self.num_classes,))]
        return out

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        m = MODEL_PATTERN.fullmatch(model)
        if not m or (m.group(3) and m.group(3) not in SUFFIXES):
            return None
        depth, width, suffix = m.groups()
        found: dict = dict(SUFFIXES[suffix]) if suffix else {}
        if depth:
            found["depth"] = int(depth)
        if width:
            found["width"] = int(width)
        return found

    @classmethod
    def recognise(cls, shapes):
        return _candidates(shapes)


def spec_for(model: str, channel: int = 3, num_classes: int = 10,
             im_size: Sequence[int] = (32, 32)) -> ConvNetSpec:
    """Upstream model names: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, ConvNetNP, ConvNetAS, ..."""
    return ConvNetSpec.for_model(model, channel, num_classes, im_size)


# -- naming a buffer by its shapes -----------------------------------------------------------------

def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _blocks(shapes: Sequence[tuple[int, ...]]):
    """Split a ConvNet parameter list into (width, channel, depth, norm kind, norm shapes, classifier)."""
    if len(shapes) < 4 or len(shapes[0]) != 4 or shapes[0][2:] != (3, 3):
        return None
    width, channel = shapes[0][0], shapes[0][1]
    i, depth, kinds, norm_shapes = 0, 0, set(), []
    while i < len(shapes) and len(shapes[i]) == 4:
        if shapes[i] != (width, channel if depth == 0 else width, 3, 3) or shapes[i + 1:i + 2] != [(width,)]:
            return None
        i += 2
        depth += 1
        pair = shapes[i:i + 2]
        if len(pair) == 2 and pair[0] == pair[1] and len(pair[0]) in (1, 3) and pair[0][0] == width:
            kinds.add("layer" if len(pair[0]) == 3 else "channel")
            norm_shapes.append(pair[0])
            i += 2
        else:
            kinds.add("none")
    rest = shapes[i:]
    if len(kinds) != 1 or len(rest) != 2 or len(rest[0]) != 2 or rest[1] != (rest[0][0],):
        return None
    return width, channel, depth, kinds.pop(), norm_shapes, rest[0]


def _candidates(shapes: Sequence[tuple[int, ...]]) -> list[tuple[bool, ConvNetSpec]]:
    """(image side is a dataset size, spec) for every family member, up to names, whose table equals
    the shapes; most plausible first."""
    parsed = _blocks(shapes)
    if parsed is None:
        return []
    width, channel, depth, kind, norm_shapes, (num_classes, features) = parsed
    if features % width:
        return []
    base = dict(channel=channel, num_classes=num_classes, width=width, depth=depth)
    found: list[tuple[bool, ConvNetSpec]] = []
    if kind == "layer":
        h, w = norm_shapes[0][1:]
        for pooling in ("avgpooling", "none"):
            found.append((True, ConvNetSpec(**base, im_size=(h, w), norm="layernorm", pooling=pooling)))
    else:
        spatial = features // width
        norm = "instancenorm" if kind == "channel" else "none"
        for pooling, scale in (("avgpooling", 2 ** depth), ("none", 1)):
            side = _square_side(spatial)
            im = (side * scale, side * scale) if side else (spatial * scale, scale)
            found.append((im[0] in DATASET_SIDES and im[0] == im[1],
                          ConvNetSpec(**base, im_size=im, norm=norm, pooling=pooling)))
    matching = [(common, s) for common, s in found if [sh for _, sh in s.layers()] == list(shapes)]
    matching.sort(key=lambda cs: not cs[0])  # stable: dataset-sized images first, then pooled first
    return matching


FAMILY = ConvNetSpec
