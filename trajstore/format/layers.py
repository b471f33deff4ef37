"""The layer table: ordered parameter names, shapes and dtypes shared by every expert of a store."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import FormatError, InvalidTensorError

# safetensors dtype names; the same strings appear in the .ctraj layer table.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Layer:
    """One parameter tensor of the architecture."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Mapping, path=None) -> "Layer":
        ok = (isinstance(obj, Mapping) and isinstance(obj.get("name"), str) and obj["name"]
              and isinstance(obj.get("shape"), list) and obj.get("dtype") in DTYPES
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in obj["shape"]))
        if not ok:
            text = repr(obj)
            raise FormatError(f"malformed layer entry {text if len(text) < 80 else text[:77] + '...'} (expected "
                              f"a name, a list of sizes >= 0 and one of {', '.join(DTYPES)})", path)
        return cls(obj["name"], tuple(obj["shape"]), obj["dtype"])


def layer_table(spec) -> tuple[Layer, ...]:
    """Build a layer table from Layers, (name, shape[, dtype]) tuples, a state dict or an nn.Module."""
    if isinstance(spec, torch.nn.Module):
        spec = dict(spec.named_parameters())
    if isinstance(spec, Mapping):
        items = [(name, tuple(t.shape), dtype_name(t.dtype, name)) for name, t in spec.items()]
    else:
        items = []
        for entry in spec:
            if isinstance(entry, Layer):
                items.append((entry.name, entry.shape, entry.dtype))
            else:
                name, shape, *rest = entry
                dtype = rest[0] if rest else "F32"
                if isinstance(dtype, torch.dtype):
                    dtype = dtype_name(dtype, name)
                items.append((str(name), tuple(int(s) for s in shape), dtype))
    layers = tuple(Layer(n, s, d) for n, s, d in items)
    names = [layer.name for layer in layers]
    if not layers:
        raise InvalidTensorError("the layer table is empty")
    if len(set(names)) != len(names):
        raise InvalidTensorError(f"duplicate layer names in {names}")
    for layer in layers:
        if layer.dtype not in DTYPES:
            raise InvalidTensorError(f"layer {layer.name!r}: dtype {layer.dtype} is not a float type")
    return layers


def dtype_name(dtype: torch.dtype, what: str = "tensor") -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidTensorError(f"{what}: dtype {dtype} is not a floating-point parameter type") from None


def as_tensor_list(params, layers: Sequence[Layer], where: str = "") -> list[torch.Tensor]:
    """Check one timestep's parameters against the table and return them in table order."""
    prefix = f"{where}: " if where else ""
    if isinstance(params, torch.nn.Module):
        params = dict(params.named_parameters())
    if isinstance(params, Mapping):
        # A module's state_dict() also holds its buffers (BatchNorm's running statistics): they are not
        # parameters and are not stored, so names beyond the table are passed over; every layer must be there.
        missing = [layer.name for layer in layers if layer.name not in params]
        if missing:
            raise InvalidTensorError(f"{prefix}parameter names differ from the layer table (missing {missing}, "
                                     f"given {list(params)[:8]}{'...' if len(params) > 8 else ''})")
        tensors = [params[layer.name] for layer in layers]
    else:
        tensors = list(params) if isinstance(params, Iterable) else None
        if tensors is None or len(tensors) != len(layers):
            got = "a non-sequence" if tensors is None else f"{len(tensors)} tensors"
            raise InvalidTensorError(f"{prefix}expected {len(layers)} tensors in layer order, got {got}")
    out = []
    for layer, t in zip(layers, tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidTensorError(f"{prefix}layer {layer.name!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != layer.shape:
            raise InvalidTensorError(f"{prefix}layer {layer.name!r} has shape {tuple(t.shape)}, "
                                     f"expected {layer.shape}")
        if t.dtype != layer.torch_dtype:
            raise InvalidTensorError(f"{prefix}layer {layer.name!r} has dtype {t.dtype}, "
                                     f"expected {layer.torch_dtype}")
        out.append(t.detach())
    return out
