"""Every failure of the format gives one trajstore error naming the file — never wrong numbers."""

import json
import os
import shutil

import pytest
import torch
from helpers import SMALL_LAYERS, random_walk, write_store

import trajstore
from trajstore.format.singlefile import to_single_file


@pytest.fixture
def path(tmp_path):
    return write_store(tmp_path / "a.ctraj", [random_walk(seed=s) for s in range(2)], waypoints=(5,))


def anchor_file(path, expert="000000", epoch=5):
    return path / "experts" / expert / f"anchor_{epoch:04d}.safetensors"


def test_missing_path(tmp_path):
    with pytest.raises(trajstore.FormatError, match="no such"):
        trajstore.open(tmp_path / "nope.ctraj")


def test_not_a_ctraj(tmp_path):
    (tmp_path / "x.ctraj").write_bytes(b"hello world")
    with pytest.raises(trajstore.FormatError, match="x.ctraj"):
        trajstore.open(tmp_path / "x.ctraj")


def test_missing_root_metadata(path):
    (path / "zarr.json").unlink()
    with pytest.raises(trajstore.FormatError, match="zarr.json"):
        trajstore.open(path)


def test_corrupt_root_metadata(path):
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(trajstore.FormatError, match="corrupt metadata"):
        trajstore.open(path)


def test_future_version(path):
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["trajstore"]["version"] = trajstore.FORMAT_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(trajstore.VersionError, match="upgrade"):
        trajstore.open(path)


def test_bit_flipped_anchor_is_detected(path):
    f = anchor_file(path)
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x10
    f.write_bytes(bytes(data))
    e = trajstore.open(path).expert(0)
    with pytest.raises(trajstore.ChecksumError, match="anchor_0005"):
        e.at(6.5)
    with pytest.raises(trajstore.ChecksumError):
        trajstore.open(path).verify()
    assert trajstore.open(path).expert(1).at(6.5) is not None  # other experts stay readable


def test_bit_flipped_beta_chunk_is_detected(path):
    chunk = next((path / "experts" / "000001" / "beta").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(trajstore.ChecksumError, match="beta"):
        trajstore.open(path).expert(1).at(1.5)


def test_truncated_anchor_without_checksums_still_errors(path):
    f = anchor_file(path)
    f.write_bytes(f.read_bytes()[:-100])
    e = trajstore.open(path, verify_checksums=False).expert(0)
    with pytest.raises(trajstore.FormatError, match="truncated"):
        e.at(7)


def test_missing_anchor_file(path):
    anchor_file(path, epoch=10).unlink()
    with pytest.raises(trajstore.FormatError, match="missing"):
        trajstore.open(path).expert(0).at(9)


def test_truncated_single_file(path, tmp_path):
    single = to_single_file(path, tmp_path / "one.ctraj")
    data = single.read_bytes()
    single.write_bytes(data[: len(data) // 2])
    with pytest.raises(trajstore.FormatError, match="one.ctraj"):
        trajstore.open(single).verify()


def test_bit_flipped_single_file(path, tmp_path):
    single = to_single_file(path, tmp_path / "one.ctraj")
    data = bytearray(single.read_bytes())
    member = data.find(b"fc.weight", data.find(b"anchor_0005"))
    data[member + 2000] ^= 0x40
    single.write_bytes(bytes(data))
    with pytest.raises(trajstore.FormatError):
        trajstore.open(single).verify()


@pytest.mark.parametrize("c", [-0.1, 10.0001, float("nan"), float("inf"), "x"])
def test_out_of_range_c(path, c):
    with pytest.raises(trajstore.OutOfRangeError, match="a.ctraj"):
        trajstore.open(path).expert(0).at(c)


def test_out_of_range_expert(path):
    r = trajstore.open(path)
    with pytest.raises(trajstore.OutOfRangeError, match="2 experts"):
        r.expert(2)
    assert r.expert(-1).id == 1


def test_window_with_negative_m(path):
    with pytest.raises(trajstore.OutOfRangeError):
        trajstore.open(path).expert(0).window(1.0, -2)


def test_not_an_anchor_epoch(path):
    with pytest.raises(trajstore.OutOfRangeError, match="not an anchor"):
        trajstore.open(path).expert(0).anchor(3)


@pytest.mark.parametrize("bad,match", [
    (lambda t: t[:3], "expected 4 tensors"),
    (lambda t: [t[0].reshape(-1), *t[1:]], "shape"),
    (lambda t: [t[0].double(), *t[1:]], "dtype"),
    (lambda t: [t[0].to(torch.int32), *t[1:]], "dtype"),
    (lambda t: [t[0], t[1] * float("nan"), *t[2:]], "NaN"),
    (lambda t: {"conv.weight": t[0]}, "missing"),
    (lambda t: [*t[:3], "fc.bias"], "not a tensor"),
])
def test_writer_rejects_wrong_tensors(tmp_path, bad, match):
    traj = random_walk()
    with trajstore.create(tmp_path / "w.ctraj", SMALL_LAYERS, 11) as w:
        with pytest.raises(trajstore.InvalidTensorError, match=match):
            with w.expert() as ew:
                ew.append(traj[0])
                ew.append(bad(traj[1]))
    assert trajstore.open(tmp_path / "w.ctraj").num_experts == 0


def test_writer_rejects_short_and_long_trajectories(tmp_path):
    traj = random_walk()
    w = trajstore.create(tmp_path / "w.ctraj", SMALL_LAYERS, 11)
    with pytest.raises(trajstore.InvalidTensorError, match="got 10 timesteps"):
        w.write_expert(traj[:10])
    with pytest.raises(trajstore.InvalidTensorError, match="more than 11"):
        w.write_expert(traj + [traj[-1]])
    w.write_expert(traj)
    w.close()
    assert trajstore.open(tmp_path / "w.ctraj").expert_ids == [0]


def test_writer_rejects_bad_anchor_sets(tmp_path):
    for kwargs in [dict(waypoints=(0,)), dict(waypoints=(10,)), dict(anchor_epochs=(0, 5)),
                   dict(anchor_epochs=(0, 5, 5, 10))]:
        with pytest.raises(trajstore.TrajstoreError, match="anchor|waypoints"):
            trajstore.create(tmp_path / "b.ctraj", SMALL_LAYERS, 11, **kwargs)
        assert not (tmp_path / "b.ctraj").exists()


def test_existing_output_is_not_overwritten(path):
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(trajstore.ExistsError, match="overwrite"):
        trajstore.create(path, SMALL_LAYERS, 11)
    assert sorted(p.name for p in path.rglob("*")) == before


def test_overwrite_replaces_only_on_success(path):
    traj = random_walk(seed=9)
    with pytest.raises(RuntimeError):
        with trajstore.create(path, SMALL_LAYERS, 11, overwrite=True) as w:
            w.write_expert(traj)
            raise RuntimeError("crash before close")
    assert trajstore.open(path).num_experts == 2  # the old store is intact
    with trajstore.create(path, SMALL_LAYERS, 11, overwrite=True) as w:
        w.write_expert(traj)
    assert trajstore.open(path).num_experts == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_interrupted_write_never_opens_as_valid(tmp_path):
    traj = random_walk()
    out = tmp_path / "i.ctraj"
    with pytest.raises(KeyboardInterrupt):
        with trajstore.create(out, SMALL_LAYERS, 11) as w:
            w.write_expert(traj)
            with w.expert() as ew:
                ew.extend(traj[:5])
                raise KeyboardInterrupt
    with pytest.raises(trajstore.FormatError, match="unfinished write"):
        trajstore.open(out)
    with trajstore.create(out, SMALL_LAYERS, 11, append=True) as w:  # resume
        assert w.existing_experts() == [0]
        w.write_expert(traj)
    assert trajstore.open(out).num_experts == 2


def test_append_refuses_another_layout(path):
    with pytest.raises(trajstore.TrajstoreError, match="another layout"):
        trajstore.create(path, SMALL_LAYERS, 11, waypoints=(3,), append=True)


def test_expert_index_collision(path):
    with trajstore.create(path, SMALL_LAYERS, 11, waypoints=(5,), append=True) as w:
        with pytest.raises(trajstore.ExistsError, match="expert 1"):
            w.expert(1)


def test_unlisted_file_and_tampered_manifest(path):
    meta = path / "experts" / "000000" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["trajstore_expert"]["files"]["anchor_0010.safetensors"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(trajstore.FormatError, match="not listed"):
        trajstore.open(path).expert(0).at(10)


def test_anchor_with_wrong_shape_in_table(path):
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["trajstore"]["layers"][0]["shape"] = [8, 3, 3, 2]
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(trajstore.FormatError, match="conv.weight"):
        trajstore.open(path, verify_checksums=False).expert(0).at(1)


def test_missing_expert_directory_contents(path):
    shutil.rmtree(path / "experts" / "000001" / "step_norms")
    with pytest.raises(trajstore.FormatError, match="step_norms"):
        trajstore.open(path).expert(1).verify()
    os.remove(path / "experts" / "000000" / "zarr.json")
    # the root lists its experts (format version 2, issue 14): a deleted manifest is an error, not an
    # expert that silently disappears; an unpublished (hidden, unlisted) expert is not part of the store
    with pytest.raises(trajstore.FormatError, match="listed in the root metadata is missing"):
        trajstore.open(path)
