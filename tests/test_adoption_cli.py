"""What MTT-family users bring: upstream flag spellings, run replay, loggers, upstream output files."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import trajstore
import trajstore.distill.run as run_module
from helpers import random_walk, write_store
from trajstore.cli.main import cli
from trajstore.distill.run import DistillConfig, distill, open_experts
from trajstore.distill.subsets import subset_positions

MODEL = "ConvNetW8"
TINY = dict(ipc=1, syn_steps=2, expert_epochs=1.5, max_start_epoch=2, iterations=4, eval_every=2, eval_nets=1,
            eval_epochs=2, checkpoint_every=2, lr_img=100.0, lr_lr=1e-7)


@pytest.fixture
def captured(monkeypatch):
    """Run `trajstore distill ...` through the parser only: the resolved DistillConfig is kept, not run."""
    seen = {}

    def fake_distill(config, out, **kwargs):
        seen.update(config=config, out=out, **kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(run_module, "distill", fake_distill)
    return seen


# MTT's README, "Distillation" (CIFAR-10, 1 image per class), with the other upstream flags of distill.py.
MTT_README = ("--dataset=CIFAR10 --ipc=1 --syn_steps=50 --expert_epochs=2 --max_start_epoch=2 --zca --lr_img=1000 "
              "--lr_lr=1e-07 --lr_teacher=0.01 --buffer_path={buffers} --data_path={data}")
MORE_UPSTREAM = ("--Iteration 3000 --eval_it 250 --num_eval 3 --epoch_eval_train 300 --pix_init noise --dsa False "
                 "--dsa_strategy color_crop --max_experts 4 --max_files 2 --batch_syn 5")


def test_an_upstream_command_line_resolves_to_the_same_settings(tmp_path, captured):
    args = (MTT_README + " " + MORE_UPSTREAM).format(buffers=tmp_path / "buffers", data=tmp_path / "data")
    r = CliRunner().invoke(cli, ["distill", *args.split()])
    assert r.exit_code == 0, r.output
    c = captured["config"]
    assert c.source == str(tmp_path / "buffers" / "CIFAR10" / "ConvNet")  # --zca: no _NO_ZCA, as upstream
    assert (c.dataset, c.ipc, c.syn_steps, c.expert_epochs, c.max_start_epoch) == ("CIFAR10", 1, 50, 2, 2)
    assert (c.zca, c.lr_img, c.lr_lr, c.lr_teacher, c.data_path) == (True, 1000, 1e-7, 0.01, str(tmp_path / "data"))
    assert (c.iterations, c.eval_every, c.eval_nets, c.eval_epochs, c.init) == (3000, 250, 3, 300, "noise")
    assert (c.dsa, c.dsa_strategy, c.max_experts, c.max_files, c.batch_syn) == (False, "color_crop", 4, 2, 5)


def test_upstream_defaults_and_spellings(tmp_path, captured):
    runner = CliRunner()
    r = runner.invoke(cli, ["distill", "--buffer_path", str(tmp_path), "--dataset", "CIFAR100", "--dsa", "True"])
    assert r.exit_code == 0, r.output
    c = captured["config"]
    assert c.source == str(tmp_path / "CIFAR100_NO_ZCA" / "ConvNet") and c.dsa is True and c.zca is None
    # a setting nobody gave keeps its one default (DistillConfig's), whatever the spelling
    assert (c.syn_steps, c.lr_img, c.dsa_strategy) == (DistillConfig("x").syn_steps, DistillConfig("x").lr_img,
                                                        "color_crop_cutout_flip_scale_rotate")
    r = runner.invoke(cli, ["distill", "s.ctraj", "--no-dsa", "--Iteration=7"])
    assert r.exit_code == 0 and captured["config"].dsa is False and captured["config"].iterations == 7
    r = runner.invoke(cli, ["distill", "s.ctraj", "--dsa=maybe"])
    assert r.exit_code == 2 and "True or False" in r.output
    r = runner.invoke(cli, ["distill", "s.ctraj", "--dsa_strategy", "color_warp"])
    assert r.exit_code == 1 and "warp" in r.output
    options = runner.invoke(cli, ["distill", "--help"]).output.split("Options:")[1]  # aliases stay out of it
    assert "--dsa-strategy" in options and "--syn_steps" not in options and "--Iteration" not in options


def test_buffer_py_spellings_reach_the_expert_trainer(tmp_path, monkeypatch):
    import trajstore.distill.experts as experts_module

    seen = {}
    monkeypatch.setattr(experts_module, "train_experts", lambda out, **kw: seen.update(kw) or out)
    args = (f"experts {tmp_path / 'e.ctraj'} --dataset=CIFAR10 --model=ConvNet --train_epochs=50 --num_experts=100 "
            f"--buffer_path={tmp_path / 'buffers'} --data_path={tmp_path / 'data'} --lr_teacher 0.02 --mom 0.9 "
            f"--l2 5e-4 --dsa False --batch_train 128 --dsa_strategy crop_flip")
    r = CliRunner().invoke(cli, args.split())
    assert r.exit_code == 0, r.output
    assert seen["legacy_dir"] == str(tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet")
    assert (seen["epochs"], seen["num_experts"], seen["lr"], seen["momentum"]) == (50, 100, 0.02, 0.9)
    # --zca was not given, so it is not passed: train_experts' own default (False) decides
    assert (seen["weight_decay"], seen["dsa"], seen["batch_size"], seen.get("zca", False)) == (5e-4, False, 128, False)
    assert seen["dsa_strategy"] == "crop_flip"


def test_weight_decay_reaches_the_optimizer(tmp_path):
    from trajstore.distill.data import load_dataset
    from trajstore.distill.experts import train_experts

    ds = load_dataset("digits", im_size=(8, 8), channels=1).subset(200)
    ends = {}
    for wd in (0.0, 0.5):
        path = train_experts(tmp_path / f"wd{wd}.ctraj", dataset=ds, model=MODEL, num_experts=1, epochs=1, lr=0.1,
                             weight_decay=wd, dsa=False, progress=False, log=lambda _: None)
        store = trajstore.open(path)
        assert store.training["weight_decay"] == wd
        ends[wd] = store[0].at(1, flat=True)
    starts = [trajstore.open(tmp_path / f"wd{wd}.ctraj")[0][0] for wd in (0.0, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(*starts))  # the same initialisation
    # one epoch of decay shrinks the weights: || theta_1 || is smaller with it
    assert ends[0.5].norm() < ends[0.0].norm()


def test_expert_subsets_follow_upstream_max_files_and_max_experts(tmp_path):
    assert subset_positions([10, 10, 5], 3, 2) == [0, 1, 2, 10, 11, 12]  # first 2 files, first 3 of each
    assert subset_positions([10, 10, 5], None, None) == list(range(25))
    assert subset_positions([2, 2], 5, None) == [0, 1, 2, 3]
    path = write_store(tmp_path / "e.ctraj", [random_walk(num_timesteps=6, seed=s) for s in range(12)])
    experts = open_experts(path, "mct", max_experts=1, max_files=2)  # a .ctraj: files of 10 -> experts 0 and 10
    store = trajstore.open(path)
    assert experts.source.num_experts == 2
    allowed = [store[0].at(0, flat=True), store[10].at(0, flat=True)]
    rng = np.random.default_rng(0)
    picked = set()
    for _ in range(30):
        start, _, info = experts.source.sample(rng, 0.0, 1.0)
        picked.add(info.expert)
        assert torch.equal(start, allowed[info.expert])
    assert picked == {0, 1}


def test_config_replays_a_run_with_flags_on_top(tmp_path, captured):
    run = tmp_path / "run"
    run.mkdir()
    saved = DistillConfig(source=str(tmp_path / "s.ctraj"), syn_steps=9, lr_img=77.0, im_size=(8, 8), dsa=False,
                          max_files=3, seed=4)
    (run / "config.json").write_text(json.dumps(saved.to_json()))
    runner = CliRunner()
    r = runner.invoke(cli, ["distill", "--config", str(run / "config.json")])
    assert r.exit_code == 0, r.output
    assert captured["config"] == saved
    r = runner.invoke(cli, ["distill", "--config", str(run), "--syn_steps", "3", "--seed", "0"])
    assert r.exit_code == 0, r.output
    import dataclasses

    assert captured["config"] == dataclasses.replace(saved, syn_steps=3, seed=0)


@pytest.mark.parametrize("content, problem", [("{not json", "not a JSON run config"),
                                              ('{"source": "s", "wings": 2}', "unknown settings"),
                                              ('{"source": "s", "ipc": "ten"}', "wrong type"),
                                              ("[1, 2]", "no source")])
def test_a_broken_config_is_one_clear_error(tmp_path, content, problem):
    (tmp_path / "config.json").write_text(content)
    r = CliRunner().invoke(cli, ["distill", "--config", str(tmp_path / "config.json")])
    assert r.exit_code == 1 and problem in r.output and "config.json" in r.output
    assert "Traceback" not in r.output


def test_a_missing_logger_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    path = write_store(tmp_path / "e.ctraj", [random_walk(num_timesteps=6, seed=0)])
    r = CliRunner().invoke(cli, ["distill", str(path), "--logger", "wandb", "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "pip install wandb" in r.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from trajstore.distill.data import load_dataset
    from trajstore.distill.experts import train_experts

    root = tmp_path_factory.mktemp("adoption-experts")
    ds = load_dataset("digits", im_size=(8, 8), channels=1).subset(300)
    return train_experts(root / "digits.ctraj", dataset=ds, model=MODEL, num_experts=2, epochs=3, progress=False,
                         log=lambda _: None)


def test_a_run_logs_to_wandb_and_writes_upstream_files(experts, tmp_path, monkeypatch):
    """A fake wandb module stands in for the real one: what the run sends it must be metrics.jsonl's numbers."""
    sent, finished = [], []

    class Run:
        def log(self, data, step):
            sent.append((step, data))

        def finish(self):
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: sent.append(("init", kw["mode"])) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    distill(DistillConfig(source=str(experts), **TINY), out, progress=False, log=lambda _: None, logger="wandb")
    assert sent[0] == ("init", "offline") and finished == [True]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(sent) - 1 == len(lines)
    for (step, data), record in zip(sent[1:], lines):
        assert step == record["iteration"]
        want = "loss" if record["kind"] == "step" else "mean"
        assert data[f"{record['kind']}/{want}"] == pytest.approx(record[want])

    # upstream's plain-tensor files hold the best set, exactly as the safetensors file does
    from trajstore.distill.synset import load_synset

    best = load_synset(out / "synset_best.safetensors")
    images = torch.load(out / "images_best.pt", weights_only=True)
    labels = torch.load(out / "labels_best.pt", weights_only=True)
    lr = torch.load(out / "lr_best.pt", weights_only=True)
    assert torch.equal(images, best.images) and torch.equal(labels, best.labels)
    assert lr.dim() == 0 and float(lr) == pytest.approx(best.lr)

    # and `trajstore evaluate` takes either form, with the same result
    runner = CliRunner()
    common = ["--num-nets", "1", "--epochs", "2", "--model", MODEL, "--quiet"]
    a = runner.invoke(cli, ["evaluate", str(out / "synset_best.safetensors"), *common])
    b = runner.invoke(cli, ["evaluate", str(out / "images_best.pt"), "--dataset", "digits", *common])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.output.splitlines()[-1] == b.output.splitlines()[-1]  # the per-network accuracies


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard itself reads back from the event files under `logdir`, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _metrics_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers as TensorBoard should hold them: `<kind>/<key>` against the iteration,
    as float32 (TensorBoard's scalar type); lists (an evaluation's accuracies) are not scalars."""
    want: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("kind", "iteration") and type(value) in (int, float):
                want.setdefault(f"{record['kind']}/{key}", []).append((record["iteration"], float(np.float32(value))))
    return want


def test_a_run_logs_to_tensorboard_what_metrics_jsonl_holds_even_when_resumed(experts, tmp_path):
    pytest.importorskip("tensorboard")  # the [test] extra installs it
    out = tmp_path / "run"

    def interrupt(line):  # stop at the last evaluation, after the checkpoint of iteration 2
        if line.startswith("iteration 4:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(source=str(experts), **TINY), out, progress=False, log=interrupt, logger="tensorboard")
    # resume from the command line: iterations 2-3 and the evaluation at 4 again
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = CliRunner().invoke(cli, ["distill", str(experts), "--out", str(out), *flags, "--logger", "tensorboard"])
    assert r.exit_code == 0, r.output
    assert "resuming at iteration 2" in r.output

    want = _metrics_scalars(out / "metrics.jsonl")
    assert [step for step, _ in want["step/loss"]] == [0, 1, 2, 3] and "eval/mean" in want
    assert _tensorboard_scalars(out / "tensorboard") == want  # each iteration once, with metrics.jsonl's value


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("damage, problem", [("unsafe", "refused"), ("truncated", "truncated or corrupt"),
                                             ("ragged", "6 labels"), ("no lr", "pass --lr")])
def test_hostile_upstream_sets_are_refused_in_one_line(tmp_path, damage, problem):
    torch.save(torch.zeros(6, 1, 8, 8), tmp_path / "images_best.pt")
    torch.save(torch.arange(6) % 3, tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.01), tmp_path / "lr_best.pt")
    if damage == "unsafe":
        torch.save([torch.zeros(6, 1, 8, 8), _Payload()], tmp_path / "images_best.pt")
    elif damage == "truncated":
        data = (tmp_path / "labels_best.pt").read_bytes()
        (tmp_path / "labels_best.pt").write_bytes(data[: len(data) // 2])
    elif damage == "ragged":
        torch.save(torch.arange(5), tmp_path / "labels_best.pt")
    else:
        (tmp_path / "lr_best.pt").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "images_best.pt"), "--num-nets", "1", "--epochs", "1"])
    assert r.exit_code == 1 and problem in r.output and "this ran" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "_best.pt" in r.output
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}
