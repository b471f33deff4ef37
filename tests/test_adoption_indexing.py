"""A .ctraj indexed the way MTT-family code indexes its buffers: `len(buffer)`, `buffer[i]`, slices and
iteration over experts, `len(traj)` timesteps, `traj[t]` a list of tensors in parameter order."""

import os
import random

import numpy as np
import pytest
import torch

import trajstore
from helpers import SMALL_LAYERS, random_walk, write_store
from trajstore.tools.export import export_mtt

ANCHORS = (0, 4, 10)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 5-expert store (anchors 0, 4, 10 of 11 timesteps) and the trajectories it was made from."""
    root = tmp_path_factory.mktemp("indexing")
    trajs = [random_walk(num_timesteps=11, seed=s) for s in range(5)]
    return write_store(root / "e.ctraj", trajs, anchor_epochs=ANCHORS), trajs


def convexified(traj, t: int) -> list[torch.Tensor]:
    """MCT Eq. 10 written out: theta_l(t) = theta_l(a) + beta_l(t) (theta_l(b) - theta_l(a)) on the piece
    [a, b] holding t, beta_l(t) = path length of layer l from a to t over that from a to b."""
    a = max(e for e in ANCHORS if e <= t)
    b = min(e for e in ANCHORS if e > t) if t < ANCHORS[-1] else t
    out = []
    for l in range(len(SMALL_LAYERS)):
        steps = [float((traj[k + 1][l].double() - traj[k][l].double()).norm()) for k in range(a, b)]
        beta = sum(steps[: t - a]) / sum(steps) if steps else 0.0
        out.append(traj[a][l] + beta * (traj[b][l] - traj[a][l]))
    return out


def test_store_is_a_sequence_of_experts(made):
    path, trajs = made
    store = trajstore.open(path)
    assert len(store) == 5
    assert [e.position for e in store] == [0, 1, 2, 3, 4]
    assert store[-1].position == 4 and store[np.int64(2)].position == 2
    assert [e.position for e in store[1:4]] == [1, 2, 3] and [e.position for e in store[::-2]] == [4, 2, 0]
    assert store[7:] == []


def test_expert_is_a_sequence_of_timesteps_in_parameter_order(made):
    path, trajs = made
    store = trajstore.open(path)
    expert = store[3]
    assert len(expert) == 11
    for t in range(11):
        step = expert[t]
        assert type(step) is list and [tuple(p.shape) for p in step] == [s for _, s in SMALL_LAYERS]
        for got, want in zip(step, convexified(trajs[3], t)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if t in ANCHORS:  # anchors are the stored checkpoints, bit for bit
            assert all(torch.equal(got, want) for got, want in zip(step, trajs[3][t]))
    assert all(torch.equal(a, b) for a, b in zip(expert[-1], expert[10]))
    assert [len(s) for s in expert[2:5]] == [4, 4, 4] and len(list(expert)) == 11


@pytest.mark.parametrize("index, error", [(11, trajstore.OutOfRangeError), (-12, trajstore.OutOfRangeError),
                                          (2.5, trajstore.IndexTypeError), ("3", trajstore.IndexTypeError),
                                          (True, trajstore.IndexTypeError), (None, trajstore.IndexTypeError)])
def test_bad_timestep_and_expert_indices(made, index, error):
    store = trajstore.open(made[0])
    with pytest.raises(error, match="e.ctraj"):
        store[0][index]
    store_index = {11: 5, -12: -6}.get(index, index)
    with pytest.raises(error, match="e.ctraj"):
        store[store_index]
    # list-compatible: an IndexError ends a for loop, a TypeError is what a list raises for 2.5
    assert issubclass(trajstore.OutOfRangeError, IndexError) and issubclass(trajstore.IndexTypeError, TypeError)
    assert issubclass(error, trajstore.TrajstoreError)


def mtt_iterations(buffer, iterations: int, max_start_epoch: int, expert_epochs: int, seed: int):
    """Upstream MTT distill.py's sampling and flattening, line for line (one file, no --load_all): walk the
    shuffled trajectories, start_epoch = np.random.randint(0, max_start_epoch), target expert_epochs later,
    each timestep flattened with torch.cat([p.data.to(device).reshape(-1) for p in params], 0)."""
    random.seed(seed)
    np.random.seed(seed)
    device = "cpu"
    random.shuffle(buffer)
    expert_idx = 0
    pairs = []
    for _ in range(iterations):
        expert_trajectory = buffer[expert_idx]
        expert_idx += 1
        if expert_idx == len(buffer):
            expert_idx = 0
            random.shuffle(buffer)
        start_epoch = np.random.randint(0, max_start_epoch)
        starting_params = expert_trajectory[start_epoch]
        target_params = expert_trajectory[start_epoch + expert_epochs]
        target_params = torch.cat([p.data.to(device).reshape(-1) for p in target_params], 0)
        starting_params = torch.cat([p.data.to(device).reshape(-1) for p in starting_params], 0)
        pairs.append((starting_params, target_params))
    return pairs


def test_upstream_mtt_sampling_reads_a_ctraj_like_the_exported_buffer(made, tmp_path):
    path, _ = made
    expert_dir = tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    export_mtt(path, expert_dir, per_file=10, progress=False)
    assert os.path.exists(os.path.join(expert_dir, "replay_buffer_{}.pt".format(0)))
    legacy = torch.load(os.path.join(expert_dir, "replay_buffer_{}.pt".format(0)), weights_only=True)
    ctraj = trajstore.open(path)[:]  # docs/integrations.md: the one line that replaces torch.load
    from_legacy = mtt_iterations(legacy, 40, max_start_epoch=7, expert_epochs=3, seed=1)
    from_ctraj = mtt_iterations(ctraj, 40, max_start_epoch=7, expert_epochs=3, seed=1)
    assert len({float(s.sum()) for s, _ in from_ctraj}) > 5  # many different (expert, start) pairs were drawn
    for (s1, t1), (s2, t2) in zip(from_legacy, from_ctraj):
        assert torch.equal(s1, s2) and torch.equal(t1, t2)
