"""convert: legacy buffers and archives -> .ctraj, streamed one expert at a time."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import trajstore
from spec_reader import trajectory_betas
from trajstore.architectures.convnet import spec_for
from trajstore.archive import pack
from trajstore.tools.convert import convert
from trajstore.tools.inspect import summary

ROOT = Path(__file__).resolve().parents[1]


def norms(traj):
    return np.array([[torch.linalg.vector_norm(b.double() - a.double()).item() for a, b in zip(x, y)]
                     for x, y in zip(traj, traj[1:])])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_anchors_are_the_source_timesteps_and_betas_follow_eq9(tmp_path, legacy_buffer):
    directory, trajs = legacy_buffer
    before = {f.name: digest(f) for f in directory.iterdir()}
    report = convert(directory, tmp_path / "a.ctraj", waypoints=(3,), progress=False)
    assert {f.name: digest(f) for f in directory.iterdir()} == before  # the input is never modified
    assert (report.experts, report.num_timesteps, report.anchor_epochs) == (5, 11, (0, 3, 10))
    assert report.source_bytes == sum(f.stat().st_size for f in directory.iterdir())
    store = trajstore.open(tmp_path / "a.ctraj")
    assert report.bytes_written == store.nbytes and report.ratio == store.nbytes / report.source_bytes
    assert [layer.name for layer in store.layers][-2:] == ["classifier.weight", "classifier.bias"]
    assert store.training == {"epochs": 10, "dataset": "CIFAR10", "zca": False, "inferred_from": "directory name"}
    sources = store.provenance["sources"]
    assert [(s["file"], s["sha256"]) for s in sources] == sorted(before.items())
    for i, traj in enumerate(trajs):
        expert = store.expert(i)
        for epoch in (0, 3, 10):
            anchor = expert.anchor(epoch)
            assert all(torch.equal(anchor[layer.name], t) for layer, t in zip(store.layers, traj[epoch]))
        assert expert.provenance["source"] == {"file": f"replay_buffer_{i // 2}.pt", "index": i % 2}
        np.testing.assert_allclose(expert.step_norms, norms(traj), rtol=1e-12)
        np.testing.assert_allclose(expert.beta, trajectory_betas(traj, (0, 3, 10)), rtol=1e-12)  # §5 by hand


def test_mct_smoothing_single_file_and_overwrite(tmp_path, legacy_buffer):
    directory, trajs = legacy_buffer
    out = tmp_path / "s.ctraj"
    convert(directory, out, waypoints=(4,), smoothing="mct", single_file=True, progress=False)
    store = trajstore.open(out)
    assert out.is_file() and store.smoothing == "mct"
    a = store.expert(1).anchor(4)
    t = trajs[1]
    want = [0.5 * h + 0.25 * b + 0.25 * n for b, h, n in zip(t[3], t[4], t[5])]
    assert all(torch.equal(a[layer.name], w) for layer, w in zip(store.layers, want))
    before = out.read_bytes()
    with pytest.raises(trajstore.ExistsError, match="s.ctraj: already exists"):
        convert(directory, out, progress=False)
    assert out.read_bytes() == before
    convert(directory, out, overwrite=True, progress=False)
    assert trajstore.open(out).anchor_epochs == (0, 10)


@pytest.fixture(scope="module")
def cifar_buffer(tmp_path_factory):
    """2 experts x 51 timesteps of the 320,010-parameter CIFAR-10 ConvNet in one upstream-style file."""
    from conftest import legacy_walk

    layers = spec_for("ConvNet").layers()
    assert sum(int(np.prod(s)) for _, s in layers) == 320_010
    directory = tmp_path_factory.mktemp("cifar") / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    directory.mkdir(parents=True)
    torch.save([legacy_walk(layers, 51, seed=s) for s in range(2)], directory / "replay_buffer_0.pt")
    return directory


def test_cifar10_convnet_buffer_shrinks_to_the_papers_share(tmp_path, cifar_buffer):
    """Done-when of issue 3: <= 8.0% of the source with waypoints 6, 25 and <= 4.0% with the default
    two anchors, as inspect reports."""
    for waypoints, bound in (((6, 25), 0.080), ((), 0.040)):
        out = tmp_path / f"w{len(waypoints)}.ctraj"
        report = convert(cifar_buffer, out, waypoints=waypoints, progress=False)
        info = summary(out)
        assert info["anchors"] == [0, *waypoints, 50] and info["num_params"] == 320_010
        assert info["legacy_bytes"] == report.source_bytes  # the same 2 experts as one MTT file, to the byte
        assert info["bytes"] / info["legacy_bytes"] <= bound and report.ratio <= bound
        assert info["bytes"] / info["legacy_bytes"] > (len(waypoints) + 2) / 51  # the anchors themselves


def test_an_archive_converts_like_its_source(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    convert(directory, tmp_path / "a.ctraj", progress=False)
    report = convert(tmp_path / "arch", tmp_path / "b.ctraj", progress=False)
    a, b = trajstore.open(tmp_path / "a.ctraj"), trajstore.open(tmp_path / "b.ctraj")
    assert report.source_bytes == trajstore.archive.open_archive(tmp_path / "arch").nbytes
    assert b.provenance["source_kind"] == "archive"
    assert [s["sha256"] for s in b.provenance["sources"]] == [s["sha256"] for s in a.provenance["sources"]]
    for ea, eb in zip(a, b):
        assert all(torch.equal(ea.anchor(10)[k], v) for k, v in eb.anchor(10).items())
        np.testing.assert_array_equal(ea.beta, eb.beta)


def test_mct_waypoint_store_keeps_its_waypoints(tmp_path, legacy_layers):
    from test_legacy import mct_store, written_betas
    from helpers import random_walk

    trajs = [random_walk(legacy_layers, 11, seed=s) for s in range(2)]
    steps = mct_store(tmp_path / "ConvNet", trajs, (0, 3, 6, 10), "_ip4")
    convert(tmp_path / "ConvNet", tmp_path / "m.ctraj", progress=False)
    store = trajstore.open(tmp_path / "m.ctraj")
    assert store.anchor_epochs == (0, 3, 6, 10)
    for i, traj in enumerate(trajs):
        for e in (0, 3, 6, 10):
            assert all(torch.equal(store.expert(i).anchor(e)[n.name], t) for n, t in zip(store.layers, traj[e]))
        # the betas the MCT files hold (float32) for this expert, as the test wrote them
        np.testing.assert_allclose(store.expert(i).beta, written_betas(steps[i]), atol=1e-5)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import torch, zarr, safetensors, tqdm
    from trajstore.tools.convert import convert

    def peak_kib():  # VmHWM starts afresh at exec; getrusage's maxrss inherits the forking parent's peak
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    src, warm, out = sys.argv[1:4]
    convert(warm, out + ".warm", progress=False, architecture=["w", "b"])  # imports and caches settle
    base = peak_kib()
    convert(src, out, progress=False)
    print(json.dumps({"base_kib": base, "peak_kib": peak_kib()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_converter_peak_memory_stays_far_below_one_source_file(tmp_path, cifar_buffer, legacy_write):
    legacy_write(tmp_path / "warm" / "ConvNet", 1, num_timesteps=3, layers=[("w", (4, 3)), ("b", (4,))])
    file_bytes = (cifar_buffer / "replay_buffer_0.pt").stat().st_size
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(cifar_buffer), str(tmp_path / "warm" / "ConvNet"),
                          str(tmp_path / "m.ctraj")], capture_output=True, text=True, check=True, env=env)
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (probe["peak_kib"] - probe["base_kib"]) * 1024
    # streaming holds a few timesteps (1.28 MB each): far less than one trajectory, half of this file
    assert grown < file_bytes / 5, f"peak grew by {grown / 1e6:.0f} MB converting a {file_bytes / 1e6:.0f} MB file"


def test_a_diverged_expert_is_refused_naming_its_source(tmp_path, legacy_buffer):
    directory, trajs = legacy_buffer
    broken = [[t.clone() for t in step] for step in trajs[1]]
    broken[7][2][0] = float("nan")  # what a diverged run leaves behind
    torch.save([trajs[0], broken], directory / "replay_buffer_0.pt")
    with pytest.raises(trajstore.InvalidTensorError, match=r"replay_buffer_0.pt: trajectory 1 cannot be stored: .*NaN"):
        convert(directory, tmp_path / "x.ctraj", progress=False)
    assert not (tmp_path / "x.ctraj").exists()


def test_conversion_runs_single_threaded_and_restores_the_thread_count(tmp_path, legacy_buffer, monkeypatch):
    from trajstore.format import anchorfile

    seen = []
    encode = anchorfile.encode

    def spy(*args, **kwargs):  # the thread count while the converter writes each anchor
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    monkeypatch.setattr(anchorfile, "encode", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        convert(legacy_buffer[0], tmp_path / "t.ctraj", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
