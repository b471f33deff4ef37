"""What every network family's description provides (the registry in `__init__` collects them).

A family is one dataclass: the fields that choose a member (channel, class count and image size for
all, plus the family's own), its parameter table computed from shapes alone, the upstream model names
it answers to, and how to recognise its members from a buffer's tensor shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

Shapes = list[tuple[int, ...]]
Table = list[tuple[str, tuple[int, ...]]]

# Image sides of the datasets the family trains on (MNIST 28, CIFAR 32, Tiny ImageNet 64, ImageNet
# subsets 128); used only to choose between shape-identical readings of a buffer.
DATASET_SIDES = (32, 28, 64, 128)
# Other square sides tried when a buffer's shapes fit none of those (a digits run at 16x16, say).
OTHER_SIDES = range(1, 513)


@dataclass(frozen=True)
class ArchSpec:
    """One member of a family on one kind of input; subclasses add their own fields (with defaults)."""

    channel: int = 3
    num_classes: int = 10
    im_size: tuple[int, int] = (32, 32)

    family: ClassVar[str] = ""
    # Help text for the family's upstream names, e.g. "ResNet18, ResNet18BN, ResNet18_AP, ResNet18BN_AP".
    model_names: ClassVar[str] = ""

    def __post_init__(self):
        object.__setattr__(self, "im_size", tuple(int(s) for s in self.im_size))
        if len(self.im_size) != 2 or min(self.channel, self.num_classes, *self.im_size) < 1:
            raise ValueError(f"{self.family} sizes must be positive: {self}")

    # -- what each family defines ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The upstream model name of this member."""
        raise NotImplementedError

    def layers(self) -> Table:
        """(name, shape) of every parameter, in `nn.Module.parameters()` order."""
        raise NotImplementedError

    @classmethod
    def overrides(cls, model: str) -> dict | None:
        """The fields an upstream model name sets, or None when the name is not this family's."""
        raise NotImplementedError

    @classmethod
    def recognise(cls, shapes: Shapes) -> list[tuple[bool, "ArchSpec"]]:
        """(image side is a dataset side, member) for every member whose table has these shapes; the
        most plausible first. Members differing only in fields the shapes cannot show appear once."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------

    def shapes(self) -> Shapes:
        return [shape for _, shape in self.layers()]

    def num_params(self) -> int:
        total = 0
        for _, shape in self.layers():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def to_json(self) -> dict:
        d = asdict(self)
        d["im_size"] = list(self.im_size)
        return {"name": self.name, **d}

    @classmethod
    def from_json(cls, d: dict) -> "ArchSpec":
        """Inverse of to_json; extra keys (such as "name") are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "im_size" in kwargs:
            kwargs["im_size"] = tuple(kwargs["im_size"])
        return cls(**kwargs)

    @classmethod
    def for_model(cls, model: str, channel: int = 3, num_classes: int = 10,
                  im_size: Sequence[int] = (32, 32)) -> "ArchSpec":
        found = cls.overrides(model)
        if found is None:
            raise ValueError(f"unknown model {model!r}: expected {cls.model_names}")
        return cls(channel=channel, num_classes=num_classes, im_size=tuple(im_size), **found)


def conv_out(side: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a convolution or pooling (PyTorch's floor rule)."""
    return (side + 2 * padding - kernel) // stride + 1


def square_sides() -> Iterable[int]:
    yield from DATASET_SIDES
    yield from (s for s in OTHER_SIDES if s not in DATASET_SIDES)


def fit_square(make: Callable[[int], ArchSpec], shapes: Shapes) -> list[tuple[bool, ArchSpec]]:
    """The member `make(side)` of a fixed-layout family whose table has these shapes, trying the dataset
    sides first; at most one (sides that pool to the same feature map give the same table)."""
    for side in square_sides():
        try:
            spec = make(side)
            fits = spec.shapes() == shapes
        except ValueError:  # too small an image for the network
            continue
        if fits:
            return [(side in DATASET_SIDES, spec)]
    return []
