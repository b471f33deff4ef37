"""`trajstore quickstart` at smoke scale: the same steps as the full run, its table and its files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import trajstore
from trajstore.cli.main import cli
from trajstore.distill.quickstart import SCALES, run_quickstart
from trajstore.distill.synset import load_synset
from trajstore import ExistsError

PNG = b"\x89PNG\r\n\x1a\n"


def test_quickstart_smoke_writes_its_table_and_files(tmp_path):
    out = tmp_path / "qs"
    lines = []
    result = run_quickstart(out, scale="smoke", progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "storage: .ctraj" in text and "| method |" in text and "random real subset" in text

    assert [r.method for r in result.rows] == ["MCT", "MTT", "random real subset"]
    table = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["MCT", "MTT", "random real subset"]
    assert table["ctraj_bytes"] == trajstore.open(out / "experts.ctraj").nbytes
    assert table["legacy_bytes"] == sum(f.stat().st_size for f in (out / "legacy").glob("replay_buffer_*.pt"))
    assert 0 < table["storage_ratio"] < 1  # even 5 timesteps with 3 anchors take less than the buffer
    for row in table["rows"]:
        acc = row["accuracy"]
        assert 0 <= acc["mean"] <= 1 and len(acc["accuracies"]) == SCALES["smoke"].eval_nets
    assert (out / "table.md").read_text().count("\n") == 5  # header, rule, three rows

    store = trajstore.open(out / "experts.ctraj")
    assert store.num_experts == SCALES["smoke"].num_experts and store.anchor_epochs == (0, 1, 4)
    for method in ("mct", "mtt"):
        final = load_synset(out / method / "synset_final.safetensors")
        assert final.images.shape == (10, 1, 8, 8) and final.meta["method"] == method
        assert json.loads((out / method / "result.json").read_text())["iterations"] == SCALES["smoke"].iterations
    assert torch.equal(load_synset(out / "random.safetensors").labels, torch.arange(10))
    for png in ("accuracy.png", "experts.png", "grid_random.png", "mct/grid_final.png", "mtt/accuracy.png"):
        assert (out / png).read_bytes()[:8] == PNG

    (out / "table.json").unlink()  # killed after both runs, before the table: a rerun finishes the job
    mct_result = (out / "mct" / "result.json").stat().st_mtime_ns
    resumed = run_quickstart(out, scale="smoke", progress=False, log=lines.append)
    assert (out / "mct" / "result.json").stat().st_mtime_ns == mct_result  # not distilled again
    assert resumed.rows == result.rows and json.loads((out / "table.json").read_text())["rows"] == table["rows"]

    with pytest.raises(ExistsError, match="finished quickstart"):
        run_quickstart(out, scale="smoke", progress=False, log=lines.append)
    again = CliRunner().invoke(cli, ["quickstart", "--scale", "smoke", "--out", str(out), "--force", "--quiet"])
    assert again.exit_code == 0, again.output
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert rows[2] == table["rows"][2]
    for row in rows[:2]:  # each method's verdict against the random subset, as the table's numbers say
        margin = 100 * (row["accuracy"]["mean"] - rows[2]["accuracy"]["mean"])
        verdict = (f"{row['method']} beats the random real subset by {margin:.2f} points" if margin > 0 else
                   f"{row['method']} does NOT beat the random real subset ({margin:+.2f} points)")
        assert verdict in again.output.splitlines(), (verdict, again.output)

    # Both verdicts, whatever this run's margins happen to be: the finished runs' final accuracies set to
    # 0 (MCT) and 1 (MTT) on disk, the table dropped, a rerun reads them back and re-evaluates the subset.
    for method, mean in (("mct", 0.0), ("mtt", 1.0)):
        doc = json.loads((out / method / "result.json").read_text())
        doc["final"] = {**doc["final"], "mean": mean}
        (out / method / "result.json").write_text(json.dumps(doc))
    (out / "table.json").unlink()
    lines.clear()
    run_quickstart(out, scale="smoke", progress=False, log=lines.append)
    base = json.loads((out / "table.json").read_text())["rows"][2]["accuracy"]["mean"]
    assert 0 < base < 1  # margins in points: 100 x (accuracy - the subset's)
    assert f"MCT does NOT beat the random real subset ({100 * (0.0 - base):+.2f} points)" in lines, lines
    assert f"MTT beats the random real subset by {100 * (1.0 - base):.2f} points" in lines, lines
