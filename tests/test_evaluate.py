"""Evaluation with the family's protocol, and the "Random" real-subset baseline."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import trajstore.distill.evaluate as evaluate
from trajstore.cli.main import cli
from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import evaluate_file, evaluate_synset, random_subset
from trajstore.distill.synset import save_synset
from trajstore import TrajstoreError

SMALL = dict(model="ConvNetW8", progress=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", im_size=(16, 16))


def test_random_subset_is_ipc_real_images_per_class(data):
    images, labels = random_subset(data, 4, seed=0)
    assert images.shape == (40, 3, 16, 16) and labels.tolist() == [c for c in range(10) for _ in range(4)]
    for image, label in zip(images, labels):
        same = (data.train_images == image).flatten(1).all(1)
        assert same.any() and (data.train_labels[same] == label).all()
    again, _ = random_subset(data, 4, seed=0)
    other, _ = random_subset(data, 4, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert len({tuple(x.flatten()[:20].tolist()) for x in images}) == 40  # no image twice
    with pytest.raises(TrajstoreError, match="fewer than ipc=1000"):
        random_subset(data, 1000, seed=0)


def test_training_on_ten_per_class_beats_chance_by_far(data):
    images, labels = random_subset(data, 10, seed=0)
    result = evaluate_synset(images, labels, data, lr=0.05, num_nets=2, epochs=10, **SMALL)
    assert len(result.accuracies) == 2 and all(0 <= a <= 1 for a in result.accuracies)
    assert result.mean == pytest.approx(np.mean(result.accuracies))
    assert result.std == pytest.approx(np.std(result.accuracies))
    assert result.mean > 0.3  # chance is 0.1
    assert "+-" in str(result) and "2 networks" in str(result)


def test_protocol_momentum_weight_decay_and_lr_decay_at_half(data, monkeypatch):
    made, passes = [], []
    real_sgd, real_epoch = torch.optim.SGD, evaluate.train_epoch

    def sgd(params, **kw):
        made.append(kw)
        return real_sgd(params, **kw)

    def epoch(net, images, labels, *, optimizer, batch_size, augment, **kw):
        passes.append((optimizer.param_groups[0]["lr"], batch_size, augment is not None))
        return real_epoch(net, images, labels, optimizer=optimizer, batch_size=batch_size, augment=augment, **kw)

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(evaluate, "train_epoch", epoch)
    images, labels = random_subset(data, 1, seed=0)
    evaluate_synset(images, labels, data, lr=0.5, num_nets=1, epochs=4, **SMALL)
    assert made == [dict(lr=0.5, momentum=0.9, weight_decay=5e-4), dict(lr=pytest.approx(0.05), momentum=0.9,
                                                                         weight_decay=5e-4)]
    # upstream: epochs + 1 passes, lr x0.1 after pass epochs // 2 + 1, batch 256, DSA
    assert [lr for lr, _, _ in passes] == [0.5, 0.5, 0.5, 0.5, pytest.approx(0.05)]
    assert all(b == 256 and aug for _, b, aug in passes)


def test_bad_arguments(data):
    images, labels = random_subset(data, 1, seed=0)
    with pytest.raises(TrajstoreError, match="do not fit"):
        evaluate_synset(images[:, :1], labels, data, lr=0.01, epochs=1, **SMALL)
    with pytest.raises(TrajstoreError, match="lr > 0"):
        evaluate_synset(images, labels, data, lr=0.0, epochs=1, **SMALL)


@pytest.mark.parametrize("zca", [False, True])
def test_a_file_is_evaluated_in_the_space_it_was_made_in(tmp_path, data, zca):
    ds = load_dataset("digits", im_size=(8, 8), zca=True) if zca else data  # 192 features: a fast ZCA fit
    images, labels = random_subset(ds, 2, seed=3)
    path = save_synset(tmp_path / "s.safetensors", images, labels, lr=0.02, meta={"model": "ConvNetW8"}, dataset=ds)
    direct = evaluate_synset(images, labels, ds, lr=0.02, num_nets=1, epochs=2, **SMALL)
    from_file = evaluate_file(path, num_nets=1, epochs=2, progress=False, grid=tmp_path / "g.png")
    assert from_file.accuracies == direct.accuracies
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_cli(tmp_path, data):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--random", "--ipc", "1", "--epochs", "2", "--num-nets", "2",
                                 "--model", "ConvNetW8", "--quiet", "--grid", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert "random 1 images per class of digits: test accuracy" in result.output and "+-" in result.output
    assert (tmp_path / "r.png").exists()
    images, labels = random_subset(data, 1, seed=0)
    path = save_synset(tmp_path / "s.safetensors", images, labels, lr=0.01, meta={}, dataset=data)
    result = runner.invoke(cli, ["evaluate", str(path), "--epochs", "1", "--num-nets", "1", "--model", "ConvNetW8",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "+-" in result.output and "over 1 networks" in result.output
    for args, message in ((["evaluate"], "give a SYNSET"), (["evaluate", "--random"], "--ipc"),
                          (["evaluate", str(path), "--random", "--ipc", "1"], "no SYNSET")):
        bad = runner.invoke(cli, args)
        assert bad.exit_code == 2 and message in bad.output
    bad = runner.invoke(cli, ["evaluate", str(tmp_path / "missing.safetensors")])
    assert bad.exit_code == 1 and "no such distilled-set file" in bad.output
