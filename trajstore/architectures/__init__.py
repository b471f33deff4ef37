"""Network families as pure descriptions (no torch): parameter tables, upstream names, recognition.

One module per family, each ending in `FAMILY = <its ArchSpec subclass>`; this registry collects every
module of the package that defines one, so adding a family is adding its file here (and its network
in `distill/networks/`). Legacy buffers store `list(net.parameters())` without names: the tables
name them, from a model name, a recorded architecture or the shapes alone.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..errors import FormatError
from .base import DATASET_SIDES, ArchSpec


def _discover() -> tuple[type[ArchSpec], ...]:
    families = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if family is not None:
            families.append(family)
    return tuple(families)


FAMILIES: tuple[type[ArchSpec], ...] = _discover()


def known_models() -> str:
    return "; ".join(f.model_names for f in FAMILIES)


def family_of(model: str) -> type[ArchSpec]:
    """The family an upstream model name belongs to; ValueError for names no family has."""
    for family in FAMILIES:
        if family.overrides(model) is not None:
            return family
    raise ValueError(f"unknown model {model!r}: expected one of {known_models()}")


def spec_for(model: str, channel: int = 3, num_classes: int = 10, im_size: Sequence[int] = (32, 32)) -> ArchSpec:
    """The network an upstream model name (ConvNetD4, ResNet18BN_AP, VGG11, ...) builds on such input."""
    if not isinstance(model, str):
        raise ValueError(f"a model name must be a string, got {model!r}")
    return family_of(model).for_model(model, channel, num_classes, im_size)


def spec_from_json(d: Mapping) -> ArchSpec:
    """Inverse of `ArchSpec.to_json`: the recorded "name" picks the family (a ConvNet without one)."""
    name = d.get("name")
    family = family_of(name) if isinstance(name, str) else FAMILIES_BY_NAME["ConvNet"]
    return family.from_json(dict(d))


FAMILIES_BY_NAME = {f.family: f for f in FAMILIES}


# -- naming a buffer by its shapes -----------------------------------------------------------------

@dataclass(frozen=True)
class Naming:
    """Names for a buffer's tensors and the architecture they came from (None when unknown)."""

    names: tuple[str, ...]
    architecture: dict | None


def candidates(shapes: Sequence[Sequence[int]]) -> list[tuple[bool, ArchSpec]]:
    """(image side is a dataset side, member) for every member of every family whose table has these
    shapes; dataset-sized readings first."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    found = [c for family in FAMILIES for c in family.recognise(shapes)]
    found.sort(key=lambda cs: (not cs[0], _side_rank(cs[1])))  # stable: each family's own order within
    return found


def _side_rank(spec: ArchSpec) -> int:
    """CIFAR's 32 first, then MNIST's 28, Tiny ImageNet's 64, ImageNet subsets' 128."""
    side = spec.im_size[0]
    return DATASET_SIDES.index(side) if side in DATASET_SIDES else len(DATASET_SIDES)


def infer(shapes: Sequence[Sequence[int]]) -> ArchSpec | None:
    """The network whose parameter shapes equal `shapes`, or None when no family member fits.

    Shapes cannot tell instance/batch/group norm, average/max pooling or the activation apart; those
    share their names, so the default of each is reported (pass the model name to record another).
    Readings that differ in names (a pooled ConvNet on 32x32 and an unpooled one on 4x4, ResNet18 and
    ResNet18_AP on other image sizes) are settled by the image side: a dataset's (32, 28, 64, 128, in
    that order) wins, and a warning says so when another dataset's side also fits.
    """
    found = candidates(shapes)
    if not found:
        return None
    common, best = found[0]
    rivals = [s for c, s in found[1:] if c == common and s.layers() != best.layers()]  # same shapes, other names
    if rivals:
        fits = ", ".join(f"{s.name} on {s.im_size[0]}x{s.im_size[1]}" for s in [best, *rivals])
        warnings.warn(f"the tensor shapes fit several networks ({fits}); naming them as the first; "
                      "name the architecture (--model) to choose", stacklevel=2)
    return best


def name_tensors(shapes: Sequence[Sequence[int]], architecture=None, *, hint: str | None = None,
                 where=None) -> Naming:
    """Names for a buffer's tensors, from the given architecture, a model-name hint, or the shapes.

    `architecture`: None (infer), an upstream model name ("ConvNetD4", "ResNet18"), a mapping as
    `ArchSpec.to_json` writes it (a ConvNet's fields without a name also do), or a sequence of names.
    A given architecture that does not fit the shapes is an error; without one, shapes no family has
    fall back to `param_{i}` with a warning. `hint` (e.g. the buffer's directory name) is used when it
    fits and ignored otherwise.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if architecture is not None:
        spec = _given(shapes, architecture, where)
        if spec is None:  # an explicit list of names
            return Naming(tuple(str(n) for n in architecture), None)
        return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "given"})
    if hint is not None:
        try:
            spec = fit(spec_for(hint), shapes)
        except ValueError:
            spec = None
        if spec is not None:
            return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "directory name"})
    spec = infer(shapes)
    if spec is None:
        warnings.warn(f"{where or 'buffer'}: the tensor shapes match no known architecture ({known_models()}); "
                      f"naming them param_0 .. param_{len(shapes) - 1} (name the architecture to get real names)",
                      stacklevel=2)
        return Naming(tuple(f"param_{i}" for i in range(len(shapes))), None)
    return Naming(tuple(n for n, _ in spec.layers()), {**spec.to_json(), "source": "inferred from shapes"})


def fit(spec: ArchSpec, shapes: list[tuple[int, ...]]) -> ArchSpec | None:
    """`spec` with channel, class count and image size taken from the shapes, if it then matches them."""
    for _, cand in type(spec).recognise(shapes):
        try:
            fitted = replace(spec, channel=cand.channel, num_classes=cand.num_classes, im_size=cand.im_size)
        except ValueError:
            continue
        if fitted.shapes() == shapes:
            return fitted
    return None


def _given(shapes: list[tuple[int, ...]], architecture, where) -> ArchSpec | None:
    if isinstance(architecture, str):
        try:
            spec = spec_for(architecture)
        except ValueError as exc:
            raise FormatError(str(exc), where) from None
        fitted = fit(spec, shapes)
        if fitted is None:
            raise FormatError(f"the tensors do not have the shapes of {architecture} "
                              f"(got {len(shapes)} tensors, first {shapes[:2]})", where)
        return fitted
    if isinstance(architecture, Mapping):
        try:
            spec = spec_from_json(architecture)
            expected = spec.shapes()
        except (TypeError, ValueError) as exc:
            raise FormatError(f"architecture {dict(architecture)!r} is not a network description ({exc})",
                              where) from None
        if expected != shapes:
            raise FormatError(f"the tensors do not have the shapes of {spec.name} {spec.to_json()}", where)
        return spec
    names = [str(n) for n in architecture]
    if len(names) != len(shapes) or len(set(names)) != len(names):
        raise FormatError(f"{len(names)} names were given for {len(shapes)} tensors "
                          "(names must be unique, one per tensor)", where)
    return None
