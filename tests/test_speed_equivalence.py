"""The fast paths give what the plain ones give: interpolation, batched evaluation and batched experts."""

import numpy as np
import torch
from helpers import SMALL_LAYERS, random_walk, write_store

import trajstore
from trajstore.format.beta import piece_weights


def _spec_lerp(x: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """docs/format.md §7, layer by layer, as the reader computed it before its fast path."""
    return torch.lerp(x, y, w)


def test_list_weights_are_the_numpy_weights_bit_for_bit(tmp_path):
    path = write_store(tmp_path / "a.ctraj", [random_walk(seed=1)], waypoints=(3, 7))
    e = trajstore.open(path).expert(0)
    rows = e.beta.tolist()
    rng = np.random.default_rng(0)
    for c in [0, 3, 7, 10, 2.999999, 3.0000001, *rng.uniform(0, 10, 200)]:
        p_np, w_np = piece_weights(e.beta, e.anchor_epochs, c)
        p_list, w_list = piece_weights(rows, e.anchor_epochs, c)
        assert p_np == p_list and w_np.tolist() == w_list


def test_flat_points_with_reused_and_alternating_out_buffers(tmp_path):
    trajs = [random_walk(seed=s) for s in range(2)]
    path = write_store(tmp_path / "a.ctraj", trajs, waypoints=(3, 7))
    store = trajstore.open(path)
    bufs = [torch.empty(store.num_params) for _ in range(2)]
    for i, c in enumerate([0.5, 4.25, 7.0, 9.75, 3.0, 1.0]):
        e = store.expert(i % 2)
        got = e.at(c, flat=True, out=bufs[(i // 2) % 2])
        # An independent reference: each layer from the two stored anchors and the stored betas.
        piece = max(j for j, a in enumerate(e.anchor_epochs[:-1]) if a <= c)
        a, b = e.anchor_epochs[piece], e.anchor_epochs[piece + 1]
        lo, hi = int(np.floor(c)), int(np.ceil(c))
        eta = c - lo
        want = []
        for layer, (name, _) in enumerate(SMALL_LAYERS):
            beta_hi = 1.0 if hi == b else e.beta[hi, layer]
            w = (1 - eta) * e.beta[lo, layer] + eta * beta_hi
            want.append(_spec_lerp(trajs[i % 2][a][layer], trajs[i % 2][b][layer], float(w)).reshape(-1))
        assert torch.equal(got, torch.cat(want)), c
    for epoch in store.expert(0).anchor_epochs:  # exact at anchors, through the same reused buffer
        assert torch.equal(store.expert(0).at(epoch, flat=True, out=bufs[0]),
                           torch.cat([t.reshape(-1) for t in trajs[0][epoch]]))
