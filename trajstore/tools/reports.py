"""What the bulk operations (convert, pack) report back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WriteReport:
    """What a conversion or packing wrote, against what it read."""

    out: Path
    experts: int
    num_timesteps: int
    bytes_written: int
    source_bytes: int

    @property
    def ratio(self) -> float:
        """Bytes written over source bytes."""
        return self.bytes_written / self.source_bytes
