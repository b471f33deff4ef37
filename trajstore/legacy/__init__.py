"""Legacy expert buffers (MTT, FTD, DATM, PAD, ATT, TESLA, SelMatch, SeqMatch, official MCT): found,
checked and read safely, one file at a time, with tensor names inferred from the architecture."""

from __future__ import annotations

import os
from pathlib import Path

from .buffer import LegacyBuffer, ReplayBuffer
from .discovery import discover, training_from_path
from .loading import load, release
from .mct import MCTPairBuffer

__all__ = ["open_buffer", "LegacyBuffer", "ReplayBuffer", "MCTPairBuffer", "discover", "load", "release"]


def open_buffer(path: str | os.PathLike, *, architecture=None, kind: str | None = None) -> LegacyBuffer:
    """Open the legacy buffer at `path` (a buffer file, a model directory, or a root holding one).

    `architecture` names the tensors: an upstream model name ("ConvNetD4"), a dict of ConvNet fields, or
    a list of names; by default they are inferred from the shapes (and the model directory's name), else
    `param_{i}` with a warning. `kind` picks one buffer where a directory holds several (e.g.
    "convexified_replay_buffer" or "waypoint_buffer_ip4" next to MCT's raw "replay_buffer" files).
    """
    found = discover(path, kind)
    hint = found.directory.name
    if found.paired:
        buf: LegacyBuffer = MCTPairBuffer(found.files, found.steps, found.kind, architecture, hint)
    else:
        buf = ReplayBuffer(found.files, found.kind, architecture, hint)
    buf.training = training_from_path(found.directory)
    buf.path = Path(path)
    return buf
