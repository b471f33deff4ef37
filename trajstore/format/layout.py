"""Names and metadata documents of the .ctraj layout (docs/format.md is the normative text)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .arguments import short_repr
from .beta import check_anchor_epochs
from .checksums import PLACEHOLDER, check_sealed, seal
from ..errors import FormatError, TrajstoreError, VersionError
from .layers import Layer
from ..stores.base import is_group

FORMAT_NAME = "ctraj"
FORMAT_VERSION = 2  # 2: the root records the experts and its own sha256 (docs/format.md §9)

ROOT_META = "zarr.json"
EXPERTS = "experts"  # the experts group; a root may name another one, `experts.<hex>` (docs/format.md §2, §8)
BETA = "beta"
STEP_NORMS = "step_norms"


CANONICAL_ID = re.compile(r"[0-9]{6,}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def expert_dir(expert_id: int, group: str = EXPERTS) -> str:
    return f"{group}/{expert_id:06d}"


def expert_id_of(name: str) -> int | None:
    """The id an entry of experts/ names, or None: only the canonical 6+-digit ASCII form counts, so
    "1", "0000001" or digits of other scripts can never alias an expert (they are ignored)."""
    if not CANONICAL_ID.fullmatch(name):
        return None
    expert_id = int(name)
    return expert_id if f"{expert_id:06d}" == name else None


def is_int(x) -> bool:
    """A JSON integer (Python's bool is an int, but `true` is not a number)."""
    return isinstance(x, int) and not isinstance(x, bool)


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
    except RecursionError:  # a crafted document nested deeper than the parser's stack
        raise FormatError("corrupt metadata JSON (nested too deeply)", where) from None
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
    # expert directory name -> sha256 of its zarr.json, as of the last close; None in a version-1 store
    experts: dict[str, str] | None = None
    version: int = FORMAT_VERSION
    experts_group: str = EXPERTS  # where the expert groups live (another name only after a remote replace)

    def to_attributes(self) -> dict[str, Any]:
        return {"trajstore": {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": self.complete,
            "experts": dict(sorted((self.experts or {}).items())),
            "sha256": PLACEHOLDER,
            "num_timesteps": self.num_timesteps,
            "anchor_epochs": list(self.anchor_epochs),
            "smoothing": self.smoothing,
            "layers": [layer.to_json() for layer in self.layers],
            "architecture": self.architecture,
            "training": self.training,
            "provenance": self.provenance,
            # written only when it is not the default, so every other root stays as it was
            **({"experts_group": self.experts_group} if self.experts_group != EXPERTS else {}),
        }}

    def encode(self) -> bytes:
        """The root zarr.json (always the current version), its own sha256 recorded in it."""
        return seal(group_json(self.to_attributes()))

    def same_layout(self, other: "StoreMeta") -> list[str]:
        """Differences that forbid writing experts of `other` into a store described by self."""
        diffs = []
        for key in ("layers", "num_timesteps", "anchor_epochs", "smoothing"):
            if getattr(self, key) != getattr(other, key):
                diffs.append(f"{key}: {getattr(self, key)!r} != {getattr(other, key)!r}")
        return diffs

    @classmethod
    def decode(cls, data: bytes, where, check: bool = True) -> "StoreMeta":
        """Parse and validate a root zarr.json; `check`: compare a version-2 root with its own sha256."""
        doc = load_json(data, where)
        attrs = doc.get("attributes")
        meta = attrs.get("trajstore") if isinstance(attrs, dict) else None
        if doc.get("zarr_format") != 3 or not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FormatError("not a .ctraj (no trajstore attributes in the root zarr.json)", where)
        version = meta.get("version")
        if not is_int(version) or version < 1:
            raise FormatError(f"format version {version!r} is not a positive integer", where)
        if version > FORMAT_VERSION:
            raise VersionError(f"written by format version {version}; this trajstore reads up to "
                               f"version {FORMAT_VERSION} (upgrade trajstore)", where)
        problem = _meta_problem(meta)
        if problem:
            raise FormatError(f"malformed trajstore metadata: {problem}", where)
        layers = tuple(Layer.from_json(x, where) for x in meta["layers"])
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise FormatError("malformed trajstore metadata: duplicate layer names", where)
        try:
            epochs = check_anchor_epochs(meta["anchor_epochs"], meta["num_timesteps"])
        except TrajstoreError as exc:
            raise FormatError(f"malformed trajstore metadata: {exc}", where) from None
        experts = None
        if version >= 2:
            problem = _sealed_problem(meta)
            if problem:
                raise FormatError(f"malformed trajstore metadata: {problem}", where)
            if check:
                check_sealed(data, meta["sha256"], where)
            experts = dict(meta["experts"])
        return cls(layers=layers, num_timesteps=meta["num_timesteps"], anchor_epochs=epochs,
                   smoothing=meta.get("smoothing"), architecture=meta.get("architecture"),
                   training=meta.get("training") or {}, provenance=meta.get("provenance") or {},
                   complete=meta["complete"], experts=experts, version=version,
                   experts_group=meta.get("experts_group") or EXPERTS)


# key -> (check, what it must be) for the root metadata; optional keys may also be absent or null
_ROOT_KEYS: dict[str, tuple] = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "num_timesteps": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "anchor_epochs": (lambda v: isinstance(v, list) and all(is_int(e) for e in v), "a list of integers"),
    "layers": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
}
_OPTIONAL_KEYS: dict[str, tuple] = {
    "smoothing": (lambda v: isinstance(v, str), "a string"),
    "architecture": (lambda v: isinstance(v, dict), "an object"),
    "training": (lambda v: isinstance(v, dict), "an object"),
    "provenance": (lambda v: isinstance(v, dict), "an object"),
    # a key the store builds: never a path that leaves the store
    "experts_group": (lambda v: is_group(v, EXPERTS),
                      "'experts' or 'experts.' and 16 lowercase hex digits"),
}


def _sealed_problem(meta: Mapping) -> str | None:
    """What is wrong with the version-2 keys: the expert table and the document's own sha256."""
    experts, digest = meta.get("experts"), meta.get("sha256")
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
        return f"'sha256' is {short_repr(digest)}, expected a lowercase hex sha256"
    if not isinstance(experts, dict):
        return f"'experts' is {short_repr(experts)}, expected an object"
    for name, value in experts.items():
        if expert_id_of(name) is None or not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
            return f"'experts' entry {short_repr(name)}: {short_repr(value)} is not a canonical expert name and a sha256"
    return None


def _meta_problem(meta: Mapping) -> str | None:
    for key, (ok, what) in _ROOT_KEYS.items():
        if key not in meta:
            return f"{key!r} is missing"
        if not ok(meta[key]):
            return f"{key!r} is {short_repr(meta[key])}, expected {what}"
    for key, (ok, what) in _OPTIONAL_KEYS.items():
        if meta.get(key) is not None and not ok(meta[key]):
            return f"{key!r} is {short_repr(meta[key])}, expected {what}"
    return None


def manifest_problem(rel, digest) -> str | None:
    """Why one manifest entry is unacceptable: its key must stay inside the expert directory, its
    value must be a sha256."""
    if not isinstance(rel, str) or not isinstance(digest, str):
        return f"entry {short_repr(rel)}: {short_repr(digest)} is not a file name and a sha256 string"
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        return f"file name {short_repr(rel)} leaves the expert directory or is not a plain relative path"
    if not SHA256_HEX.fullmatch(digest):
        return f"{short_repr(rel)} has {short_repr(digest)}, not a lowercase hex sha256"
    return None


def decode_manifest(data: bytes, where, expert_id: int, anchor_epochs) -> tuple[dict[str, str], dict]:
    """(files, provenance) of an expert's zarr.json, refusing anything a reader should not trust:
    another id, a file name that leaves the directory, a non-sha256, an anchor file for an epoch that
    is not an anchor of the store (or a missing one), or a file that belongs to no array."""
    doc = load_json(data, where)
    attrs = doc.get("attributes")
    info = attrs.get("trajstore_expert") if isinstance(attrs, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        raise FormatError("expert metadata lacks its file list", where)
    if info.get("id") != expert_id or not is_int(info.get("id")):
        raise FormatError(f"expert metadata says id {short_repr(info.get('id'))}, its directory {expert_id}",
                          where)
    files = info["files"]
    for rel, digest in files.items():
        problem = manifest_problem(rel, digest)
        if problem:
            raise FormatError(f"malformed file list: {problem}", where)
    anchors = {anchor_name(e) for e in anchor_epochs}
    listed = {rel for rel in files if rel.startswith("anchor_")}
    if listed - anchors:  # the root's anchor epochs and the experts' files must agree
        raise FormatError(f"the manifest lists {sorted(listed - anchors)[0]}, which is not an anchor epoch of "
                          f"the store ({list(anchor_epochs)}): the root or expert metadata was edited", where)
    if anchors - listed:
        raise FormatError(f"{sorted(anchors - listed)[0]} is not listed in the expert's manifest", where)
    stray = [rel for rel in files if rel not in anchors and rel.split("/", 1)[0] not in (BETA, STEP_NORMS)]
    if stray:
        raise FormatError(f"the file list names files that belong to no part of an expert: {stray[:3]}", where)
    provenance = info.get("provenance")
    return files, provenance if isinstance(provenance, dict) else {}
