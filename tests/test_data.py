"""Datasets: the embedded digits, image trees, and one clear error when data are missing."""

import numpy as np
import pytest
import torch
from PIL import Image

from trajstore.distill.data import DatasetError, load_dataset
from trajstore import FormatError, TrajstoreError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_defaults_have_cifar10_shapes(digits):
    assert digits.train_images.shape == (1437, 3, 32, 32) and digits.test_images.shape == (360, 3, 32, 32)
    assert digits.train_images.dtype == torch.float32 and digits.train_labels.dtype == torch.int64
    assert (digits.num_classes, digits.channel, digits.im_size, digits.zca) == (10, 3, (32, 32), None)
    assert digits.class_names == [str(d) for d in range(10)]
    for labels in (digits.train_labels, digits.test_labels):  # stratified: every class on both sides
        assert torch.bincount(labels, minlength=10).min() >= 30
    # mean/std normalisation from the training set
    per_channel = digits.train_images.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-4, rtol=0)
    # the three channels are the same grey image
    assert torch.equal(digits.train_images[:, 0], digits.train_images[:, 2])


def test_digits_are_the_real_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    real = torch.from_numpy(load_digits().images.astype(np.float32) / 16)
    small = load_dataset("digits", im_size=(8, 8), channels=1)
    pixels = small.to_viewable(torch.cat([small.train_images, small.test_images]))[:, 0]
    # the same 1,797 images, in a permuted order, once the normalisation is undone
    key = lambda t: sorted(map(tuple, t.flatten(1).round(decimals=3).tolist()))  # noqa: E731
    assert key(pixels) == key(real)
    view = digits.to_viewable(digits.train_images)
    assert view.min() >= 0 and view.max() <= 1 and view.max() > 0.9


def test_digits_split_is_fixed_by_its_seed(digits):
    again = load_dataset("digits")
    assert torch.equal(again.train_images, digits.train_images) and torch.equal(again.test_labels, digits.test_labels)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.train_labels, digits.train_labels)
    assert other.meta() == {**digits.meta(), "split_seed": 1}


def test_sizes_channels_and_subsets():
    ds = load_dataset("digits", im_size=(16, 16), channels=1)
    assert ds.train_images.shape == (1437, 1, 16, 16) and len(ds.mean) == 1
    sub = ds.subset(100, seed=3)
    assert sub.train_images.shape == (100, 1, 16, 16) and torch.equal(sub.test_images, ds.test_images)
    assert torch.equal(sub.train_images, ds.subset(100, seed=3).train_images)


def _write_images(directory, n, size, seed, fmt="PNG"):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img_{i}.{fmt.lower()}", format=fmt)


def test_image_folder_with_and_without_a_test_split(tmp_path):
    for k, name in enumerate(("cat", "dog", "emu")):
        _write_images(tmp_path / "flat" / name, 5, (20, 24), k)
        _write_images(tmp_path / "split" / "train" / name, 3, (10, 10), k)
        _write_images(tmp_path / "split" / "test" / name, 2, (10, 10), 10 + k, "JPEG")
    flat = load_dataset(f"folder:{tmp_path / 'flat'}", im_size=(12, 12))
    assert flat.class_names == ["cat", "dog", "emu"] and flat.train_images.shape[1:] == (3, 12, 12)
    assert len(flat.train_labels) + len(flat.test_labels) == 15 and set(flat.test_labels.tolist()) == {0, 1, 2}
    split = load_dataset("imagefolder", data_path=tmp_path / "split", im_size=(10, 10), channels=1)
    assert split.train_images.shape == (9, 1, 10, 10) and split.test_images.shape == (6, 1, 10, 10)
    assert split.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the pixels are the files' pixels
    first = np.asarray(Image.open(tmp_path / "split" / "train" / "cat" / "img_0.png").convert("L"), np.float32) / 255
    torch.testing.assert_close(split.to_viewable(split.train_images[:1])[0, 0], torch.from_numpy(first),
                               atol=1e-5, rtol=0)


def test_tiny_imagenet_layouts(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    for k, w in enumerate(wnids):
        _write_images(root / "train" / w / "images", 3, (64, 64), k, "JPEG")
    _write_images(root / "val" / "images", 4, (64, 64), 9, "JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"img_{i}.jpeg\t{wnids[i % 2]}\t0\t0\t63\t63\n" for i in range(4)))
    ds = load_dataset("tinyimagenet", data_path=tmp_path)  # the parent of tiny-imagenet-200 works too
    assert ds.class_names == ["n01", "n02"] and ds.im_size == (64, 64)
    assert ds.train_images.shape == (6, 3, 64, 64) and ds.test_labels.tolist() == [1, 0, 1, 0]
    assert ds.mean == (0.485, 0.456, 0.406)  # upstream's constants for native-size Tiny ImageNet
    # upstream's own layout: validation images sorted into class folders
    (root / "val" / "val_annotations.txt").unlink()
    for i in range(4):
        target = root / "val" / "images" / wnids[i % 2]
        target.mkdir(exist_ok=True)
        (root / "val" / "images" / f"img_{i}.jpeg").rename(target / f"img_{i}.jpeg")
    assert sorted(load_dataset("tinyimagenet", data_path=root).test_labels.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("name, where, message", [
    ("cifar10", None, "needs --data-path.*cifar-10-batches-py"),
    ("cifar10", "empty", r"cifar-10-batches-py.*cs\.toronto\.edu"),
    ("cifar100", "empty", r"cifar-100-python.*CIFAR100"),
    ("tinyimagenet", None, "needs --data-path.*tiny-imagenet-200.zip"),
    ("tinyimagenet", "empty", r"expected .*train.*tiny-imagenet-200\.zip"),
    ("imagefolder", None, "needs a path"),
    ("folder:missing", None, "not found"),
    ("imagefolder", "empty", "no class sub-directories"),
    ("mnist", None, "unknown dataset 'mnist'.*digits"),
])
def test_missing_data_give_one_clear_error(tmp_path, name, where, message):
    data_path = tmp_path if where == "empty" else None
    name = name.replace("missing", str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(name, data_path=data_path)
    assert isinstance(info.value, FormatError) and isinstance(info.value, TrajstoreError)
    if where:
        assert str(tmp_path) in str(info.value)


def test_unreadable_images_are_named(tmp_path):
    _write_images(tmp_path / "a", 2, (8, 8), 0)
    _write_images(tmp_path / "b", 2, (8, 8), 1)
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.png.*cannot read image"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "b" / "broken.png").unlink()
    (tmp_path / "c").mkdir()
    _write_images(tmp_path / "c", 1, (8, 8), 2)
    with pytest.raises(DatasetError, match="at least 2 images"):
        load_dataset(f"folder:{tmp_path}")
