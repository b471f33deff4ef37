"""Property tests over random layer shapes, trajectory lengths and anchor sets."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec_reader
import trajstore
from trajstore.format.beta import piece_weights


@st.composite
def layouts(draw):
    num_layers = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))) for _ in range(num_layers)]
    num_timesteps = draw(st.integers(2, 12))
    inner = draw(st.sets(st.integers(1, num_timesteps - 2), max_size=3)) if num_timesteps > 2 else set()
    return [(f"layer{i}", s) for i, s in enumerate(shapes)], num_timesteps, tuple(sorted(inner))


@st.composite
def norms_and_anchors(draw):
    K = draw(st.integers(1, 30))
    L = draw(st.integers(1, 5))
    norms = np.array(draw(st.lists(st.floats(0, 10), min_size=K * L, max_size=K * L))).reshape(K, L)
    inner = draw(st.sets(st.integers(1, K - 1), max_size=4)) if K > 1 else set()
    return norms, (0, *sorted(inner), K)


@given(norms_and_anchors())
def test_beta_is_monotone_and_normalised_per_piece(case):
    norms, epochs = case
    beta = trajstore.beta_from_norms(norms, epochs)
    assert beta.shape == (norms.shape[0] + 1, norms.shape[1])
    for a, b in zip(epochs, epochs[1:]):
        piece = np.vstack([beta[a:b], np.ones((1, beta.shape[1]))])
        assert np.all(piece[0] == 0) and np.all(np.diff(piece, axis=0) >= -1e-15)
        assert np.all((piece >= 0) & (piece <= 1))


@given(norms_and_anchors(), st.floats(0, 1))
def test_weights_stay_in_unit_interval(case, frac):
    norms, epochs = case
    beta = trajstore.beta_from_norms(norms, epochs)
    c = frac * epochs[-1]
    piece, w = piece_weights(beta, epochs, c)
    assert epochs[piece] <= c <= epochs[piece + 1]
    assert np.all((w >= 0) & (w <= 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layouts(), st.integers(0, 2**31 - 1), st.floats(0, 1))
def test_round_trip_and_interpolation(tmp_path_factory, layout, seed, frac):
    layers, T, inner = layout
    g = torch.Generator().manual_seed(seed)
    traj = [[torch.randn(s, generator=g) for _, s in layers] for _ in range(T)]
    path = tmp_path_factory.mktemp("p") / "x.ctraj"
    with trajstore.create(path, layers, T, waypoints=inner) as w:
        w.write_expert(traj)
    e = trajstore.open(path).expert(0)
    for epoch in e.anchor_epochs:
        assert all(torch.equal(e.anchor(epoch)[n], traj[epoch][i]) for i, (n, _) in enumerate(layers))
        assert all(torch.equal(e.at(epoch)[n], traj[epoch][i]) for i, (n, _) in enumerate(layers))
    # the reference: §5 betas from the trajectory and §7 in numpy (tests/spec_reader.py), nothing of trajstore
    beta = spec_reader.trajectory_betas(traj, e.anchor_epochs)
    epochs = list(e.anchor_epochs)
    for c in [frac * (T - 1), *(b - 0.5 for b in epochs[1:])]:  # and the last half step of every piece
        piece, w = spec_reader.weights(beta, epochs, c)
        a, b = epochs[piece], epochs[piece + 1]
        point = e.at(c)
        for i, (n, _) in enumerate(layers):
            want = spec_reader.lerp(traj[a][i].numpy(), traj[b][i].numpy(), float(w[i]), "F32")
            np.testing.assert_allclose(point[n].numpy(), want, rtol=1e-6, atol=1e-7)
        lo = torch.minimum(traj[a][i], traj[b][i]) - 1e-5
        hi = torch.maximum(traj[a][i], traj[b][i]) + 1e-5
        assert bool(((point[n] >= lo) & (point[n] <= hi)).all())  # convex: between the two anchors
