"""The lossless archive: full legacy trajectories in zarr, XOR-delta + shuffle + zstd per layer chunk."""

from .codec import XorDelta, XorDeltaCodec
from .pack import PackReport, pack, unpack
from .store import ArchiveBuffer, is_archive, open_archive

__all__ = ["pack", "unpack", "open_archive", "is_archive", "ArchiveBuffer", "PackReport", "XorDelta",
           "XorDeltaCodec"]
