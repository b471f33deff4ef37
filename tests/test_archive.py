"""The lossless archive: pack, unpack, random access, integrity."""

import hashlib
import json
import textwrap

import numcodecs
import numpy as np
import pytest
import torch
import zarr

import trajstore
from trajstore.archive import XorDelta, open_archive, pack, unpack
from trajstore.tools.inspect import verify
from trajstore.legacy import open_buffer
from helpers import KILL_AT_LOCAL_SWAP, run_until_killed

INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT[a.element_size()]),
                                                                        b.view(INT[b.element_size()]))


def odd_trajectory(num_timesteps=7, seed=0):
    """Four dtypes and the values a lossy or float-comparing codec would get wrong."""
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1e-45, 3.0])
    steps = []
    base = torch.randn(6, 5, generator=g)
    for t in range(num_timesteps):
        w = base + 0.01 * t
        w.view(-1)[:8] = specials
        w.view(torch.int32).view(-1)[0] = 0x7FC0_1234  # a NaN with a payload
        steps.append([w.clone(), (base[0] * t).to(torch.float16), (base[1] - t).to(torch.bfloat16),
                      (base[2] / (t + 1)).double()])
    return steps


def test_pack_and_unpack_are_bit_identical(tmp_path):
    src = tmp_path / "ConvNet"
    src.mkdir()
    trajs = [odd_trajectory(seed=s) for s in range(5)]
    torch.save(trajs[:2], src / "replay_buffer_0.pt")
    torch.save(trajs[2:], src / "replay_buffer_1.pt")
    with pytest.warns(UserWarning, match="param_0"):
        report = pack(src, tmp_path / "arch", progress=False)
    assert (report.experts, report.num_timesteps) == (5, 7)
    assert report.bytes_written == open_archive(tmp_path / "arch").nbytes
    two = ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    for per_file, names in ((None, two), (4, two), (10, two[:1])):
        out = tmp_path / f"out{per_file}"
        files = unpack(tmp_path / "arch", out, per_file=per_file, progress=False)
        assert [f.name for f in files] == names
        restored = [traj for f in files for traj in torch.load(f, weights_only=True)]
        if per_file is None:
            assert [len(torch.load(f, weights_only=True)) for f in files] == [2, 3]
        assert len(restored) == 5
        for got, want in zip(restored, trajs):
            assert all(same_bits(a, b) for gs, ws in zip(got, want) for a, b in zip(gs, ws))
            assert len({x.untyped_storage().data_ptr() for step in got for x in step}) == 7 * 4


def test_the_archive_reads_like_the_legacy_buffer(tmp_path, legacy_buffer, monkeypatch):
    directory, trajs = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    arch, buf = open_archive(tmp_path / "arch"), open_buffer(directory)
    assert (arch.num_experts, arch.num_timesteps, arch.layers) == (buf.num_experts, buf.num_timesteps, buf.layers)
    assert arch.architecture == buf.architecture and arch.training == buf.training
    assert arch.source_of(3) == {"archive": "arch", "file": "replay_buffer_1.pt", "index": 1}
    assert [f["file"] for f in arch.source["files"]] == [f.name for f in buf.files]
    for i in range(5):
        assert all(same_bits(a, b) for x, y in zip(arch.trajectory(i), trajs[i]) for a, b in zip(x, y))
    calls = []
    decode = XorDelta.decode
    monkeypatch.setattr(XorDelta, "decode",
                        lambda self, buf, out=None: calls.append(np.shape(buf)) or decode(self, buf, out))
    step = arch.timestep(4, 9)
    assert all(same_bits(a, b) for a, b in zip(step, trajs[4][9]))
    # one chunk per layer, each `stride` timesteps of one expert: nothing else is decompressed
    assert len(calls) == len(arch.layers) and all(shape[:2] == (1, arch.stride) for shape in calls)


def test_zarr_and_numcodecs_read_it_without_trajstore_readers(tmp_path, legacy_buffer):
    directory, trajs = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    meta = json.loads((tmp_path / "arch" / "zarr.json").read_text())["attributes"]["trajstore_archive"]
    assert meta["format"] == "ctraj-archive" and meta["num_experts"] == 5
    arr = zarr.open_array(str(tmp_path / "arch" / "params" / "004"), mode="r")
    assert arr.shape == (5, 11, 4 * 4 * 3 * 3) and arr.attrs["layer"]["name"] == "features.4.weight"
    want = np.stack([step[4].reshape(-1).numpy().view(np.uint32) for step in trajs[2]])
    np.testing.assert_array_equal(arr[2], want)
    codec = numcodecs.get_codec({"id": "trajstore.xor_delta", "axis": 1})
    x = want[None]
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x)


def test_corruption_is_caught(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    verify(tmp_path / "arch")
    arr = zarr.open_array(str(tmp_path / "arch" / "params" / "012"), mode="r+")
    arr[1, 0, 0] = arr[1, 0, 0] ^ 1  # a valid chunk, other bits: only the recorded sha256 knows
    with pytest.raises(trajstore.ChecksumError, match="expert 1 decodes to other bytes"):
        verify(tmp_path / "arch")
    with pytest.raises(trajstore.ChecksumError):
        unpack(tmp_path / "arch", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    chunks = sorted((tmp_path / "arch" / "params" / "013").rglob("*"))
    chunk = next(p for p in chunks if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(trajstore.ChecksumError, match="013: cannot decode layer 'classifier.bias'"):
        open_archive(tmp_path / "arch").verify()


def test_refusals(tmp_path, legacy_buffer):
    directory, _ = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    with pytest.raises(trajstore.ExistsError, match="arch: already exists"):
        pack(directory, tmp_path / "arch", progress=False)
    pack(directory, tmp_path / "arch", overwrite=True, progress=False)
    with pytest.raises(trajstore.TrajstoreError, match="already a packed archive"):
        pack(tmp_path / "arch", tmp_path / "again", progress=False)
    with pytest.raises(trajstore.TrajstoreError, match="per_file must be at least 1"):
        unpack(tmp_path / "arch", tmp_path / "out", per_file=0)
    (tmp_path / "arch" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "trajstore_archive": {"format": "ctraj-archive", "version": 99}}}))
    with pytest.raises(trajstore.VersionError, match="upgrade trajstore"):
        open_archive(tmp_path / "arch")


def test_slowly_moving_weights_pack_below_three_quarters(tmp_path):
    """Weights that move like trained ones (a ConvNet on digits changes each tensor by a median 0.4%
    per epoch) pack below 75% of the legacy file."""
    g = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(64, 1000, generator=g)
    trajs = []
    for _ in range(2):
        steps = []
        for _ in range(21):
            steps.append([w.clone(), w[0].clone()])
            w = w + 2e-4 * torch.randn(w.shape, generator=g)
        trajs.append(steps)
    (tmp_path / "ConvNet").mkdir()
    torch.save(trajs, tmp_path / "ConvNet" / "replay_buffer_0.pt")
    report = pack(tmp_path / "ConvNet", tmp_path / "arch", progress=False, architecture=["w", "b"])
    assert report.ratio <= 0.75


def test_unpack_force_killed_at_the_swap_leaves_one_whole_buffer(tmp_path, legacy_buffer):
    """`unpack --force` over an earlier unpack, SIGKILLed as it swaps the new files in: the directory
    holds the new files, all of them (never nothing, as a replace by two renames could leave)."""
    directory, trajs = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    out = tmp_path / "out"
    unpack(tmp_path / "arch", out, per_file=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [f"replay_buffer_{n}.pt" for n in range(3)]
    run_until_killed(KILL_AT_LOCAL_SWAP + textwrap.dedent(f"""
        from trajstore.archive import unpack
        unpack({str(tmp_path / "arch")!r}, {str(out)!r}, per_file=5, overwrite=True, progress=False)
        sys.exit(3)  # not killed: the swap was never reached
    """))
    assert [p.name for p in out.iterdir()] == ["replay_buffer_0.pt"]
    restored = torch.load(out / "replay_buffer_0.pt", weights_only=True)
    assert len(restored) == 5 and all(torch.equal(a, b) for a, b in zip(restored[4][10], trajs[4][10]))


@pytest.mark.parametrize("group", ["../params", "params.XYZ", "params.0123456789abcdef/..", 7])
def test_a_hand_edited_params_group_is_refused(tmp_path, legacy_buffer, group):
    """The root names where the layer arrays are (docs/format.md, "Archive"); an edited name, resealed
    as the spec says, is one FormatError, never a read outside the archive's groups."""
    directory, _ = legacy_buffer
    pack(directory, tmp_path / "arch", progress=False)
    root = tmp_path / "arch" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["trajstore_archive"].update(params_group=group, sha256="0" * 64)
    data = json.dumps(doc, indent=2).encode()
    root.write_bytes(data.replace(b'"' + b"0" * 64 + b'"', f'"{hashlib.sha256(data).hexdigest()}"'.encode()))
    with pytest.raises(trajstore.FormatError, match="params_group"):
        open_archive(tmp_path / "arch")
