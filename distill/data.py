"""Datasets as whole in-memory tensors, preprocessed the way the trajectory-matching family does it.

Every loader returns a `Dataset` bundle: normalised (mean/std) or ZCA-whitened float32 images in
(N, C, H, W), int64 labels, and what is needed to turn images back into something viewable.
The embedded default ("digits", scikit-learn's 1,797 real 8x8 handwritten digits) needs no download.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trajstore.errors import FormatError

from .zca import ZCA

NAMES = ("digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder", "folder:<path>")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Upstream's per-channel constants (utils.get_dataset); other data get statistics of their training set.
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_TEST_FRACTION = 0.2
DIGITS_SHAPE = (3, 32, 32)  # upsampled from 1x8x8 so networks get CIFAR-10's shapes
FOLDER_TEST_FRACTION = 0.2

_CIFAR_HELP = ("download the python version from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
               "there, or run `torchvision.datasets.{cls}({root!r}, download=True)` once on a machine with "
               "network access")
_TINY_HELP = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unpack it there "
              "(train/<wnid>/images/*.JPEG, val/images/*.JPEG with val/val_annotations.txt)")


class DatasetError(FormatError):
    """Dataset files are missing, malformed, or the dataset name is unknown."""


@dataclass
class Dataset:
    """A preprocessed dataset. `mean`/`std` are what was subtracted/divided (identity with ZCA)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    channel: int
    im_size: tuple[int, int]
    class_names: list[str]
    zca: ZCA | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_seed: int = 0

    def to_viewable(self, images: torch.Tensor) -> torch.Tensor:
        """Un-whiten or un-normalise images to [0, 1] for image grids."""
        return to_viewable(images, zca=self.zca, mean=self.mean, std=self.std)

    def meta(self) -> dict:
        """What identifies this data in .ctraj training metadata and distilled-set files."""
        return {"dataset": self.name, "im_size": list(self.im_size), "channel": self.channel,
                "num_classes": self.num_classes, "zca": self.zca is not None, "split_seed": self.split_seed}

    def subset(self, num_train: int, seed: int = 0) -> "Dataset":
        """A seeded random num_train training images (for quick runs); the test set is kept."""
        idx = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(seed))[:num_train]
        return dataclasses.replace(self, train_images=self.train_images[idx], train_labels=self.train_labels[idx])


def to_viewable(images: torch.Tensor, *, zca: ZCA | None, mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """Images in [0, 1] on the CPU: ZCA inverted, or mean/std undone."""
    x = images.detach().float()
    if zca is not None:
        x = zca.inverse(x)
    else:
        shape = (1, -1, 1, 1)
        x = x * torch.tensor(std, device=x.device).view(shape) + torch.tensor(mean, device=x.device).view(shape)
    return x.clamp(0, 1).cpu()


def load_dataset(name: str = "digits", *, data_path: str | os.PathLike | None = None,
                 im_size: Sequence[int] | None = None, channels: int | None = None, zca: bool | ZCA = False,
                 seed: int = 0) -> Dataset:
    """Load a dataset by name: "digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder" or "folder:<path>".

    im_size / channels default to the dataset's own (digits: 32x32, 3 channels, so networks get CIFAR-10
    shapes). zca=True fits kornia's ZCA on the training set; a fitted `ZCA` is applied as it is (to
    evaluate a distilled set in the space it was made in). seed fixes the train/test split of data that
    come without one (digits, an unsplit image folder).
    """
    key = name.lower()
    if key == "digits":
        raw = _digits(seed)
        im_size, channels = im_size or DIGITS_SHAPE[1:], channels or DIGITS_SHAPE[0]
    elif key in ("cifar10", "cifar100"):
        raw = _cifar(key, data_path)
    elif key == "tinyimagenet":
        raw = _tiny_imagenet(data_path)
    elif key == "imagefolder" or key.startswith("folder:"):
        root = name[len("folder:"):] if key.startswith("folder:") else data_path
        if not root:
            raise DatasetError("an image-folder dataset needs a path: folder:<path> or --data-path")
        raw = _image_folder(Path(root), seed, im_size or (32, 32), channels or 3)
    else:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    train, train_labels, test, test_labels, class_names, stats = raw
    im_size = tuple(int(s) for s in (im_size or train.shape[-2:]))
    channels = int(channels or train.shape[1])
    if (channels, *im_size) != tuple(train.shape[1:]):
        stats = None  # upstream's constants describe the native images only
    train = _conform(train, channels, im_size)
    test = _conform(test, channels, im_size)
    if zca:
        whitener = zca if isinstance(zca, ZCA) else ZCA().fit(train)
        if not whitener.fitted:
            raise ValueError("the ZCA given to load_dataset is not fitted")
        if whitener.num_features != train[0].numel():
            raise DatasetError(f"the ZCA was fitted on {whitener.num_features} features per image, but "
                               f"{name} images at {channels}x{im_size[0]}x{im_size[1]} have {train[0].numel()}")
        train, test = whitener(train), whitener(test)
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        whitener = None
        if stats is None:
            mean = tuple(train.mean(dim=(0, 2, 3)).tolist())
            std = tuple(train.std(dim=(0, 2, 3)).clamp_min(1e-8).tolist())
        else:
            mean, std = stats
        shape = (1, -1, 1, 1)
        m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
        train, test = (train - m) / s, (test - m) / s
    return Dataset(name=name if key.startswith("folder:") else key, train_images=train.contiguous(),
                   train_labels=train_labels, test_images=test.contiguous(), test_labels=test_labels,
                   num_classes=len(class_names), channel=channels, im_size=im_size, class_names=class_names,
                   zca=whitener, mean=tuple(mean), std=tuple(std), split_seed=seed)


def _conform(images: torch.Tensor, channels: int, im_size: tuple[int, int]) -> torch.Tensor:
    """float32 images in [0, 1] -> the requested channel count and size."""
    if images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise DatasetError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    if tuple(images.shape[-2:]) != im_size:
        # bilinear keeps the digits' strokes smooth when upsampling 8x8 -> 32x32
        images = F.interpolate(images, size=im_size, mode="bilinear", align_corners=False, antialias=True)
    return images.float().contiguous()


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return train_idx, test_idx


def _digits(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # pixel values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(digits.target, DIGITS_TEST_FRACTION, seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
            [str(d) for d in digits.target_names], None)


def _cifar(key: str, data_path):
    from torchvision import datasets

    cls = datasets.CIFAR10 if key == "cifar10" else datasets.CIFAR100
    folder = cls.base_folder
    if data_path is None:
        raise DatasetError(f"{key} needs --data-path: the directory holding {folder}/ "
                           f"({_CIFAR_HELP.format(cls=cls.__name__, root='DIR')})")
    root = Path(data_path)
    parts = []
    for train in (True, False):
        try:
            # torchvision checks every batch file against its published md5 before unpickling it
            dst = cls(str(root), train=train, download=False)
        except RuntimeError:
            raise DatasetError(f"{key} files not found or corrupted: expected {root / folder} "
                               f"({_CIFAR_HELP.format(cls=cls.__name__, root=str(root))})", root) from None
        parts += [torch.from_numpy(dst.data).permute(0, 3, 1, 2).float().div_(255),
                  torch.tensor(dst.targets, dtype=torch.int64)]
    return (*parts, list(dst.classes), _CIFAR_STATS)


def _tiny_imagenet(data_path):
    if data_path is None:
        raise DatasetError(f"tinyimagenet needs --data-path: the tiny-imagenet-200 directory ({_TINY_HELP})")
    root = Path(data_path)
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200" / "train").is_dir():
        root = root / "tiny-imagenet-200"
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DatasetError(f"Tiny ImageNet not found: expected {train_dir} and {val_dir} ({_TINY_HELP})", root)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())  # ImageFolder's order, as upstream
    index = {c: i for i, c in enumerate(classes)}
    train_files = []
    for c in classes:
        d = train_dir / c / "images" if (train_dir / c / "images").is_dir() else train_dir / c
        train_files += [(f, index[c]) for f in _images_in(d)]
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():
        val_files = []
        for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetError(f"line {line_no}: expected '<file>\\t<wnid of a train class>'", annotations)
            val_files.append((val_dir / "images" / fields[0], index[fields[1]]))
    else:  # the layout upstream reads: val/images/<wnid>/*.JPEG
        base = val_dir / "images" if (val_dir / "images").is_dir() else val_dir
        val_files = [(f, index[c]) for c in classes if (base / c).is_dir() for f in _images_in(base / c)]
    if not train_files or not val_files:
        raise DatasetError(f"Tiny ImageNet has no images under {train_dir} or {val_dir} ({_TINY_HELP})", root)
    train, train_labels = _read_images(train_files, 3, (64, 64), "Tiny ImageNet train")
    test, test_labels = _read_images(val_files, 3, (64, 64), "Tiny ImageNet val")
    return train, train_labels, test, test_labels, classes, _IMAGENET_STATS


def _image_folder(root: Path, seed: int, im_size, channels: int):
    if not root.is_dir():
        raise DatasetError("image folder not found: expected a directory with one sub-directory of images "
                           "per class (or train/ and test/ directories laid out that way)", root)
    test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    train_root = root / "train" if (root / "train").is_dir() and test_root else root
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and _images_in(p))
    if not classes:
        raise DatasetError("no class sub-directories with images (extensions "
                           f"{', '.join(IMAGE_EXTENSIONS)})", train_root)
    files = [(f, i) for i, c in enumerate(classes) for f in _images_in(train_root / c)]
    if test_root is not None:
        test_files = [(f, i) for i, c in enumerate(classes) if (test_root / c).is_dir()
                      for f in _images_in(test_root / c)]
        train, train_labels = _read_images(files, channels, im_size, f"{root.name} train")
        test, test_labels = _read_images(test_files, channels, im_size, f"{root.name} test")
    else:
        labels = np.array([label for _, label in files])
        if np.bincount(labels).min() < 2:
            raise DatasetError("every class needs at least 2 images to split off a test set", root)
        images, labels_t = _read_images(files, channels, im_size, root.name)
        train_idx, test_idx = (torch.from_numpy(i) for i in _stratified_split(labels, FOLDER_TEST_FRACTION, seed))
        train, train_labels, test, test_labels = (images[train_idx], labels_t[train_idx],
                                                  images[test_idx], labels_t[test_idx])
    return train, train_labels, test, test_labels, classes, None


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_images(files: list[tuple[Path, int]], channels: int, im_size, what: str):
    from PIL import Image, UnidentifiedImageError

    h, w = (int(s) for s in im_size)
    out = torch.empty((len(files), channels, h, w), dtype=torch.uint8)  # 4x smaller than float while reading
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DatasetError(f"image files can be read with 1 or 3 channels, not {channels}")
    for i, (path, _) in enumerate(tqdm(files, desc=f"reading {what}", unit="img", leave=False,
                                       disable=len(files) < 1000)):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8).reshape(h, w, channels)
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image ({exc})", path) from None
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return out.float().div_(255), labels
