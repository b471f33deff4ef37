"""export_mtt: a .ctraj back into the MTT layout that every MTT-family distill.py reads."""

import numpy as np
import pytest
import torch

import trajstore
from trajstore.tools.convert import convert
from trajstore.tools.export import export_mtt
from trajstore.legacy import open_buffer


@pytest.fixture
def converted(tmp_path, legacy_buffer):
    directory, trajs = legacy_buffer
    convert(directory, tmp_path / "a.ctraj", waypoints=(3,), progress=False)
    return tmp_path / "a.ctraj"


def test_files_are_plain_lists_of_contiguous_float32_tensors(tmp_path, converted):
    files = export_mtt(converted, tmp_path / "out", per_file=2, progress=False)
    assert [f.name for f in files] == ["replay_buffer_0.pt", "replay_buffer_1.pt", "replay_buffer_2.pt"]
    store = trajstore.open(converted)
    seen = 0
    for f in files:
        trajectories = torch.load(f, weights_only=True)  # nothing but lists and tensors
        assert type(trajectories) is list and len(trajectories) == (2 if f != files[-1] else 1)
        for traj in trajectories:
            expert = store.expert(seen)
            assert type(traj) is list and len(traj) == store.num_timesteps
            for t, step in enumerate(traj):
                assert type(step) is list and len(step) == len(store.layers)
                assert all(x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() for x in step)
                want = expert.at(t)
                assert all(torch.equal(x, want[layer.name]) for x, layer in zip(step, store.layers))
            storages = {x.untyped_storage().data_ptr() for step in traj for x in step}
            assert len(storages) == store.num_timesteps * len(store.layers)  # no aliasing, one storage each
            seen += 1
    assert seen == store.num_experts


def test_convert_export_convert_keeps_anchors_and_betas(tmp_path, converted):
    export_mtt(converted, tmp_path / "exported", progress=False)
    convert(tmp_path / "exported", tmp_path / "again.ctraj", waypoints=(3,), progress=False)
    a, b = trajstore.open(converted), trajstore.open(tmp_path / "again.ctraj")
    assert (a.num_experts, a.anchor_epochs, a.layers) == (b.num_experts, b.anchor_epochs, b.layers)
    for ea, eb in zip(a, b):
        for epoch in a.anchor_epochs:
            assert all(torch.equal(x, eb.anchor(epoch)[k]) for k, x in ea.anchor(epoch).items())  # bit-exact
        np.testing.assert_allclose(eb.beta, ea.beta, atol=1e-5)


def test_exported_buffer_reads_like_a_legacy_buffer(tmp_path, converted):
    export_mtt(converted, tmp_path / "exp", progress=False)
    buf = open_buffer(tmp_path / "exp")
    store = trajstore.open(converted)
    assert (buf.num_experts, buf.num_timesteps) == (store.num_experts, store.num_timesteps)
    assert [layer.name for layer in buf.layers] == [layer.name for layer in store.layers]
    flat = torch.cat([p.reshape(-1) for p in buf.timestep(2, 7)])
    assert torch.equal(flat, store.expert(2).at(7, flat=True))


def test_half_precision_stores_export_float32(tmp_path, legacy_layers):
    from helpers import random_walk

    with trajstore.create(tmp_path / "h.ctraj", [(n, s, "F16") for n, s in legacy_layers], 5) as w:
        w.write_expert(random_walk(legacy_layers, 5, dtype=torch.float16))
    [f] = export_mtt(tmp_path / "h.ctraj", tmp_path / "out", progress=False)
    step = torch.load(f, weights_only=True)[0][2]
    want = trajstore.open(tmp_path / "h.ctraj").expert(0).at(2, dtype=torch.float32)
    assert all(x.dtype == torch.float32 and torch.equal(x, w) for x, w in zip(step, want.values()))


def test_outputs_are_not_overwritten_unless_asked(tmp_path, converted):
    out = tmp_path / "exp"
    out.mkdir()  # an empty directory is a place to write
    export_mtt(converted, out, per_file=5, progress=False)
    before = (out / "replay_buffer_0.pt").read_bytes()
    with pytest.raises(trajstore.ExistsError, match="exp: already exists and is not empty"):
        export_mtt(converted, out, per_file=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["replay_buffer_0.pt"]
    assert (out / "replay_buffer_0.pt").read_bytes() == before
    files = export_mtt(converted, out, per_file=1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in files) and len(files) == 5
    with pytest.raises(trajstore.TrajstoreError, match="per_file must be at least 1"):
        export_mtt(converted, tmp_path / "x", per_file=0)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left behind
