"""Parameter tables of the ConvNet family, computed from shapes alone (no network is built).

Legacy buffers store `list(net.parameters())` without names. These tables give the names and shapes
that `distill.networks` (and upstream `utils.get_network`) produce for every ConvNet variant, so a
converter can name a buffer's tensors by matching shapes; trajstore must not import distill, and a
test cross-checks the two.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from ..errors import FormatError

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
class ConvNetSpec:
    """One member of the family; the fields and defaults of `distill.networks.ConvNetConfig`."""

    channel: int = 3
    num_classes: int = 10
    im_size: tuple[int, int] = (32, 32)
    width: int = 128
    depth: int = 3
    activation: str = "relu"
    norm: str = "instancenorm"
    pooling: str = "avgpooling"

    def __post_init__(self):
        if self.norm not in NORMS or self.pooling not in POOLINGS or self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported ConvNet configuration {self}")
        if min(self.channel, self.num_classes, self.width, self.depth, *self.im_size) < 1:
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

    def to_json(self) -> dict:
        d = asdict(self)
        d["im_size"] = list(self.im_size)
        return {"name": self.name, **d}

    @classmethod
    def from_json(cls, d: dict) -> "ConvNetSpec":
        """Inverse of to_json; extra keys (such as "name") are ignored."""
        fields = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if "im_size" in kwargs:
            kwargs["im_size"] = tuple(kwargs["im_size"])
        return cls(**kwargs)


def spec_for(model: str, channel: int = 3, num_classes: int = 10,
             im_size: Sequence[int] = (32, 32)) -> ConvNetSpec:
    """Upstream model names: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, ConvNetNP, ConvNetAS, ..."""
    m = MODEL_PATTERN.fullmatch(model)
    if not m or (m.group(3) and m.group(3) not in SUFFIXES):
        raise ValueError(f"unknown model {model!r}: expected ConvNet, ConvNetD<depth>, ConvNetW<width>, "
                         f"or ConvNet{{{','.join(SUFFIXES)}}}")
    depth, width, suffix = m.groups()
    overrides: dict = dict(SUFFIXES[suffix]) if suffix else {}
    if depth:
        overrides["depth"] = int(depth)
    if width:
        overrides["width"] = int(width)
    return ConvNetSpec(channel=channel, num_classes=num_classes, im_size=tuple(im_size), **overrides)


# -- naming a buffer by its shapes -----------------------------------------------------------------

@dataclass(frozen=True)
class Naming:
    """Names for a buffer's tensors and the architecture they came from (None when unknown)."""

    names: tuple[str, ...]
    architecture: dict | None


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


def infer(shapes: Sequence[Sequence[int]]) -> ConvNetSpec | None:
    """The ConvNet whose parameter shapes equal `shapes`, or None when no family member fits.

    Shapes cannot tell instance/batch/group norm, average/max pooling or the activation apart; those
    share their names, so the default of each is reported. Pooled and unpooled networks differ in
    names; when both fit, the one whose image side is a dataset size (32, 64, 128) wins, and a warning
    says so when that still leaves a choice.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    found = _candidates(shapes)
    if not found:
        return None
    common, best = found[0]
    rivals = [s for c, s in found[1:] if c == common and s.layers() != best.layers()]  # same shapes, other names
    if rivals:
        fits = ", ".join(f"{s.pooling} on {s.im_size}" for s in [best, *rivals])
        warnings.warn(f"the tensor shapes fit several ConvNets ({fits}); naming them as {best.name} with "
                      f"{best.pooling}; name the architecture to choose", stacklevel=2)
    return best


def name_tensors(shapes: Sequence[Sequence[int]], architecture=None, *, hint: str | None = None,
                 where=None) -> Naming:
    """Names for a buffer's tensors, from the given architecture, a model-name hint, or the shapes.

    `architecture`: None (infer), an upstream model name ("ConvNetD4"), a mapping of ConvNetSpec fields,
    or a sequence of names. A given architecture that does not fit the shapes is an error; without one,
    unknown shapes fall back to `param_{i}` with a warning. `hint` (e.g. the buffer's directory name) is
    used when it fits and ignored otherwise.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if architecture is not None:
        spec = _given(shapes, architecture, where)
        if spec is None:  # an explicit list of names
            return Naming(tuple(str(n) for n in architecture), None)
        return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "given"})
    if hint is not None:
        try:
            spec = _fit(spec_for(hint), shapes)
        except ValueError:
            spec = None
        if spec is not None:
            return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "directory name"})
    spec = infer(shapes)
    if spec is None:
        warnings.warn(f"{where or 'buffer'}: the tensor shapes match no known architecture; naming them "
                      f"param_0 .. param_{len(shapes) - 1} (name the architecture to get real names)",
                      stacklevel=2)
        return Naming(tuple(f"param_{i}" for i in range(len(shapes))), None)
    return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "inferred from shapes"})


def _fit(spec: ConvNetSpec, shapes: list[tuple[int, ...]]) -> ConvNetSpec | None:
    """`spec` with channel, class count and image size taken from the shapes, if it then matches."""
    if not shapes or len(shapes[0]) != 4 or len(shapes[-1]) != 1:
        return None
    spec = replace(spec, channel=shapes[0][1], num_classes=shapes[-1][0])
    for _, cand in _candidates(shapes):
        fitted = replace(spec, im_size=cand.im_size)
        if [sh for _, sh in fitted.layers()] == shapes:
            return fitted
    return None


def _given(shapes: list[tuple[int, ...]], architecture, where) -> ConvNetSpec | None:
    if isinstance(architecture, str):
        try:
            spec = spec_for(architecture)
        except ValueError as exc:
            raise FormatError(str(exc), where) from None
        fitted = _fit(spec, shapes)
        if fitted is None:
            raise FormatError(f"the tensors do not have the shapes of {architecture} "
                              f"(got {len(shapes)} tensors, first {shapes[:2]})", where)
        return fitted
    if isinstance(architecture, Mapping):
        fields = {k: v for k, v in architecture.items() if k in ConvNetSpec.__dataclass_fields__}
        if "im_size" in fields:
            fields["im_size"] = tuple(fields["im_size"])
        try:
            spec = ConvNetSpec(**fields)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"architecture {dict(architecture)!r} is not a ConvNet description ({exc})",
                              where) from None
        expected = [sh for _, sh in spec.layers()]
        if expected != shapes:
            raise FormatError(f"the tensors do not have the shapes of {spec.name} {spec.to_json()}", where)
        return spec
    names = [str(n) for n in architecture]
    if len(names) != len(shapes) or len(set(names)) != len(names):
        raise FormatError(f"{len(names)} names were given for {len(shapes)} tensors "
                          "(names must be unique, one per tensor)", where)
    return None
