"""The exact size of a legacy `.pt` file, computed without writing (or even allocating) its data.

`torch.save` writes a zip archive (docs/legacy-formats.md §4): `data.pkl`, a protocol-2 pickle of the
object in which every tensor is `torch._utils._rebuild_tensor_v2(<storage>, offset, size, stride,
requires_grad, OrderedDict())` and every storage the persistent id `("storage", <dtype>Storage, key,
"cpu", numel)`; a few fixed records (`.format_version`, `byteorder`, ... depending on the torch
version); one record `data/<key>` per storage in key order; and two records its C++ writer adds on
close. Each record is preceded by a local header whose extra field pads the data to 64 bytes and
followed by a data descriptor, then come the central directory and the zip64 end records.

Only public interfaces are used: the pickle is produced by Python's own `pickle.Pickler` from tensor
*specifications* (shape and dtype; no tensor is allocated), the fixed records are read off a real
`torch.save` of one small tensor with `zipfile`, and the zip layout follows PyTorchStreamWriter and
miniz. The tests check the result against real `torch.save` output.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 64
U32 = 0xFFFFFFFF
LOCAL_HEADER, CENTRAL_HEADER, END_RECORDS = 30, 46, 22 + 56 + 20  # EOCD + zip64 EOCD + zip64 locator
PICKLE_PROTOCOL = 2  # what torch.save writes
_STORAGE = "storage"  # one string object, so the pickle memoizes it as torch's does
_CPU = "cpu"


@dataclass(frozen=True, eq=False)  # eq=False: each spec is its own tensor, as each torch.empty is
class TensorSpec:
    """A contiguous CPU tensor that is described, not allocated."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def stride(self) -> tuple[int, ...]:
        out, step = [], 1
        for d in reversed(self.shape):
            out.append(step)
            step *= int(d)
        return tuple(reversed(out))


def _storage_type(dtype: torch.dtype):
    """torch.FloatStorage for float32, ...: the legacy storage class named in the pickle."""
    name = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool"}[dtype]
    return getattr(torch, f"{name}Storage")


class _Ref:
    """Stands for a storage in the pickle: pickled as its persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid):
        self.pid = pid


class _TorchPickler(pickle.Pickler):
    """Pickles plain containers of tensors (or TensorSpecs) as torch.save does; records each storage's bytes."""

    def __init__(self, f):
        super().__init__(f, protocol=PICKLE_PROTOCOL)
        self.storages: list[int] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            obj = TensorSpec(tuple(obj.shape), obj.dtype)  # a contiguous tensor with its own storage
        if not isinstance(obj, TensorSpec):
            return NotImplemented
        key = str(len(self.storages))
        self.storages.append(obj.numel * torch.empty((), dtype=obj.dtype).element_size())
        ref = _Ref((_STORAGE, _storage_type(obj.dtype), key, _CPU, obj.numel))
        size = tuple(int(d) for d in obj.shape)  # a fresh tuple per tensor, as torch's, so none is memoized
        return (torch._utils._rebuild_tensor_v2, (ref, 0, size, obj.stride, False, collections.OrderedDict()))

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Ref) else None


def _records(obj) -> list[tuple[str, int]]:
    """(name, size) of the records torch.save writes for `obj`, in order."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    head, tail = _fixed_records()
    data = [(f"data/{k}", n) for k, n in enumerate(pickler.storages)]
    return [("data.pkl", buf.tell()), *head, *data, *tail]


@functools.lru_cache(maxsize=1)
def _fixed_records() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """The records this torch writes besides the pickle and the storages: those between `data.pkl` and
    the first storage, and those after the last one, read off a real save of one tensor."""
    buf = io.BytesIO()
    torch.save([torch.zeros(1)], buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        written = [(i.filename.split("/", 1)[1], i.file_size) for i in zf.infolist()]
    names = [name for name, _ in written]
    first, data = names.index("data.pkl"), names.index("data/0")
    return tuple(written[first + 1:data]), tuple(written[data + 1:])


def zip_size(archive_name: str, records) -> int:
    """Bytes of a PyTorchStreamWriter archive holding `records` [(name, size)] under `archive_name/`."""
    pos = central = 0
    for name, size in records:
        n = len(f"{archive_name}/{name}".encode())
        zip64_size, zip64_offset = size >= U32, pos >= U32
        start = pos + LOCAL_HEADER + n + 4  # the padding extra field's own header
        extra64 = (4 + 16 * zip64_size + 8 * zip64_offset) if (zip64_size or zip64_offset) else 0
        start += extra64
        data = start + (-start % ALIGN)
        pos = data + size + (24 if zip64_size or zip64_offset else 16)  # data descriptor
        central += CENTRAL_HEADER + n + extra64
    return pos + central + END_RECORDS


def torch_save_nbytes(obj, archive_name: str) -> int:
    """Size of `torch.save(obj, f"{archive_name}.pt")` (torch names the archive after the file's stem) for
    plain lists, tuples and dicts of contiguous tensors, each with its own storage, or TensorSpecs."""
    return zip_size(archive_name, _records(obj))


def mtt_buffer_nbytes(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype], num_timesteps: int,
                      num_experts: int, per_file: int) -> int:
    """Total size of the files `replay_buffer_{n}.pt` holding `num_experts` trajectories, `per_file` each."""
    full, rest = divmod(num_experts, per_file)
    records: dict[int, list] = {}
    total = 0
    for n in range(full + (1 if rest else 0)):
        count = per_file if n < full else rest
        if count not in records:  # files of equal count differ only in their archive name
            obj = [[[TensorSpec(tuple(s), d) for s, d in zip(shapes, dtypes)] for _ in range(num_timesteps)]
                   for _ in range(count)]
            records[count] = _records(obj)
        total += zip_size(f"replay_buffer_{n}", records[count])
    return total
