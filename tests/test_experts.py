"""Expert training straight to .ctraj: a real (tiny) run, its legacy twin, and resuming."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import trajstore
from helpers import run_until_killed
from spec_reader import trajectory_betas
from trajstore.cli.main import cli
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import plot_accuracy, train_experts
from trajstore.distill.networks import ConvNet, config_for
from trajstore.distill.train import derived_seed
from trajstore import FormatError, TrajstoreError

EPOCHS = 3
WAYPOINTS = (1,)
TINY = dict(model="ConvNetW8", epochs=EPOCHS, waypoints=WAYPOINTS, progress=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", im_size=(16, 16)).subset(200)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """Two experts with a legacy twin, and the lines they logged."""
    root = tmp_path_factory.mktemp("experts")
    lines = []
    out = train_experts(root / "e.ctraj", dataset=data, num_experts=2, legacy_dir=root / "legacy", log=lines.append,
                        **TINY)
    return out, root / "legacy", lines


def load_twin(directory):
    return [traj for n in range(len(list(directory.glob("replay_buffer_*.pt"))))
            for traj in torch.load(directory / f"replay_buffer_{n}.pt", weights_only=True)]


def test_tiny_run_writes_a_verified_ctraj(run, data):
    out, _, lines = run
    store = trajstore.open(out)
    store.verify()
    assert (store.num_experts, store.num_timesteps, store.anchor_epochs) == (2, EPOCHS + 1, (0, 1, EPOCHS))
    assert store.architecture == {"name": "ConvNetW8", **config_for("ConvNetW8", 3, 10, (16, 16)).to_json()}
    t = store.training
    assert (t["dataset"], t["im_size"], t["zca"], t["epochs"], t["lr"], t["batch_size"], t["momentum"], t["dsa"],
            t["num_train"]) == ("digits", [16, 16], False, EPOCHS, 0.01, 256, 0.0, True, 200)
    assert [layer.name for layer in store.layers][:2] == ["features.0.weight", "features.0.bias"]
    for expert in store:
        _ = expert.beta
        acc = expert.provenance["test_acc"]
        assert len(acc) == EPOCHS and all(0 <= a <= 1 for a in acc)
        # timestep 0 is the expert's seeded initialisation
        torch.manual_seed(derived_seed(0, expert.id))
        init = ConvNet(config_for("ConvNetW8", 3, 10, (16, 16)))
        for name, p in init.named_parameters():
            assert torch.equal(expert.anchor(0)[name], p.detach())
    assert sum(" epoch " in line and "test acc" in line for line in lines) == 2 * EPOCHS
    assert lines[-1].startswith("expert 1 done")


def test_twin_is_the_same_runs_without_aliasing(run):
    out, legacy, _ = run
    store = trajstore.open(out)
    twin = load_twin(legacy)
    assert len(twin) == 2 and all(len(traj) == EPOCHS + 1 for traj in twin)
    for expert, traj in zip(store, twin):
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in traj[0])
        for a, b in zip(traj, traj[1:]):  # every timestep its own copy: consecutive ones differ
            assert any(not torch.equal(x, y) for x, y in zip(a, b))
        for epoch in store.anchor_epochs:
            assert all(torch.equal(x, y) for x, y in zip(expert.anchor(epoch).values(), traj[epoch]))
        norms = np.array([[torch.linalg.vector_norm(x.double() - y.double()).item() for x, y in zip(b, a)]
                          for a, b in zip(traj, traj[1:])])
        assert (expert.step_norms == norms).all()
        np.testing.assert_allclose(expert.beta, trajectory_betas(traj, store.anchor_epochs), rtol=1e-12)


def test_twin_converts_to_bit_identical_anchors_and_equal_betas(run, tmp_path):
    from trajstore.tools.convert import convert

    out, legacy, _ = run
    mine = trajstore.open(out)
    convert(legacy, tmp_path / "c.ctraj", waypoints=WAYPOINTS, architecture=mine.architecture, progress=False)
    theirs = trajstore.open(tmp_path / "c.ctraj")
    assert theirs.num_experts == mine.num_experts and theirs.anchor_epochs == mine.anchor_epochs
    assert theirs.layers == mine.layers
    for a, b in zip(mine, theirs):
        for epoch in mine.anchor_epochs:
            ours, converted = a.anchor(epoch), b.anchor(epoch)
            assert all(torch.equal(ours[name], converted[name]) for name in ours)
        assert (a.beta == b.beta).all() and (a.step_norms == b.step_norms).all()


def test_accuracy_plot(run, tmp_path):
    png = plot_accuracy(run[0], tmp_path / "acc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, data, run):
    full, full_legacy, _ = run
    out, legacy = tmp_path / "r.ctraj", tmp_path / "legacy"

    run_until_killed(f"""
from test_experts import TINY
from trajstore.distill.data import load_dataset
from trajstore.distill.experts import train_experts
def die(line):
    if line.startswith("expert 1 epoch 2"):
        os.kill(os.getpid(), signal.SIGKILL)
train_experts({str(out)!r}, dataset=load_dataset("digits", im_size=(16, 16)).subset(200), num_experts=2,
              legacy_dir={str(legacy)!r}, log=die, **TINY)
""")
    with pytest.raises(FormatError, match="unfinished"):
        trajstore.open(out)
    assert len(load_twin(legacy)) == 1
    lines = []
    train_experts(out, dataset=data, num_experts=2, legacy_dir=legacy, log=lines.append, **TINY)
    assert "1 experts already there, training 1" in lines[0]
    assert not any(line.startswith("expert 0") for line in lines)
    resumed, reference = trajstore.open(out), trajstore.open(full)
    resumed.verify()
    assert resumed.num_experts == 2
    for a, b in zip(resumed, reference):
        for epoch in reference.anchor_epochs:
            assert all(torch.equal(x, y) for x, y in zip(a.anchor(epoch).values(), b.anchor(epoch).values()))
        assert (a.beta == b.beta).all()
    for ta, tb in zip(load_twin(legacy), load_twin(full_legacy)):
        assert all(torch.equal(x, y) for sa, sb in zip(ta, tb) for x, y in zip(sa, sb))
    # nothing left to do: a rerun keeps the store as it is
    lines.clear()
    train_experts(out, dataset=data, num_experts=2, log=lines.append, **TINY)
    assert "2 experts already there, training 0" in lines[0]


def test_resume_refuses_what_would_mix_runs(tmp_path, data, run):
    out = run[0]
    with pytest.raises(TrajstoreError, match="cannot continue.*lr: 0.01 there, 0.02 now"):
        train_experts(out, dataset=data, num_experts=3, lr=0.02, **TINY)
    with pytest.raises(TrajstoreError, match="another layout: anchor_epochs"):
        train_experts(out, dataset=data, num_experts=3, **{**TINY, "waypoints": (2,)})
    with pytest.raises(TrajstoreError, match="holds 0 legacy trajectories but the .ctraj holds 2"):
        train_experts(out, dataset=data, num_experts=3, legacy_dir=tmp_path / "fresh", **TINY)
    assert trajstore.open(out).num_experts == 2
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(FormatError, match="not a .ctraj"):
        train_experts(tmp_path / "not-a-store", dataset=data, num_experts=1, **TINY)


def test_cli_trains_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.ctraj"
    result = runner.invoke(cli, ["experts", str(out), "--model", "ConvNetW8", "--epochs", "1", "--num-experts", "1",
                                 "--waypoints", "", "--quiet", "--plot", str(tmp_path / "acc.png")])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and (tmp_path / "acc.png").exists()
    assert trajstore.open(out).training["im_size"] == [32, 32]
    bad = runner.invoke(cli, ["experts", str(tmp_path / "x"), "--dataset", "mnist", "--quiet"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: unknown dataset 'mnist'")
    assert "Traceback" not in bad.output and not (tmp_path / "x").exists()
    bad = runner.invoke(cli, ["experts", str(tmp_path / "x"), "--model", "ResNet", "--quiet"])
    assert bad.exit_code == 1 and "unknown model 'ResNet'" in bad.output
    if not torch.cuda.is_available():
        bad = runner.invoke(cli, ["experts", str(tmp_path / "x"), "--device", "cuda", "--quiet"])
        assert bad.exit_code == 1 and "CUDA is not available" in bad.output
    bad = runner.invoke(cli, ["experts", str(tmp_path / "x"), "--device", "tpu", "--quiet"])
    assert bad.exit_code == 1 and "unknown device 'tpu'" in bad.output
    bad = runner.invoke(cli, ["experts", str(tmp_path / "x"), "--waypoints", "6,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output


def test_cli_passes_on_only_the_options_given_so_train_experts_decides_the_rest(tmp_path, monkeypatch):
    import trajstore.distill.experts as experts_module

    calls = []
    monkeypatch.setattr(experts_module, "train_experts", lambda out, **kw: calls.append(kw) or out)
    runner = CliRunner()
    assert runner.invoke(cli, ["experts", str(tmp_path / "a"), "--quiet"]).exit_code == 0
    assert set(calls[-1]) == {"waypoints", "progress", "log"} and calls[-1]["waypoints"] == ()
    assert runner.invoke(cli, ["experts", str(tmp_path / "a"), "--smoothing", "none", "--quiet"]).exit_code == 0
    assert "smoothing" not in calls[-1]  # "none" spelled out is the default: no smoothing
    assert runner.invoke(cli, ["experts", str(tmp_path / "a"), "--smoothing", "binomial", "--quiet"]).exit_code == 0
    assert calls[-1]["smoothing"] == "binomial"
    r = runner.invoke(cli, ["experts", str(tmp_path / "a"), "--train_epochs", "3", "--lr_teacher", "0.05",
                            "--no-zca", "--dsa", "False", "--seed", "7", "--quiet"])
    assert r.exit_code == 0, r.output
    given = {k: v for k, v in calls[-1].items() if k not in ("waypoints", "progress", "log")}
    assert given == {"epochs": 3, "lr": 0.05, "zca": False, "dsa": False, "seed": 7}
    # upstream's --buffer_path composes the buffer folder from the defaults it was not given (buffer.py's layout)
    r = runner.invoke(cli, ["experts", str(tmp_path / "a"), "--buffer_path", str(tmp_path / "b"), "--dataset",
                            "CIFAR10", "--quiet"])
    assert r.exit_code == 0, r.output
    assert calls[-1]["legacy_dir"] == str(tmp_path / "b" / "CIFAR10_NO_ZCA" / "ConvNet")  # zca False, ConvNet


def test_cli_help_shows_train_experts_own_defaults():
    import inspect

    signature = inspect.signature(train_experts).parameters
    text = " ".join(CliRunner().invoke(cli, ["experts", "--help"]).output.split())  # unwrapped
    for name in ("dataset", "model", "num_experts", "epochs", "lr", "batch_size", "momentum", "weight_decay",
                 "dsa_strategy", "seed"):
        option = "--" + name.replace("_", "-")
        help_of = text[text.index(option + " "):].split(" --", 1)[0]
        assert f"[default: {signature[name].default}]" in help_of, (option, help_of)
    assert "[default: --no-zca]" in text and "[default: --dsa]" in text  # train_experts: zca=False, dsa=True
    assert signature["zca"].default is False and signature["dsa"].default is True
