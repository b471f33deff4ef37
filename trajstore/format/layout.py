"""Names and metadata documents of the .ctraj layout (docs/format.md is the normative text)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .beta import check_anchor_epochs
from ..errors import FormatError, VersionError
from .layers import Layer

FORMAT_NAME = "ctraj"
FORMAT_VERSION = 1

ROOT_META = "zarr.json"
EXPERTS = "experts"
BETA = "beta"
STEP_NORMS = "step_norms"


def expert_dir(expert_id: int) -> str:
    return f"{EXPERTS}/{expert_id:06d}"


def anchor_name(epoch: int) -> str:
    return f"anchor_{epoch:04d}.safetensors"


def group_json(attributes: dict | None = None) -> bytes:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def load_json(data: bytes, where) -> dict:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"corrupt metadata JSON ({exc})", where) from None
    if not isinstance(doc, dict):
        raise FormatError("metadata is not a JSON object", where)
    return doc


@dataclass
class StoreMeta:
    """The root group's `trajstore` attribute: what every expert of the store shares."""

    layers: tuple[Layer, ...]
    num_timesteps: int
    anchor_epochs: tuple[int, ...]
    smoothing: str | None = None
    architecture: dict | None = None
    training: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    complete: bool = False

    def to_attributes(self) -> dict[str, Any]:
        return {"trajstore": {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": self.complete,
            "num_timesteps": self.num_timesteps,
            "anchor_epochs": list(self.anchor_epochs),
            "smoothing": self.smoothing,
            "layers": [layer.to_json() for layer in self.layers],
            "architecture": self.architecture,
            "training": self.training,
            "provenance": self.provenance,
        }}

    def encode(self) -> bytes:
        return group_json(self.to_attributes())

    def same_layout(self, other: "StoreMeta") -> list[str]:
        """Differences that forbid writing experts of `other` into a store described by self."""
        diffs = []
        for key in ("layers", "num_timesteps", "anchor_epochs", "smoothing"):
            if getattr(self, key) != getattr(other, key):
                diffs.append(f"{key}: {getattr(self, key)!r} != {getattr(other, key)!r}")
        return diffs

    @classmethod
    def decode(cls, data: bytes, where) -> "StoreMeta":
        doc = load_json(data, where)
        attrs = doc.get("attributes")
        meta = attrs.get("trajstore") if isinstance(attrs, dict) else None
        if doc.get("zarr_format") != 3 or not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FormatError("not a .ctraj (no trajstore attributes in the root zarr.json)", where)
        version = meta.get("version")
        if not isinstance(version, int):
            raise FormatError(f"format version {version!r} is not an integer", where)
        if version > FORMAT_VERSION:
            raise VersionError(f"written by format version {version}; this trajstore reads up to "
                               f"version {FORMAT_VERSION} (upgrade trajstore)", where)
        try:
            layers = tuple(Layer.from_json(x, where) for x in meta["layers"])
            num_timesteps = int(meta["num_timesteps"])
            epochs = check_anchor_epochs(meta["anchor_epochs"], num_timesteps)
            return cls(layers=layers, num_timesteps=num_timesteps, anchor_epochs=epochs,
                       smoothing=meta.get("smoothing"), architecture=meta.get("architecture"),
                       training=meta.get("training") or {}, provenance=meta.get("provenance") or {},
                       complete=bool(meta.get("complete")))
        except FormatError:
            raise
        except Exception as exc:  # missing keys, wrong types, bad anchors: all one problem for the user
            raise FormatError(f"malformed trajstore metadata ({exc})", where) from None
