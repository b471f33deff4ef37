"""The archive's temporal filter: each timestep's bit pattern XOR'ed with the previous timestep's.

Consecutive epochs of a trained network share sign, exponent and leading mantissa bits, so the XOR
is mostly zero bytes that the byte shuffle + zstd after it squeeze out; it is exact on any bits
(NaN payloads and -0.0 included). It acts along one axis of a chunk, so a chunk of S timesteps
decodes on its own. Registered with numcodecs (id below) and, wrapped as an array -> array codec,
with zarr v3 under the same name, so zarr reads an archive once `trajstore.archive` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numcodecs
import numpy as np
from numcodecs.abc import Codec
from zarr.abc.codec import ArrayArrayCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

CODEC_ID = "trajstore.xor_delta"


class XorDelta(Codec):
    """numcodecs codec: XOR each slice along `axis` with the slice before it (unsigned integer arrays)."""

    codec_id = CODEC_ID

    def __init__(self, axis: int = 0):
        self.axis = int(axis)

    def _array(self, buf) -> np.ndarray:
        arr = np.asarray(buf)
        if arr.dtype.kind != "u":
            raise TypeError(f"{CODEC_ID} works on unsigned integer bit patterns, got {arr.dtype}")
        return arr

    def encode(self, buf) -> np.ndarray:
        arr = self._array(buf)
        out = arr.copy()
        head = [slice(None)] * arr.ndim
        tail = [slice(None)] * arr.ndim
        head[self.axis], tail[self.axis] = slice(1, None), slice(None, -1)
        np.bitwise_xor(arr[tuple(head)], arr[tuple(tail)], out=out[tuple(head)])
        return out

    def decode(self, buf, out=None) -> np.ndarray:
        decoded = np.bitwise_xor.accumulate(self._array(buf), axis=self.axis)
        if out is not None:
            np.copyto(np.asarray(out).reshape(decoded.shape), decoded)
            return out
        return decoded

    def get_config(self) -> dict:
        return {"id": self.codec_id, "axis": self.axis}


numcodecs.register_codec(XorDelta)


@dataclass(frozen=True)
class XorDeltaCodec(ArrayArrayCodec):
    """zarr v3 array -> array codec running `XorDelta` on each chunk."""

    is_fixed_size = True
    axis: int = 0

    def __init__(self, *, axis: int = 0):
        object.__setattr__(self, "axis", int(axis))

    @classmethod
    def from_dict(cls, data):
        _, config = parse_named_configuration(data, CODEC_ID)
        return cls(**(config or {}))

    def to_dict(self):
        return {"name": CODEC_ID, "configuration": {"axis": self.axis}}

    def resolve_metadata(self, chunk_spec):
        return chunk_spec

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec) -> int:
        return input_byte_length

    async def _encode_single(self, chunk_array, chunk_spec):
        out = XorDelta(self.axis).encode(chunk_array.as_ndarray_like())
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)

    async def _decode_single(self, chunk_array, chunk_spec):
        out = XorDelta(self.axis).decode(chunk_array.as_ndarray_like())
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)


register_codec(CODEC_ID, XorDeltaCodec)
