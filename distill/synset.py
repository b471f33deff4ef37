"""Distilled-set files (safetensors) and the PNG grids people look at.

A file holds `images` (N, C, H, W) float32, `labels` (N,) int64, the learned scalar `lr`, and, when the
set lives in ZCA space, the whitening state (`zca.*`) so it can be un-whitened for viewing and its test
set rebuilt without refitting. Metadata key "trajstore_synset" is a JSON document: dataset, im_size,
channel, num_classes, zca, ipc, mean, std, provenance and whatever else the writer adds.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
GRID_SIDE = 64  # grid tiles are enlarged (pixel repetition) until their longer side reaches this
GRID_PAD = 2


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
    """One row per class (in class order, its images side by side), un-whitened / un-normalised, then each
    image stretched to its own min..max (torchvision's `make_grid(normalize=True, scale_each=True)`, as
    upstream draws its sets) so that low-contrast distilled images are not clipped into flat blocks.
    Small images are enlarged by pixel repetition. `class_names` is accepted for callers that pass it;
    the rows are in class order."""
    from torchvision.utils import make_grid, save_image

    viewer = dataset_or_unwhitener
    view = viewer.to_viewable if hasattr(viewer, "to_viewable") else viewer
    pictures = view(images.detach().cpu().float()).float()
    labels = labels.detach().cpu().long()
    if pictures.dim() != 4 or len(pictures) != len(labels) or len(labels) == 0:
        raise InvalidTensorError(f"expected images (N, C, H, W) and labels (N,), got {tuple(pictures.shape)} "
                                 f"and {tuple(labels.shape)}", png_path)
    factor = max(1, math.ceil(GRID_SIDE / max(pictures.shape[-2:])))
    pictures = pictures.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    classes = sorted(set(labels.tolist()))
    cols = max(int((labels == c).sum()) for c in classes)
    rows = [make_grid(pictures[labels == c], nrow=cols, padding=GRID_PAD, normalize=True, scale_each=True,
                      pad_value=1.0) for c in classes]
    canvas = torch.ones(3, sum(r.shape[1] for r in rows), max(r.shape[2] for r in rows))
    y = 0
    for row in rows:  # a class with fewer images leaves white space at the end of its row
        canvas[:, y:y + row.shape[1], :row.shape[2]] = row
        y += row.shape[1]
    png = Path(png_path)
    tmp = atomic.temp_sibling(png)
    try:
        save_image(canvas, tmp, format="png")
        atomic.publish_file(tmp, png, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def save_upstream(out_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, lr: float,
                  tag: str) -> list[Path]:
    """Upstream's `images_{tag}.pt`, `labels_{tag}.pt`, `lr_{tag}.pt` (docs/legacy-formats.md §2): plain
    tensors on the CPU (float32 images, int64 labels, a 0-d float32 lr), each written atomically."""
    out = Path(out_dir)
    written = []
    for name, tensor in ((f"images_{tag}.pt", images.detach().to("cpu", torch.float32)),
                         (f"labels_{tag}.pt", labels.detach().to("cpu", torch.int64)),
                         (f"lr_{tag}.pt", torch.tensor(float(lr), dtype=torch.float32))):
        buf = io.BytesIO()
        torch.save(tensor.contiguous().clone(), buf)
        atomic.write_bytes(out / name, buf.getvalue(), overwrite=True)
        written.append(out / name)
    return written


def upstream_siblings(images_path: str | os.PathLike) -> tuple[Path, Path]:
    """The labels and lr files beside an upstream images file: images_X.pt -> labels_X.pt, lr_X.pt."""
    path = Path(images_path)
    if not (path.name.startswith("images") and path.suffix == ".pt"):
        raise FormatError("an upstream set is read from its images file (images_best.pt, images_<it>.pt, ...), "
                          "with labels_<same>.pt beside it", path)
    rest = path.name[len("images"):]
    return path.with_name("labels" + rest), path.with_name("lr" + rest)


def load_upstream(images_path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(images, labels, lr or None) of a set saved the upstream way: `images_X.pt` and `labels_X.pt`
    (plain tensors) and, where present, `lr_X.pt` (a 0-d tensor or a float). Loaded with weights_only=True."""
    from trajstore.legacy.loading import load

    path = Path(images_path)
    labels_path, lr_path = upstream_siblings(path)
    images, _ = load(path, quiet=True)
    labels, _ = load(labels_path, quiet=True)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise FormatError("expected one float tensor of images (N, C, H, W)", path)
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point()
            or labels.is_complex() or len(labels) != len(images) or len(labels) == 0):
        raise FormatError(f"expected one integer tensor of {len(images)} labels", labels_path)
    if not torch.isfinite(images).all():
        raise FormatError("the images hold NaN or infinite values", path)
    if labels.min() < 0:
        raise FormatError("labels must be class indices >= 0", labels_path)
    lr = None
    if lr_path.exists():
        value, _ = load(lr_path, quiet=True)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise FormatError("expected the learned learning rate: one positive number", lr_path)
        lr = float(value)
    return images.float().clone(), labels.long().clone(), lr
