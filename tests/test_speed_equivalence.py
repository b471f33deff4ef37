"""The fast paths give what the plain ones give: interpolation, batched evaluation and batched experts."""

import numpy as np
import pytest
import torch
from helpers import SMALL_LAYERS, random_walk, write_store

import spec_reader
import trajstore
from trajstore.format.beta import piece_weights


def _spec_lerp(x: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """docs/format.md §7, layer by layer, in numpy (tests/spec_reader.py): not torch.lerp, whose FMA differs."""
    return torch.from_numpy(spec_reader.lerp(x.numpy(), y.numpy(), w, "F32"))


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


# -- networks trained together ---------------------------------------------------------------------

from trajstore.distill.augment import seeded_dsa  # noqa: E402
from trajstore.distill.batched import NetGroup, NetStack, side_by_side  # noqa: E402
from trajstore.distill.data import load_dataset  # noqa: E402
from trajstore.distill.evaluate import evaluate_synset, random_subset  # noqa: E402
from trajstore.distill.networks import build  # noqa: E402
from trajstore.distill.train import train_epoch  # noqa: E402


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", im_size=(16, 16))


def _fresh(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build("ConvNetW8", 3, 10, (16, 16))


@pytest.mark.parametrize("make", [NetStack, lambda nets: NetGroup(nets, workers=2)], ids=["stacked", "side-by-side"])
def test_networks_trained_at_once_follow_the_trajectories_of_networks_trained_alone(digits16, make):
    images, labels = random_subset(digits16, 4, seed=0)  # 40 images, batch 16: 3 shuffled batches per epoch
    seeds = [11, 12, 13]
    alone, alone_stats = [], []
    for s in seeds:  # the plain loop, one network at a time
        net, g = _fresh(s), torch.Generator().manual_seed(s)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        alone_stats.append([train_epoch(net, images, labels, optimizer=opt, batch_size=16, augment=seeded_dsa(g),
                                        device="cpu", generator=g) for _ in range(3)][-1])
        alone.append(net)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stack = make([_fresh(s) for s in seeds])
    opt = torch.optim.SGD(stack.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        losses, accs = stack.train_epoch(images, labels, optimizer=opt, batch_size=16, generators=gens,
                                         augments=[seeded_dsa(g) for g in gens], device=torch.device("cpu"))
    moved = 0.0
    for k, net in enumerate(alone):
        for p_alone, p_stack, p_init in zip(net.parameters(), stack.network(k), _fresh(seeds[k]).parameters()):
            torch.testing.assert_close(p_stack.detach(), p_alone.detach(), rtol=1e-4, atol=1e-5)
            moved = max(moved, float((p_alone - p_init).detach().abs().max()))
        assert losses[k] == pytest.approx(alone_stats[k][0], rel=1e-4) and accs[k] == alone_stats[k][1]
    assert moved > 1e-2  # the networks did train


def test_evaluation_together_gives_the_accuracies_of_one_by_one(digits16):
    images, labels = random_subset(digits16, 1, seed=3)
    kw = dict(lr=0.01, num_nets=3, epochs=8, model="ConvNetW8", seed=5, progress=False)
    one_by_one = evaluate_synset(images, labels, digits16, together=False, **kw)
    together = evaluate_synset(images, labels, digits16, together=True, **kw)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU default: side by side on 2 workers (3 networks: uneven on purpose)
    try:
        side_by_side_ = evaluate_synset(images, labels, digits16, **kw)
    finally:
        torch.set_num_threads(before)
    step = 1 / len(digits16.test_labels)  # float rounding may flip at most a borderline test image
    assert np.allclose(together.accuracies, one_by_one.accuracies, atol=1.01 * step, rtol=0)
    assert np.allclose(side_by_side_.accuracies, one_by_one.accuracies, atol=1.01 * step, rtol=0)
    assert len(set(one_by_one.accuracies)) > 1  # each network its own draws


def test_side_by_side_runs_share_the_workers_and_keep_each_runs_order():
    import threading
    import time

    seen, threads = [], []

    def run(k, n):
        for i in range(n):
            time.sleep(0.002)
            seen.append(threading.current_thread().name)
            threads.append(torch.get_num_threads())
            yield (k, i)

    before = torch.get_num_threads()
    lengths = [5, 3, 6, 1, 4]
    got = list(side_by_side([run(k, n) for k, n in enumerate(lengths)], workers=2))
    assert torch.get_num_threads() == before
    assert sorted(got) == sorted((k, (k, i)) for k, n in enumerate(lengths) for i in range(n))
    for k, n in enumerate(lengths):  # each run's items in its own order
        assert [item for j, item in got if j == k] == [(k, i) for i in range(n)]
    assert len(set(seen)) == 2 and threading.current_thread().name not in seen
    assert set(threads) == {1}  # one intra-op thread per worker
    # round robin: the first items of every run come before the last item of the longest one
    assert max(got.index((k, (k, 0))) for k in range(5)) < got.index((2, (2, 5)))
    # one worker: the runs in turn on this thread, with torch's threads as they are
    assert list(side_by_side([run(0, 2), run(1, 1)], workers=1)) == [(0, (0, 0)), (0, (0, 1)), (1, (1, 0))]
    assert seen[-3:] == [threading.current_thread().name] * 3 and threads[-3:] == [before] * 3


def test_side_by_side_raises_the_first_error_and_stops():
    import time

    started = []

    def run(k):
        for i in range(1000):
            time.sleep(0.001)
            started.append(k)
            if k == 1 and i == 2:
                raise ValueError("run 1 failed")
            yield i

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="run 1 failed"):
        list(side_by_side([run(0), run(1)], workers=2))
    assert torch.get_num_threads() == before and len(started) < 200


# -- experts trained together ----------------------------------------------------------------------

from trajstore.distill.experts import train_experts  # noqa: E402


def test_experts_trained_together_are_the_experts_trained_alone(tmp_path, digits16):
    data = digits16.subset(200)
    kw = dict(dataset=data, model="ConvNetW8", epochs=2, batch_size=64, num_experts=3, progress=False,
              log=lambda _: None, seed=7)  # 4 shuffled batches per epoch
    alone = trajstore.open(train_experts(tmp_path / "alone.ctraj", **kw))
    together = trajstore.open(train_experts(tmp_path / "together.ctraj", batch_experts=2, legacy_dir=tmp_path / "legacy",
                                            **kw))  # groups {0, 1} and {2}
    twin = torch.load(tmp_path / "legacy" / "replay_buffer_0.pt", weights_only=True)
    assert together.expert_ids == alone.expert_ids == [0, 1, 2] and len(twin) == 3
    for i in range(3):
        a, t = alone.expert(i), together.expert(i)
        assert t.provenance["seed"] == a.provenance["seed"]
        for epoch in a.anchor_epochs:
            for name, value in a.anchor(epoch).items():
                torch.testing.assert_close(t.anchor(epoch)[name], value, rtol=1e-4, atol=1e-5)
        assert np.allclose(t.provenance["test_acc"], a.provenance["test_acc"], atol=0.011)
        torch.testing.assert_close(t.step_norms, a.step_norms, rtol=1e-3, atol=1e-6)
        last = together.num_timesteps - 1
        assert all(torch.equal(p, t.anchor(last)[n]) for p, n in zip(twin[i][last], t.anchor(last)))
    assert not torch.equal(together.expert(0).anchor(2)["classifier.bias"],
                           together.expert(1).anchor(2)["classifier.bias"])


# -- the matching step -----------------------------------------------------------------------------

from trajstore.distill.augment import dsa  # noqa: E402
from trajstore.distill.matching import MatchConfig, Matcher, SyntheticSet, match_loss, plan_unroll  # noqa: E402
from trajstore.distill.networks import FunctionalNet  # noqa: E402
from trajstore.distill.sources import ConvexifiedSource  # noqa: E402


class _Recording:
    """A trajectory source that keeps the last (start, target, info) it handed out."""

    def __init__(self, source):
        self.source, self.last = source, None

    def __getattr__(self, name):
        return getattr(self.source, name)

    def sample(self, *args, **kwargs):
        self.last = self.source.sample(*args, **kwargs)
        return self.last


def test_a_matching_step_is_sgd_on_the_full_backward_gradient(tmp_path, digits16, monkeypatch):
    import trajstore.distill.matching as matching

    net = _fresh(0).double()
    layers = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
    path = write_store(tmp_path / "m.ctraj", [random_walk(layers, seed=s) for s in range(2)], layers=layers,
                       waypoints=(4,))
    source = _Recording(ConvexifiedSource(trajstore.open(path)))
    plans = []
    monkeypatch.setattr(matching, "plan_unroll", lambda *a, **k: plans.append(plan_unroll(*a, **k)) or plans[-1])
    rng = np.random.default_rng(3)
    syn = SyntheticSet.from_real(digits16.train_images, digits16.train_labels, 1, 0.01, rng=rng, dtype=torch.float64)
    config = MatchConfig(syn_steps=3, expert_epochs=2, max_start_epoch=5, lr_img=100.0, lr_lr=1e-3)
    before_images, before_lr = syn.images.detach().clone(), syn.syn_lr.detach().clone()
    Matcher(source, syn, FunctionalNet(net), config, rng=rng, augment=dsa).step()
    # The reference: the same draws, loss.backward() through everything, one SGD step by hand
    # (momentum starts at zero, so the first step is lr * gradient).
    images = before_images.clone().requires_grad_(True)
    lr = before_lr.clone().requires_grad_(True)
    start, target, _ = source.last
    match_loss(FunctionalNet(net), images, syn.labels, lr, start, target, plans[-1], augment=dsa).backward()
    torch.testing.assert_close(syn.images.detach(), before_images - 100.0 * images.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(syn.syn_lr.detach(), before_lr - 1e-3 * lr.grad, rtol=1e-10, atol=1e-14)
    assert images.grad.abs().max() > 0
