"""Anchor checkpoints as safetensors files: written with the safetensors library, read by memory map.

Reading parses the (short, exact) safetensors header ourselves so the same zero-copy path serves the
directory form and members inside a single-file .ctraj, where safetensors' own loader cannot look.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import torch
from safetensors.torch import save as st_save

from ..errors import FormatError
from .layers import DTYPES, Layer

MAX_HEADER = 100 * 1024 * 1024


def encode(layers: Sequence[Layer], tensors: Sequence[torch.Tensor], metadata: dict[str, str]) -> bytes:
    data = {layer.name: t.detach().to("cpu").contiguous() for layer, t in zip(layers, tensors)}
    return st_save(data, metadata=metadata)


def decode(buf: memoryview, layers: Sequence[Layer], where) -> list[torch.Tensor]:
    """Tensors of the layer table, in its order, as views into buf (no copy)."""
    n = len(buf)
    if n < 8:
        raise FormatError("anchor file is truncated (no safetensors header)", where)
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > MAX_HEADER or 8 + hlen > n:
        raise FormatError(f"anchor file is truncated or corrupt (header of {hlen} bytes in a "
                          f"{n}-byte file)", where)
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"anchor file has a corrupt safetensors header ({exc})", where) from None
    if not isinstance(header, dict):
        raise FormatError("anchor file header is not a JSON object", where)
    base = 8 + hlen
    out = []
    for layer in layers:
        entry = header.get(layer.name)
        if not isinstance(entry, dict):
            raise FormatError(f"anchor file lacks layer {layer.name!r}", where)
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"anchor file has a malformed entry for {layer.name!r}", where) from None
        if dtype != layer.torch_dtype or shape != layer.shape:
            raise FormatError(f"layer {layer.name!r} is {entry['dtype']} {list(shape)} in the anchor file "
                              f"but {layer.dtype} {list(layer.shape)} in the layer table", where)
        if end - begin != layer.nbytes or begin < 0 or base + end > n:
            raise FormatError(f"layer {layer.name!r} lies outside the file (truncated?)", where)
        if layer.numel == 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=layer.numel, offset=base + begin)
        out.append(t.view(shape))
    return out
