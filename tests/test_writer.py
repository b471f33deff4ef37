"""The streaming writer: bounded state, crash safety, concurrent processes."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import SMALL_LAYERS, random_walk

import trajstore

REPO = Path(__file__).resolve().parents[1]


def test_streaming_keeps_only_history_and_anchors(tmp_path):
    traj = random_walk(num_timesteps=31)
    with trajstore.create(tmp_path / "s.ctraj", SMALL_LAYERS, 31, waypoints=(10,)) as w:
        with w.expert() as ew:
            for t, params in enumerate(traj):
                ew.append(params)
                assert len(ew._history) <= 3
                assert set(ew._anchors) == {e for e in (0, 10, 30) if e <= t}
    r = trajstore.open(tmp_path / "s.ctraj")
    assert torch.equal(r.expert(0).anchor(10)["fc.weight"], traj[10][2])


def test_writer_accepts_modules_and_state_dicts(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with trajstore.create(tmp_path / "m.ctraj", net, 3) as w:
        with w.expert() as ew:
            for _ in range(3):
                ew.append(net)
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(0.1)
    r = trajstore.open(tmp_path / "m.ctraj")
    assert [l.name for l in r.layers] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    torch.testing.assert_close(r.expert(0).anchor(2)["1.bias"], net[1].bias.detach() - 0.1)

    # a real state_dict(), BatchNorm buffers and all, trained a few steps: the parameters are what is stored
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(bn.parameters(), lr=0.1)
    seen = []
    with trajstore.create(tmp_path / "bn.ctraj", bn, 3) as w:
        with w.expert() as ew:
            for _ in range(3):
                assert "1.running_mean" in bn.state_dict() and "1.num_batches_tracked" in bn.state_dict()
                ew.append(bn.state_dict())
                seen.append({n: p.detach().clone() for n, p in bn.named_parameters()})
                opt.zero_grad()
                bn(torch.randn(4, 1, 4, 4)).square().sum().backward()
                opt.step()
    r = trajstore.open(tmp_path / "bn.ctraj")
    assert [l.name for l in r.layers] == [n for n, _ in bn.named_parameters()]
    for epoch in (0, 2):
        got = r.expert(0).anchor(epoch)
        assert got.keys() == seen[epoch].keys() and all(torch.equal(got[n], seen[epoch][n]) for n in got)
    with pytest.raises(trajstore.InvalidTensorError, match="missing"):
        with trajstore.create(tmp_path / "short.ctraj", bn, 3) as w:
            w.expert().append({k: v for k, v in bn.state_dict().items() if k != "3.bias"})


WRITE_FOREVER = textwrap.dedent("""
    import sys, torch, trajstore
    sys.path.insert(0, {tests!r})
    from helpers import SMALL_LAYERS, random_walk
    traj = random_walk(num_timesteps=11)
    with trajstore.create({out!r}, SMALL_LAYERS, 11) as w:
        w.write_expert(traj)
        print("first expert written", flush=True)
        while True:
            with w.expert() as ew:
                for params in traj:
                    ew.append(params)
""")


def test_writer_killed_mid_write_leaves_nothing_valid(tmp_path):
    out = tmp_path / "k.ctraj"
    code = WRITE_FOREVER.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout.readline().strip() == b"first expert written"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(trajstore.FormatError, match="unfinished write"):
        trajstore.open(out)
    with trajstore.create(out, SMALL_LAYERS, 11, append=True) as w:
        done = w.existing_experts()
        assert done[0] == 0
    r = trajstore.open(out)  # finished experts survive the kill, each whole
    assert r.num_experts == len(done)
    r.verify()


WRITE_RANK = textwrap.dedent("""
    import sys, trajstore
    sys.path.insert(0, {tests!r})
    from helpers import SMALL_LAYERS, random_walk
    rank = int(sys.argv[1])
    with trajstore.create({out!r}, SMALL_LAYERS, 11, waypoints=(4,), append=True) as w:
        for i in range(3):
            w.write_expert(random_walk(seed=10 * rank + i), index=3 * rank + i)
""")


def test_concurrent_processes_write_different_experts(tmp_path):
    out = tmp_path / "c.ctraj"
    code = WRITE_RANK.format(tests=str(Path(__file__).parent), out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], cwd=REPO) for rank in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    r = trajstore.open(out)
    assert r.expert_ids == list(range(9))
    r.verify()
    want = random_walk(seed=21)  # rank 2, i = 1 -> expert 7
    assert torch.equal(r.expert(7).anchor(4)["conv.weight"], want[4][0])


PUBLISH_SAME_ID = textwrap.dedent("""
    import sys, time, trajstore
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from helpers import SMALL_LAYERS, random_walk
    seed, ready, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    with trajstore.create({out!r}, SMALL_LAYERS, 11, waypoints=(4,), append=True) as w:
        ew = w.expert(3)  # both processes get past the existence check before either publishes
        ew.extend(random_walk(seed=seed))
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
        try:
            ew.close()
        except trajstore.ExistsError as exc:
            print("refused:", exc, flush=True)
            sys.exit(3)
    print("published", flush=True)
""")


def test_two_processes_publishing_the_same_id_one_wins_whole(tmp_path):
    out = tmp_path / "same.ctraj"
    with trajstore.create(out, SMALL_LAYERS, 11, waypoints=(4,)):
        pass
    code = PUBLISH_SAME_ID.format(tests=str(Path(__file__).parent), out=str(out))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(seed), str(tmp_path / f"ready{seed}"), str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for seed in (1, 2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{seed}").exists() for seed in (1, 2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer died early"
        time.sleep(0.05)
    go.touch()
    codes = [p.wait(timeout=120) for p in procs]
    outputs = [p.stdout.read() for p in procs]
    assert sorted(codes) == [0, 3], outputs
    loser = outputs[codes.index(3)]
    assert "refused:" in loser and "already exists" in loser
    winner = (1, 2)[codes.index(0)]
    r = trajstore.open(out)
    assert r.expert_ids == [3]
    r.verify()
    want = random_walk(seed=winner)  # every file of expert 3 is the winner's: no mix of the two
    for epoch in (0, 4, 10):
        assert all(torch.equal(r.expert(0).anchor(epoch)[n], t) for (n, _), t in zip(SMALL_LAYERS, want[epoch]))
    assert not [p.name for p in (out / "experts").iterdir() if p.name.startswith(".")]  # loser cleaned up


@pytest.mark.parametrize("change,key", [
    ({"layers": [*SMALL_LAYERS[:3], ("fc.bias", (5,))]}, "layers"),
    ({"layers": [(n, s, torch.float16) for n, s in SMALL_LAYERS]}, "layers"),
    ({"num_timesteps": 12, "waypoints": (4,)}, "num_timesteps"),
    ({"smoothing": "mct"}, "smoothing"),
    ({"waypoints": (5,)}, "anchor_epochs"),
])
def test_append_is_refused_on_another_layout_and_leaves_the_store_alone(tmp_path, change, key):
    out = tmp_path / "a.ctraj"
    with trajstore.create(out, SMALL_LAYERS, 11, waypoints=(4,)) as w:
        w.write_expert(random_walk())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = {"layers": SMALL_LAYERS, "num_timesteps": 11, "waypoints": (4,), **change}
    with pytest.raises(trajstore.TrajstoreError, match=f"cannot append: .*{key}") as err:
        trajstore.create(out, args.pop("layers"), args.pop("num_timesteps"), append=True, **args)
    assert str(out) in str(err.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert trajstore.open(out).num_experts == 1
