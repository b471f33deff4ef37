"""The exact size of a legacy `.pt` file, computed without writing (or even allocating) its data.

`torch.save` writes a zip archive: the records that torch's own `_save` produces (pickle, format
markers, one record per storage) plus two that its C++ writer adds on close, each preceded by a local
header whose extra field pads the data to 64 bytes and followed by a data descriptor, then the central
directory and zip64 end records. The records come from running torch's pickling on tensors that are
allocated but never touched (no memory is used); the layout follows PyTorchStreamWriter and miniz and
is checked against real `torch.save` output in the tests.
"""

from __future__ import annotations

import functools
import io
import pickle
import zipfile

import torch

ALIGN = 64
U32 = 0xFFFFFFFF
LOCAL_HEADER, CENTRAL_HEADER, END_RECORDS = 30, 46, 22 + 56 + 20  # EOCD + zip64 EOCD + zip64 locator


class _Recorder:
    """Stands in for torch's zip writer and records (name, size) of every record `_save` writes."""

    def __init__(self):
        self.records: list[tuple[str, int]] = []

    def write_record(self, name, data, size) -> None:
        self.records.append((name, int(size)))

    def write_record_metadata(self, name, size) -> None:
        self.records.append((name, int(size)))


def _records(obj) -> list[tuple[str, int]]:
    recorder = _Recorder()
    torch.serialization._save(obj, recorder, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    return recorder.records


@functools.lru_cache(maxsize=1)
def _closing_records() -> tuple[tuple[str, int], ...]:
    """Records the C++ writer appends on close ("version", ".data/serialization_id"), read off a real save."""
    obj = [torch.zeros(1)]
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        written = [(i.filename.split("/", 1)[1], i.file_size) for i in zf.infolist()]
    ours = _records(obj)
    return tuple(written[len(ours):])


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
    """Size of `torch.save(obj, f"{archive_name}.pt")` (torch names the archive after the file's stem)."""
    return zip_size(archive_name, [*_records(obj), *_closing_records()])


def mtt_buffer_nbytes(shapes, dtypes, num_timesteps: int, num_experts: int, per_file: int) -> int:
    """Total size of the files `replay_buffer_{n}.pt` holding `num_experts` trajectories, `per_file` each."""
    full, rest = divmod(num_experts, per_file)
    records: dict[int, list] = {}
    total = 0
    for n in range(full + (1 if rest else 0)):
        count = per_file if n < full else rest
        if count not in records:  # files of equal count differ only in their archive name
            # torch.empty reserves address space only; nothing reads or writes these tensors.
            obj = [[[torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(num_timesteps)]
                   for _ in range(count)]
            records[count] = [*_records(obj), *_closing_records()]
            del obj
        total += zip_size(f"replay_buffer_{n}", records[count])
    return total
