"""The interop commands: convert, inspect, verify, export, pack, unpack (thin layers over the library)."""

import json

import pytest
import torch

import trajstore


def test_convert_inspect_verify_export(tmp_path, legacy_buffer, run):
    directory, _ = legacy_buffer
    out = run("convert", directory.parent.parent, tmp_path / "a.ctraj", "--waypoints", "3,6", "--quiet").output
    assert "5 experts x 11 timesteps, anchors [0, 3, 6, 10]" in out and "% of the source's" in out
    info = json.loads(run("inspect", tmp_path / "a.ctraj", "--json").output)
    assert {"num_experts", "num_timesteps", "anchors", "layers", "bytes", "legacy_bytes"} <= set(info)
    assert (info["num_experts"], info["anchors"]) == (5, [0, 3, 6, 10])
    assert info["layers"][0] == {"name": "features.0.weight", "shape": [4, 3, 3, 3], "count": 108, "dtype": "F32"}
    assert info["bytes"] == trajstore.open(tmp_path / "a.ctraj").nbytes
    table = run("inspect", tmp_path / "a.ctraj", "--plot", tmp_path / "beta.png").output
    assert "classifier.weight" in table and "as MTT .pt files" in table
    assert (tmp_path / "beta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = run("inspect", tmp_path / "a.ctraj", "--plot", tmp_path / "beta.png", ok=False)
    assert refused.exit_code == 1 and "beta.png: already exists" in refused.output
    assert "OK:" in run("verify", tmp_path / "a.ctraj").output
    exported = run("export", tmp_path / "a.ctraj", tmp_path / "mtt", "--per-file", "2", "--quiet").output
    assert "wrote 3 file(s)" in exported
    assert len(torch.load(tmp_path / "mtt" / "replay_buffer_2.pt", weights_only=True)) == 1
    again = run("export", tmp_path / "a.ctraj", tmp_path / "mtt", "--quiet", ok=False)
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    run("export", tmp_path / "a.ctraj", tmp_path / "mtt", "--quiet", "--force")
    assert sorted(p.name for p in (tmp_path / "mtt").iterdir()) == ["replay_buffer_0.pt"]


def test_verify_fails_with_the_reason(tmp_path, legacy_buffer, run):
    directory, _ = legacy_buffer
    run("convert", directory, tmp_path / "a.ctraj", "--quiet")
    anchor = tmp_path / "a.ctraj" / "experts" / "000002" / "anchor_0010.safetensors"
    data = bytearray(anchor.read_bytes())
    data[-3] ^= 0x01
    anchor.write_bytes(bytes(data))
    result = run("verify", tmp_path / "a.ctraj", ok=False)
    assert result.exit_code == 1 and "sha256 mismatch" in result.output and "anchor_0010" in result.output


def test_pack_unpack_and_inspect_the_archive(tmp_path, legacy_buffer, run):
    directory, trajs = legacy_buffer
    assert "packed 5 experts x 11 timesteps" in run("pack", directory, tmp_path / "arch", "--quiet").output
    assert "already exists" in run("pack", directory, tmp_path / "arch", "--quiet", ok=False).output
    info = json.loads(run("inspect", tmp_path / "arch", "--json").output)
    assert info["kind"] == "archive" and info["bytes"] < info["legacy_bytes"]
    assert "OK: " in run("verify", tmp_path / "arch").output
    run("unpack", tmp_path / "arch", tmp_path / "back", "--as-source", "--quiet")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(p.name for p in directory.iterdir())
    restored = torch.load(tmp_path / "back" / "replay_buffer_2.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(restored[0][10], trajs[4][10]))
    run("unpack", tmp_path / "arch", tmp_path / "ten", "--quiet")
    assert [p.name for p in (tmp_path / "ten").iterdir()] == ["replay_buffer_0.pt"]


def test_legacy_refusals_are_one_clean_line(tmp_path, run):
    d = tmp_path / "ConvNet"
    d.mkdir()
    (d / "replay_buffer_0.pt").write_bytes(b"")
    result = run("convert", d, tmp_path / "x.ctraj", ok=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {d / 'replay_buffer_0.pt'}: file is empty (0 bytes)"]
    assert not (tmp_path / "x.ctraj").exists()
    bad = run("convert", d, tmp_path / "y.ctraj", "--waypoints", "6,x", ok=False)
    assert bad.exit_code == 2 and "comma-separated" in bad.output
