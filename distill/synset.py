"""Distilled-set files (safetensors) and the PNG grids people look at.

A file holds `images` (N, C, H, W) float32, `labels` (N,) int64, the learned scalar `lr`, and, when the
set lives in ZCA space, the whitening state (`zca.*`) so it can be un-whitened for viewing and its test
set rebuilt without refitting. Metadata key "trajstore_synset" is a JSON document: dataset, im_size,
channel, num_classes, zca, ipc, mean, std, provenance and whatever else the writer adds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from trajstore import __version__
from trajstore.stores import atomic
from trajstore.errors import FormatError, InvalidTensorError

from .data import Dataset, to_viewable
from .zca import STATE_KEYS, ZCA

META_KEY = "trajstore_synset"
SYNSET_VERSION = 1
REQUIRED = ("dataset", "im_size", "zca", "ipc")


@dataclass
class SynSet:
    """A loaded distilled set. `meta` is the file's metadata document."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    meta: dict
    zca: ZCA | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def ipc(self) -> int:
        return int(self.meta["ipc"])

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    def to_viewable(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """These (or the given) images un-whitened / un-normalised to [0, 1]."""
        c = self.images.shape[1]
        return to_viewable(self.images if images is None else images, zca=self.zca,
                           mean=self.meta.get("mean") or (0.0,) * c, std=self.meta.get("std") or (1.0,) * c)


def images_per_class(labels: torch.Tensor) -> int:
    """The number of images of the largest class."""
    return int(torch.bincount(labels.long()).max()) if len(labels) else 0


def save_synset(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, *, lr: float | torch.Tensor,
                meta: Mapping, overwrite: bool = False, dataset: Dataset | None = None) -> Path:
    """Write a distilled set atomically.

    meta must give dataset, im_size and zca (or pass `dataset=`, which fills those, channel,
    num_classes, mean/std, class names and the ZCA state); ipc is counted from the labels when absent.
    """
    path = Path(path)
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels) or len(labels) == 0:
        raise InvalidTensorError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                                 f"and {tuple(labels.shape)}", path)
    if not images.is_floating_point() or labels.is_floating_point() or labels.is_complex():
        raise InvalidTensorError(f"images must be float and labels integer (got {images.dtype}, {labels.dtype})", path)
    lr = float(lr)
    if not math.isfinite(lr) or not torch.isfinite(images).all():
        raise InvalidTensorError("the learned lr or the images hold NaN or infinite values", path)
    doc: dict = {}
    if dataset is not None:
        doc.update(dataset.meta(), mean=list(dataset.mean), std=list(dataset.std), class_names=dataset.class_names)
    doc.update(meta)
    doc.setdefault("ipc", images_per_class(labels))
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise InvalidTensorError(f"metadata lacks {missing} (pass dataset= or give them in meta)", path)
    zca = dataset.zca if dataset is not None else None
    if doc["zca"] and zca is None:
        raise InvalidTensorError("zca is set but no ZCA state was given: pass dataset= so the set can be "
                                 "un-whitened later", path)
    doc["format_version"] = SYNSET_VERSION
    doc["provenance"] = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "tool": f"trajstore {__version__}", **dict(doc.get("provenance") or {})}
    tensors = {"images": images.detach().to("cpu", torch.float32).contiguous(),
               "labels": labels.detach().to("cpu", torch.int64).contiguous(),
               "lr": torch.tensor(lr, dtype=torch.float32)}
    if zca is not None:
        tensors.update({f"zca.{k}": v for k, v in zca.state_dict().items()})
    try:
        data = st_save(tensors, metadata={META_KEY: json.dumps(doc, sort_keys=True)})
    except TypeError as exc:  # a metadata value json cannot write
        raise InvalidTensorError(f"metadata is not JSON-serialisable ({exc})", path) from None
    atomic.write_bytes(path, data, overwrite=overwrite)
    return path


def load_synset(path: str | os.PathLike) -> SynSet:
    """Read a distilled-set file written by `save_synset`."""
    path = Path(path)
    if not path.is_file():
        raise FormatError("no such distilled-set file", path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"not a readable safetensors file ({exc})", path) from None
    try:
        doc = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(f"not a distilled-set file (no {META_KEY} metadata)", path) from None
    if not isinstance(doc, dict) or [k for k in REQUIRED if k not in doc]:
        raise FormatError(f"distilled-set metadata lacks some of {list(REQUIRED)}", path)
    if int(doc.get("format_version", 0)) > SYNSET_VERSION:
        raise FormatError(f"written by a newer trajstore (distilled-set version {doc['format_version']})", path)
    images, labels, lr = tensors.get("images"), tensors.get("labels"), tensors.get("lr")
    if (images is None or labels is None or lr is None or images.dim() != 4 or labels.dim() != 1
            or len(images) != len(labels) or lr.numel() != 1):
        raise FormatError("distilled-set file lacks consistent images (N, C, H, W), labels (N,) and lr", path)
    zca = None
    if doc["zca"]:
        zca = ZCA.from_state({k: tensors[f"zca.{k}"] for k in STATE_KEYS if f"zca.{k}" in tensors}, where=path)
    return SynSet(images=images, labels=labels.long(), lr=float(lr), meta=doc, zca=zca, path=path)


def save_figure(fig, png: str | os.PathLike, *, overwrite: bool = False, dpi: int = 120) -> Path:
    """Write a matplotlib Figure as a PNG atomically (no pyplot, so no global backend is touched)."""
    png = Path(png)
    tmp = atomic.temp_sibling(png)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        atomic.publish_file(tmp, png, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def save_grid(png_path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor,
              dataset_or_unwhitener: Dataset | SynSet | Callable[[torch.Tensor], torch.Tensor], *,
              class_names: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """One row per class, its images side by side, un-whitened / un-normalised for viewing."""
    from matplotlib.figure import Figure

    viewer = dataset_or_unwhitener
    view = viewer.to_viewable if hasattr(viewer, "to_viewable") else viewer
    class_names = class_names or getattr(viewer, "class_names", None)
    pictures = view(images).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # N, H, W, C
    labels = labels.detach().cpu().long()
    classes = sorted(set(labels.tolist()))
    cols = max(int((labels == c).sum()) for c in classes)
    n, h, w, ch = pictures.shape
    pad = 1
    grid = np.ones(((h + pad) * len(classes) + pad, (w + pad) * cols + pad, ch), dtype=np.float32)
    for row, c in enumerate(classes):
        for col, i in enumerate(torch.nonzero(labels == c).flatten().tolist()):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = pictures[i]
    scale = max(1.0, 96 / max(h, w))  # small images are drawn larger
    fig = Figure(figsize=(max(3.0, grid.shape[1] * scale / 100 + 1.2), max(2.0, grid.shape[0] * scale / 100 + 0.6)))
    ax = fig.subplots()
    ax.imshow(grid.squeeze(-1) if ch == 1 else grid, cmap="gray" if ch == 1 else None, interpolation="nearest")
    ax.set_xticks([])
    step = max(1, len(classes) // 40)
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(0, len(classes), step)])
    ax.set_yticklabels([class_names[classes[r]] if class_names else str(classes[r])
                        for r in range(0, len(classes), step)], fontsize=7)
    ax.set_title(f"{len(classes)} classes, up to {cols} per class", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, png_path, overwrite=overwrite, dpi=100)
