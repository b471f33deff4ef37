"""Distillation runs end to end: resume after a crash, evaluations and the best set, refusals, presets, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import trajstore.distill.run as run_module
from trajstore.cli.main import cli
from trajstore.distill.evaluate import EvalResult
from trajstore.distill.experts import train_experts
from trajstore.distill.presets import PRESETS, get_preset
from trajstore.distill.run import DistillConfig, distill
from trajstore.distill.synset import load_synset
from trajstore import ExistsError, TrajstoreError
from helpers import run_until_killed

MODEL = "ConvNetW8"
# Tiny but real: digits at 8x8, 4 epochs per expert, a few 2-step iterations, 2-epoch evaluations.
TINY = dict(ipc=1, syn_steps=2, expert_epochs=1.5, max_start_epoch=2, iterations=6, eval_every=3, eval_nets=1,
            eval_epochs=2, checkpoint_every=2, lr_img=100.0, lr_lr=1e-7)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two experts trained on 400 digits, as a .ctraj (anchors 0, 1, 4) and as the legacy MTT buffer."""
    from trajstore.distill.data import load_dataset

    root = tmp_path_factory.mktemp("experts")
    ds = load_dataset("digits", im_size=(8, 8), channels=1).subset(400)
    ctraj = train_experts(root / "digits.ctraj", dataset=ds, model=MODEL, num_experts=2, epochs=4, waypoints=(1,),
                          legacy_dir=root / "legacy", progress=False, log=lambda _: None)
    return ctraj, root / "legacy"


def tiny(source, **overrides) -> DistillConfig:
    return DistillConfig(source=source, **{**TINY, **overrides})


def records(out, kind):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in lines if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(experts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "whole"
    return distill(tiny(experts[0]), out, progress=False, log=lambda _: None)


def test_a_killed_run_resumes_to_the_same_result(experts, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # iterations 0-4 done; last checkpoint at 4, so iteration 4 is redone
    run_until_killed(f"""
import trajstore.distill.run as run_module
from test_run import tiny
real_step, calls = run_module.Matcher.step, []
def dying_step(self):
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return real_step(self)
run_module.Matcher.step = dying_step
run_module.distill(tiny({str(experts[0])!r}), {str(out)!r}, progress=False, log=lambda _: None)
""")
    assert not (out / "result.json").exists()
    assert len(records(out, "step")) == 4  # iterations 0-3 reached the disk with the checkpoint; 4 died buffered
    with open(out / "metrics.jsonl", "ab") as f:  # and a record torn by the kill mid-write
        f.write(b'{"kind": "step", "iteration": 4, "lo')

    lines = []
    resumed = distill(tiny(experts[0]), out, progress=False, log=lines.append)
    assert any("resuming at iteration 4" in line for line in lines)
    for name in ("synset_final.safetensors", "synset_best.safetensors"):
        a, b = load_synset(uninterrupted.out_dir / name), load_synset(out / name)
        assert torch.equal(a.images, b.images) and a.lr == b.lr
    assert resumed.final == uninterrupted.final and resumed.best_iteration == uninterrupted.best_iteration
    assert records(out, "step") == records(uninterrupted.out_dir, "step")  # no record lost or doubled
    assert records(out, "eval") == records(uninterrupted.out_dir, "eval")


def test_evaluations_are_logged_and_the_best_set_is_kept(experts, tmp_path, monkeypatch):
    accuracies = iter([0.2, 0.9, 0.5])
    seen = []

    def fake_evaluate(images, labels, dataset, *, lr, **kwargs):
        seen.append(images.detach().clone())
        acc = next(accuracies)
        return EvalResult(acc, 0.01, (acc,))

    monkeypatch.setattr(run_module, "evaluate_synset", fake_evaluate)
    result = distill(tiny(experts[0]), tmp_path / "out", progress=False, log=lambda _: None)
    evals = records(result.out_dir, "eval")
    assert [e["iteration"] for e in evals] == [0, 3, 6]
    assert [e["mean"] for e in evals] == [0.2, 0.9, 0.5]
    assert [r["iteration"] for r in records(result.out_dir, "step")] == list(range(6))
    assert result.best_iteration == 3 and result.best.mean == 0.9 and result.final.mean == 0.5
    best, final = load_synset(result.best_path), load_synset(result.final_path)
    assert torch.equal(best.images, seen[1]) and torch.equal(final.images, seen[2])
    assert not torch.equal(best.images, final.images)
    assert best.meta["iteration"] == 3 and best.meta["method"] == "mct" and best.meta["model"] == MODEL
    for png in ("accuracy.png", "grid_init.png", "grid_best.png", "grid_final.png"):
        assert (result.out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((result.out_dir / "result.json").read_text())
    assert saved["best_iteration"] == 3 and len(saved["evals"]) == 3


def test_real_evaluations_and_classic_mtt_on_the_legacy_buffer(experts, uninterrupted, tmp_path):
    assert [e["iteration"] for e in records(uninterrupted.out_dir, "eval")] == [0, 3, 6]
    assert 0 <= uninterrupted.final.mean <= 1 and len(uninterrupted.final.accuracies) == 1
    result = distill(tiny(experts[1], expert_epochs=1, dataset="digits", model=MODEL), tmp_path / "mtt",
                     progress=False, log=lambda _: None)
    assert result.method == "mtt"
    starts = [r["start"] for r in records(result.out_dir, "step")]
    assert all(s in (0.0, 1.0) for s in starts)  # integer epochs below max_start_epoch, as upstream
    assert load_synset(result.final_path).images.shape == (10, 1, 8, 8)


def test_zca_mismatch_is_refused_before_anything_is_written(experts, tmp_path):
    with pytest.raises(TrajstoreError, match="trained without ZCA whitening but this run is with it"):
        distill(tiny(experts[0], zca=True), tmp_path / "out", progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_kept_unless_overwritten(experts, uninterrupted, tmp_path):
    with pytest.raises(ExistsError, match="finished"):
        distill(tiny(experts[0]), uninterrupted.out_dir, progress=False, log=lambda _: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExistsError, match="holds no distillation run"):
        distill(tiny(experts[0]), tmp_path / "other", overwrite=True, progress=False, log=lambda _: None)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resuming_with_other_settings_is_refused(experts, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module.Matcher, "step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        distill(tiny(experts[0]), tmp_path / "out", progress=False, log=lambda _: None)
    with pytest.raises(TrajstoreError, match="lr_img: 100.0 there, 50.0 now"):
        distill(tiny(experts[0], lr_img=50.0), tmp_path / "out", progress=False, log=lambda _: None)


def test_sources_and_methods_must_agree(experts, tmp_path):
    with pytest.raises(TrajstoreError, match="convert it first"):
        distill(tiny(experts[1], method="mct", dataset="digits", model=MODEL), tmp_path / "a", progress=False)
    with pytest.raises(TrajstoreError, match="use --method mct"):
        distill(tiny(experts[0], method="mtt"), tmp_path / "b", progress=False)
    with pytest.raises(TrajstoreError, match="max_start_epoch=9"):  # beyond K = 4: refused up front
        distill(tiny(experts[0], max_start_epoch=9), tmp_path / "c", progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_presets_follow_the_published_tables_and_flags_override_them(experts, tmp_path):
    assert {p.ipc for p in PRESETS.values()} == {1, 10, 50} and {p.method for p in PRESETS.values()} == {"mct", "mtt"}
    p = get_preset("MCT-cifar10-ipc10")  # MCT paper Table 5: N = 50, best M = 6 at ipc 10, ZCA
    assert (p.method, p.syn_steps, p.expert_epochs, p.zca, p.anchors) == ("mct", 50, 6, True, (6, 25))
    code = get_preset("mct-cifar10-ipc10-nozca")  # MCT run_command.md: N/M/max_start/lr_img/lr_lr 30/15/8/1e3/1e-5
    assert (code.syn_steps, code.expert_epochs, code.max_start_epoch, code.lr_img, code.lr_lr) == (30, 15, 8, 1e3, 1e-5)
    tiny_in = get_preset("tinyimagenet-ipc50", "mtt")
    assert tiny_in.model == "ConvNetD4" and tiny_in.batch_syn == 300 and tiny_in.method == "mtt"
    config = DistillConfig.from_preset(experts[0], "mtt-cifar100-ipc1", syn_steps=7, lr_lr=None, iterations=3)
    assert (config.syn_steps, config.iterations, config.preset, config.method) == (7, 3, "mtt-cifar100-ipc1", "mtt")
    assert (config.expert_epochs, config.max_start_epoch, config.lr_lr, config.zca) == (3, 20, 1e-5, True)
    assert DistillConfig.from_preset(experts[0], None, ipc=3).syn_steps == DistillConfig.syn_steps
    assert DistillConfig.from_preset(experts[0], "cifar10-ipc1").preset == "mct-cifar10-ipc1"  # a .ctraj: MCT's row
    with pytest.raises(TrajstoreError, match="unknown preset 'cifar10-ipc2' for MCT; known: mct-cifar10-ipc1"):
        get_preset("cifar10-ipc2", "mct")
    with pytest.raises(TrajstoreError, match="is MTT's published setting, but this run uses MCT: use mct-cifar10-ipc1"):
        DistillConfig.from_preset(experts[0], "mtt-cifar10-ipc1", method="mct")
    with pytest.raises(TrajstoreError, match="no MCT preset exists for cifar100"):
        get_preset("mtt-cifar100-ipc1", "mct")
    with pytest.raises(TrajstoreError, match="trained on digits but this run is set up for cifar10"):
        distill(DistillConfig.from_preset(experts[0], "mct-cifar10-ipc1-nozca"), tmp_path / "x", progress=False)


def test_list_presets_prints_every_preset_with_method_and_source():
    result = CliRunner().invoke(cli, ["distill", "--list-presets"])
    assert result.exit_code == 0, result.output
    for p in PRESETS.values():
        assert f"{p.name}: {p.method.upper()} {p.dataset} ipc {p.ipc}" in result.output
        assert f"source: {p.source}" in result.output
    assert "MTT README" in result.output and "MCT paper, Table 5" in result.output


def test_cli_distills_refuses_to_overwrite_and_forces(experts, tmp_path):
    out = tmp_path / "cli"
    args = ["distill", str(experts[0]), "--syn-steps", "2", "--expert-epochs", "1.5", "--max-start-epoch", "2",
            "--iterations", "2", "--eval-every", "0", "--eval-nets", "1", "--eval-epochs", "1", "--lr-img", "100",
            "--memory", "constant", "--init", "noise", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "final set:" in result.output and (out / "synset_final.safetensors").is_file()
    assert [e["iteration"] for e in records(out, "eval")] == [2]  # --eval-every 0: only at the end
    saved = json.loads((out / "config.json").read_text())
    assert (saved["memory"], saved["init"], saved["syn_steps"], saved["lr_lr"]) == ("constant", "noise", 2, 1e-5)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "holds a finished distillation run" in again.output
    assert "Traceback" not in again.output and len(again.output.strip().splitlines()) == 1
    assert CliRunner().invoke(cli, args + ["--force"]).exit_code == 0
    bad = CliRunner().invoke(cli, ["distill", str(experts[0]), "--preset", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 1 and "unknown preset 'nope'" in bad.output
