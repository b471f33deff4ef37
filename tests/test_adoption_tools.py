"""Small things a new user hit: inspect --plot on a legacy buffer, byte counts of inspect vs convert, export's
output check, verify's progress and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trajstore import ExistsError
from trajstore.cli.main import cli
from trajstore.tools.export import export_mtt

TRAJSTORE = Path(sys.executable).with_name("trajstore")


@pytest.fixture
def one_per_file(tmp_path, legacy_write):
    """A TESLA-style buffer: 3 trajectories, one per file (docs/legacy-formats.md §1)."""
    directory = tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    legacy_write(directory, 3, per_file=1)
    return directory


def test_inspect_plot_of_a_legacy_buffer_is_refused_before_printing(tmp_path, one_per_file):
    r = CliRunner().invoke(cli, ["inspect", str(one_per_file), "--plot", str(tmp_path / "b.png")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "convert it first" in r.output and "experts" not in r.output
    assert not (tmp_path / "b.png").exists()


def test_inspect_and_convert_report_the_same_legacy_bytes(tmp_path, one_per_file):
    real = sum(f.stat().st_size for f in one_per_file.glob("replay_buffer_*.pt"))
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(one_per_file), str(tmp_path / "a.ctraj"), "--quiet"])
    assert r.exit_code == 0 and f"source's {real:,} bytes" in r.output, r.output
    for path in (one_per_file, tmp_path / "a.ctraj"):
        s = json.loads(runner.invoke(cli, ["inspect", str(path), "--json"]).output)
        assert s["legacy_bytes"] == real and s["legacy_bytes_measured"] is True
    # a store that was never an MTT buffer still gets a (computed) size
    export_mtt(tmp_path / "a.ctraj", tmp_path / "exported", progress=False)
    r = runner.invoke(cli, ["pack", str(tmp_path / "exported"), str(tmp_path / "full.zarr"), "--quiet"])
    s = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / "full.zarr"), "--json"]).output)
    assert s["legacy_bytes_measured"] is False and s["legacy_bytes"] > 0


def test_export_refuses_its_output_before_any_progress(tmp_path, one_per_file, capsys):
    from trajstore.tools.convert import convert

    convert(one_per_file, tmp_path / "a.ctraj", progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(ExistsError, match="out"):
        export_mtt(tmp_path / "a.ctraj", tmp_path / "out", progress=True)
    assert "export" not in capsys.readouterr().err  # no bar was started
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_verify_shows_progress_and_speaks_json(tmp_path, one_per_file):
    from trajstore.tools.convert import convert

    convert(one_per_file, tmp_path / "a.ctraj", progress=False)
    r = subprocess.run([str(TRAJSTORE), "verify", str(tmp_path / "a.ctraj")], capture_output=True, text=True)
    assert r.returncode == 0 and "verify" in r.stderr and "3/3" in r.stderr  # the bar, expert by expert
    for path, kind in ((tmp_path / "a.ctraj", "ctraj"), (one_per_file, "legacy replay_buffer")):
        r = CliRunner().invoke(cli, ["verify", str(path), "--json", "--quiet"])
        doc = json.loads(r.output)
        assert r.exit_code == 0 and doc["ok"] is True and doc["kind"] == kind and doc["num_experts"] == 3
    anchor = next((tmp_path / "a.ctraj").rglob("*.safetensors"))
    data = bytearray(anchor.read_bytes())
    data[-3] ^= 0xFF
    anchor.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "a.ctraj"), "--json", "--quiet"])
    doc = json.loads(r.output)
    assert r.exit_code == 1 and doc["ok"] is False and anchor.name in doc["error"]
    assert doc["error_type"] == "ChecksumError"
