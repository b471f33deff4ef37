"""Where start/target parameters come from: continuous and discrete MCT sampling, classic MTT, the ZCA refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SMALL_LAYERS, random_walk, write_store

import trajstore
from trajstore.distill.sources import ConvexifiedSource, LegacySource, SampleInfo, TrajectorySource, check_zca
from trajstore import FormatError, OutOfRangeError, TrajstoreError

K = 10  # 11 timesteps


@pytest.fixture(scope="module")
def ctraj(tmp_path_factory):
    trajs = [random_walk(num_timesteps=K + 1, seed=s) for s in range(3)]
    path = write_store(tmp_path_factory.mktemp("src") / "s.ctraj", trajs, waypoints=(4,), training={"zca": True})
    return trajstore.open(path)


class TinyBuffer:
    """The interface of trajstore.legacy.open_buffer / archive.open_archive, recording what was read."""

    def __init__(self, trajs, path="tiny/replay_buffer_0.pt"):
        self.trajs = trajs
        self.path = path
        self.layers = trajstore.layer_table(SMALL_LAYERS)
        self.reads: list[tuple[int, int]] = []

    num_experts = property(lambda self: len(self.trajs))
    num_timesteps = property(lambda self: len(self.trajs[0]))

    def timestep(self, i, t):
        self.reads.append((i, t))
        return self.trajs[i][t]


def _flat(timestep):
    return torch.cat([p.reshape(-1) for p in timestep])


def test_both_sources_fit_the_protocol(ctraj):
    assert isinstance(ConvexifiedSource(ctraj), TrajectorySource)
    assert isinstance(LegacySource(TinyBuffer([random_walk()])), TrajectorySource)


def test_continuous_sampling_gives_real_starts_across_the_range(ctraj):
    src = ConvexifiedSource(ctraj)
    assert (src.num_experts, src.max_position) == (3, K)
    rng = np.random.default_rng(0)
    samples = [src.sample(rng, 6, 2.5) for _ in range(300)]
    cs = np.array([info.start for _, _, info in samples])
    assert np.all((0 <= cs) & (cs <= 6))
    assert np.mean(cs != np.round(cs)) > 0.99
    assert cs.min() < 0.2 and cs.max() > 5.8  # spans [0, max_start]
    assert {info.expert for _, _, info in samples} == {0, 1, 2}
    for start, target, info in samples[:20]:
        expert = ctraj.expert(info.expert)
        assert info.target == pytest.approx(info.start + 2.5)
        torch.testing.assert_close(start, expert.at(info.start, flat=True), rtol=0, atol=0)
        torch.testing.assert_close(target, expert.at(info.target, flat=True), rtol=0, atol=0)
        assert start.shape == (ctraj.num_params,)


def test_continuous_target_is_clamped_at_the_end(ctraj):
    start, target, info = ConvexifiedSource(ctraj).sample(np.random.default_rng(1), 9.5, 4.0)
    assert info.target == pytest.approx(min(info.start + 4.0, K))
    torch.testing.assert_close(target, ctraj.expert(info.expert).at(info.target, flat=True), rtol=0, atol=0)


def test_discrete_sampling_gives_integers_below_max_start(ctraj):
    rng = np.random.default_rng(0)
    cs = [ConvexifiedSource(ctraj).sample(rng, 4, 3, discrete=True)[2].start for _ in range(200)]
    assert set(cs) == {0.0, 1.0, 2.0, 3.0}  # MTT's np.random.randint(0, 4): the bound is excluded


def test_sampling_is_reproducible_from_the_generator(ctraj):
    src1, src2, src3 = (ConvexifiedSource(ctraj) for _ in range(3))  # each source walks its own experts
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    a = [src1.sample(rng1, 6, 2)[2] for _ in range(10)]
    b = [src2.sample(rng2, 6, 2)[2] for _ in range(10)]
    assert a == b
    assert a != [src3.sample(np.random.default_rng(8), 6, 2)[2] for _ in range(10)]


def test_samples_arrive_on_the_requested_dtype(ctraj):
    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(0), 3, 2, dtype=torch.float64)
    assert start.dtype == target.dtype == torch.float64


@pytest.mark.parametrize("max_start, m, discrete, problem", [
    (K, 2, False, "max_start_epoch"),
    (-1, 2, False, "max_start_epoch"),
    (3, 0, False, "expert_epochs"),
    (3, float("nan"), False, "expert_epochs"),
    (2.5, 2, True, "integer"),
])
def test_convexified_refuses_bad_windows(ctraj, max_start, m, discrete, problem):
    with pytest.raises(OutOfRangeError, match=problem) as err:
        ConvexifiedSource(ctraj).sample(np.random.default_rng(0), max_start, m, discrete=discrete)
    assert str(ctraj.path) in str(err.value)


def test_legacy_source_reads_only_start_and_target():
    trajs = [random_walk(num_timesteps=K + 1, seed=s) for s in range(2)]
    buf = TinyBuffer(trajs)
    src = LegacySource(buf)
    assert (src.num_experts, src.max_position) == (2, K)
    rng = np.random.default_rng(3)
    starts = set()
    for _ in range(100):
        buf.reads.clear()
        start, target, info = src.sample(rng, 5, 3)
        s = int(info.start)
        starts.add(s)
        assert info == SampleInfo(info.expert, float(s), float(s + 3))
        assert buf.reads == [(info.expert, s), (info.expert, s + 3)]
        assert torch.equal(start, _flat(trajs[info.expert][s]))
        assert torch.equal(target, _flat(trajs[info.expert][s + 3]))
    assert starts == {0, 1, 2, 3, 4}  # randint(0, max_start_epoch): upstream excludes the bound


def test_legacy_source_on_a_real_buffer_loads_one_file_per_sample(legacy_buffer, monkeypatch):
    """The real reader behind the source: files saved by torch.save, read back by trajstore.legacy. A
    sample needs one trajectory, so it loads at most one file, and only when the expert lives elsewhere."""
    from trajstore.legacy import loading, open_buffer

    directory, trajs = legacy_buffer  # 5 experts, 2 per file
    buf = open_buffer(directory)
    loads = []
    real_load = loading.load
    monkeypatch.setattr(loading, "load", lambda path, **kw: loads.append(path.name) or real_load(path, **kw))
    monkeypatch.setattr(buf, "trajectory", lambda i: pytest.fail("the source read a whole trajectory"))
    src = LegacySource(buf)
    rng = np.random.default_rng(5)
    current = "replay_buffer_0.pt"  # open_buffer keeps the first file loaded
    for _ in range(30):
        before = len(loads)
        start, target, info = src.sample(rng, 8, 2)
        s, f = int(info.start), f"replay_buffer_{info.expert // 2}.pt"
        assert loads[before:] == ([] if f == current else [f])
        current = f
        assert torch.equal(start, _flat(trajs[info.expert][s])) and torch.equal(target, _flat(trajs[info.expert][s + 2]))
    assert len(set(loads)) == 3


@pytest.mark.parametrize("max_start, m", [(5, 2.5), (0, 3), (9, 3), (5, 0)])
def test_legacy_source_refuses_bad_windows(max_start, m):
    with pytest.raises(OutOfRangeError, match="replay_buffer_0.pt"):
        LegacySource(TinyBuffer([random_walk(num_timesteps=K + 1)])).sample(np.random.default_rng(0), max_start, m)


def test_legacy_source_refuses_a_timestep_that_does_not_match_the_layers():
    traj = random_walk(num_timesteps=K + 1)
    traj = [ts[:-1] for ts in traj]  # one tensor short
    with pytest.raises(FormatError, match="shapes"):
        LegacySource(TinyBuffer([traj])).sample(np.random.default_rng(0), 3, 2)


def test_zca_agreement_passes(ctraj):
    check_zca(ctraj.training, True, ctraj.path)
    check_zca({}, False, "x.ctraj")  # not recorded: nothing to check


@pytest.mark.parametrize("recorded, run, words",
                         [(True, False, "trained with ZCA"), (False, True, "trained without ZCA")])
def test_zca_mismatch_is_refused(tmp_path, recorded, run, words):
    path = write_store(tmp_path / "z.ctraj", [random_walk(num_timesteps=6)], waypoints=(2,),
                       training={"zca": recorded})
    with pytest.raises(TrajstoreError, match=words) as err:
        check_zca(trajstore.open(path).training, run, path)
    assert str(path) in str(err.value)


def test_zca_metadata_of_the_wrong_type_is_a_format_error():
    with pytest.raises(FormatError, match="zca"):
        check_zca({"zca": "yes"}, True, "x.ctraj")
