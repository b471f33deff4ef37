"""Decoding an expert's zarr arrays (beta, step_norms) from checksummed bytes only, and the checks
docs/format.md §5 puts on their values.

zarr itself would read any chunk file it finds and fill a missing chunk with the fill value, so it is
handed only the files of the manifest, after their sha256 was checked: an unlisted file is never read,
and a chunk the manifest does not list is an error rather than zeros.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import FormatError


def decode_array(files: Mapping[str, bytes], name: str, shape: tuple[int, ...], where) -> np.ndarray:
    """The float64 array `name` from {path relative to the expert: bytes} of its checked files."""
    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    prefix = f"{name}/"
    own = {rel: data for rel, data in files.items() if rel.startswith(prefix)}
    if f"{prefix}zarr.json" not in own:
        raise FormatError("array metadata (zarr.json) is missing from the expert's file list", where)
    store = MemoryStore({rel: cpu.Buffer.from_bytes(data) for rel, data in own.items()})
    try:
        arr = zarr.open_array(store=store, path=name, mode="r")
        if arr.shape != shape:
            raise FormatError(f"array has shape {arr.shape}, expected {shape}", where)
        missing = [key for key in (f"{prefix}{arr.metadata.encode_chunk_key(coords)}"
                                   for coords in itertools.product(*(range(n) for n in arr.cdata_shape)))
                   if key not in own]
        if missing:
            raise FormatError(f"chunk {missing[0]} is not in the expert's file list (it would read as "
                              "fill values)", where)
        values = np.asarray(arr[...], dtype=np.float64)
    except FormatError:
        raise
    except Exception as exc:  # zarr reports corruption with many exception types
        raise FormatError(f"cannot read zarr array ({type(exc).__name__}: {exc})", where) from None
    if not np.isfinite(values).all():
        raise FormatError("array holds NaN or infinite values", where)
    return values


def check_step_norms(norms: np.ndarray, where) -> None:
    if (norms < 0).any():
        raise FormatError("step norms hold negative values", where)


def check_beta(beta: np.ndarray, anchor_epochs: Sequence[int], where) -> None:
    """§5: 0 at each piece's first anchor, non-decreasing within the piece and at most 1, 1 at K."""
    if ((beta < 0) | (beta > 1)).any():
        raise FormatError("beta holds values outside [0, 1]", where)
    if (beta[anchor_epochs[-1]] != 1).any():
        raise FormatError("beta is not 1 at the last epoch", where)
    for a, b in zip(anchor_epochs, anchor_epochs[1:]):
        if (beta[a] != 0).any():
            raise FormatError(f"beta is not 0 at anchor epoch {a}", where)
        if (np.diff(beta[a:b], axis=0) < 0).any():
            raise FormatError(f"beta decreases within the piece [{a}, {b}]", where)
