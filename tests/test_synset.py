"""Distilled-set files: a safetensors round trip with metadata and ZCA state, and PNG grids."""

import json

import pytest
import torch
from safetensors.torch import save_file

from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import random_subset
from trajstore.distill.synset import load_synset, save_grid, save_synset
from trajstore import ExistsError, FormatError, InvalidTensorError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plain():
    return load_dataset("digits", im_size=(16, 16))


@pytest.fixture(scope="module")
def white():
    return load_dataset("digits", im_size=(8, 8), zca=True)  # 192 features: a fast ZCA fit


def test_round_trip_with_metadata(tmp_path, plain):
    images, labels = random_subset(plain, 3, seed=0)
    images = images + 0.1 * torch.randn_like(images)  # "distilled": no longer real images
    path = save_synset(tmp_path / "s.safetensors", images, labels, lr=torch.tensor(0.0123),
                       meta={"provenance": {"method": "mct", "iterations": 5}, "model": "ConvNetW8"}, dataset=plain)
    syn = load_synset(path)
    assert torch.equal(syn.images, images) and torch.equal(syn.labels, labels)
    assert syn.lr == pytest.approx(0.0123) and syn.ipc == 3 and syn.zca is None
    m = syn.meta
    assert (m["dataset"], m["im_size"], m["channel"], m["num_classes"], m["zca"]) == ("digits", [16, 16], 3, 10, False)
    assert m["model"] == "ConvNetW8" and m["provenance"]["method"] == "mct" and "created" in m["provenance"]
    assert syn.class_names == plain.class_names
    torch.testing.assert_close(syn.to_viewable(), plain.to_viewable(images))


def test_zca_sets_carry_their_whitening(tmp_path, white):
    images, labels = random_subset(white, 2, seed=1)
    syn = load_synset(save_synset(tmp_path / "z.safetensors", images, labels, lr=0.01, meta={}, dataset=white))
    assert syn.meta["zca"] is True and syn.zca is not None
    torch.testing.assert_close(syn.to_viewable(), white.to_viewable(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(syn.zca(white.to_viewable(images)), images, atol=1e-4, rtol=0)


def test_outputs_are_not_overwritten_unless_asked(tmp_path, plain):
    images, labels = random_subset(plain, 1, seed=0)
    path = save_synset(tmp_path / "s.safetensors", images, labels, lr=0.01, meta={}, dataset=plain)
    with pytest.raises(ExistsError, match="already exists"):
        save_synset(path, images * 2, labels, lr=0.02, meta={}, dataset=plain)
    assert load_synset(path).lr == pytest.approx(0.01)
    save_synset(path, images * 2, labels, lr=0.02, meta={}, dataset=plain, overwrite=True)
    assert load_synset(path).lr == pytest.approx(0.02)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary files left


def test_bad_sets_are_refused(tmp_path, plain):
    images, labels = random_subset(plain, 1, seed=0)
    out = tmp_path / "bad.safetensors"
    cases = [
        (dict(images=images, labels=labels[:-1], lr=0.01, meta={}, dataset=plain), "expected images"),
        (dict(images=images, labels=labels.float(), lr=0.01, meta={}, dataset=plain), "labels integer"),
        (dict(images=images, labels=labels, lr=float("nan"), meta={}, dataset=plain), "NaN"),
        (dict(images=images, labels=labels, lr=0.01, meta={"dataset": "digits"}), r"lacks \['im_size', 'zca'\]"),
        (dict(images=images, labels=labels, lr=0.01, meta={"dataset": "d", "im_size": [16, 16], "zca": True}),
         "no ZCA state"),
        (dict(images=images, labels=labels, lr=0.01, meta={"x": object()}, dataset=plain), "JSON"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidTensorError, match=message):
            save_synset(out, **kwargs)
        assert not out.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(FormatError, match="no such"):
        load_synset(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="not a readable safetensors"):
        load_synset(junk)
    other = tmp_path / "other.safetensors"
    save_file({"images": torch.zeros(1, 3, 4, 4)}, other)
    with pytest.raises(FormatError, match="not a distilled-set file"):
        load_synset(other)
    partial = tmp_path / "partial.safetensors"
    doc = {"dataset": "digits", "im_size": [4, 4], "zca": False, "ipc": 1}
    save_file({"images": torch.zeros(2, 3, 4, 4), "labels": torch.zeros(3, dtype=torch.int64),
               "lr": torch.tensor(0.1)}, partial, metadata={"trajstore_synset": json.dumps(doc)})
    with pytest.raises(FormatError, match="consistent images"):
        load_synset(partial)


def test_grid_png(tmp_path, plain, white):
    for ds in (plain, white):
        images, labels = random_subset(ds, 4, seed=0)
        png = save_grid(tmp_path / f"{ds.meta()['zca']}.png", images, labels, ds)
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert height > width > 100  # 10 class rows of 4 images
        with pytest.raises(ExistsError):
            save_grid(png, images, labels, ds)
    # a plain callable works as the un-whitener
    save_grid(tmp_path / "fn.png", images[:4], labels[:4], lambda x: x.sigmoid())
