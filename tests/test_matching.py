"""The matching engine: Eq. 2 against a hand-made unroll, gradients, plain vs constant memory, reproducibility."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import trajstore
from trajstore.distill.matching import (MatchConfig, Matcher, SyntheticSet, UnrollStep, match_loss, plan_unroll)
from trajstore.distill.networks import FunctionalNet, build, flat_parameters
from trajstore.distill.sources import ConvexifiedSource, LegacySource
from trajstore import InvalidTensorError, OutOfRangeError, TrajstoreError

NUM_CLASSES = 10
K = 8


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("ConvNetW8", channel=1, num_classes=NUM_CLASSES, im_size=(8, 8)).double()


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    images = torch.from_numpy(d.images / 16.0).unsqueeze(1)
    return images, torch.from_numpy(d.target)


def synset(digits, seed=0, ipc=1, dtype=torch.float64) -> SyntheticSet:
    return SyntheticSet.from_real(*digits, ipc=ipc, lr_teacher=0.01, rng=np.random.default_rng(seed), dtype=dtype)


def expert_trajectory(net, seed: int):
    """A trajectory that starts at the network's initialisation and drifts, as training would."""
    g = torch.Generator().manual_seed(seed)
    params = [p.detach().float().clone() for p in net.parameters()]
    drift = [0.02 * torch.randn(p.shape, generator=g) for p in params]
    traj = []
    for _ in range(K + 1):
        traj.append([p.clone() for p in params])
        params = [p + d + 0.005 * torch.randn(p.shape, generator=g) for p, d in zip(params, drift)]
    return traj


@pytest.fixture(scope="module")
def trajectories():
    return [expert_trajectory(tiny_net(s), s) for s in range(2)]


@pytest.fixture(scope="module")
def ctraj(tmp_path_factory, trajectories):
    net = tiny_net()
    path = tmp_path_factory.mktemp("match") / "tiny.ctraj"
    layers = [(name, tuple(p.shape)) for name, p in net.named_parameters()]  # stored as float32, as experts are
    with trajstore.create(path, layers, K + 1, waypoints=(3,), training={"zca": False}) as w:
        for traj in trajectories:
            w.write_expert(traj)
    return trajstore.open(path)


def replayable_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Random flip, brightness and shift, decided by the seed alone (the contract of distill.augment.dsa)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    scale = 1 + 0.4 * (torch.rand(x.shape[0], 1, 1, 1, generator=g, dtype=x.dtype) - 0.5)
    shift = int(torch.randint(-1, 2, (1,), generator=g))
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return torch.roll(x * scale, shift, dims=-2)


def hand_unroll_loss(net, images, labels, lr, start, target, plan) -> float:
    """Eq. 2 with the student trained the plain nn.Module way, independently of FunctionalNet."""
    net = copy.deepcopy(net)
    theta = start.clone()
    for step in plan:
        torch.nn.utils.vector_to_parameters(theta, net.parameters())
        net.zero_grad()
        F.cross_entropy(net(images[step.indices]), labels[step.indices]).backward()
        theta = theta - lr * torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    n = theta.numel()  # upstream's /num_params factors, to show they cancel
    return float((F.mse_loss(theta, target, reduction="sum") / n) / (F.mse_loss(start, target, reduction="sum") / n))


def test_plan_chunks_permutations_as_upstream():
    plan = plan_unroll(np.random.default_rng(5), 10, 4, 7)
    ref = np.random.default_rng(5)
    perm = torch.from_numpy(ref.permutation(10))
    chunks = list(torch.split(perm, 4))
    assert [len(s.indices) for s in plan] == [2, 4, 4, 2, 4, 4, 2]
    assert torch.equal(plan[0].indices, chunks[2])  # upstream pops the last chunk first
    assert torch.equal(plan[1].indices, chunks[1]) and torch.equal(plan[2].indices, chunks[0])
    assert sorted(torch.cat([s.indices for s in plan[3:6]]).tolist()) == list(range(10))  # a fresh permutation
    assert len({s.seed for s in plan}) == 7


def test_loss_at_step_zero_equals_eq2_by_hand(ctraj, digits):
    net = tiny_net()
    cfg = MatchConfig(syn_steps=4, expert_epochs=2.5, max_start_epoch=4, batch_syn=4)
    s = synset(digits)
    images, lr = s.images.detach().clone(), s.syn_lr.item()
    matcher = Matcher(ConvexifiedSource(ctraj), s, FunctionalNet(net), cfg, rng=np.random.default_rng(11))
    record = matcher.step()

    rng = np.random.default_rng(11)  # replay the iteration's draws
    start, target, info = ConvexifiedSource(ctraj).sample(rng, 4, 2.5, dtype=torch.float64)
    plan = plan_unroll(rng, len(s), 4, 4)
    assert (record.iteration, record.expert, record.start, record.target) == (0, info.expert, info.start,
                                                                              info.target)
    expected = hand_unroll_loss(net, images, s.labels, lr, start, target, plan)
    assert record.loss == pytest.approx(expected, rel=1e-10)
    assert 0 < record.loss < 10 and record.seconds > 0


@pytest.mark.parametrize("memory", ["plain", "constant"])
def test_gradients_reach_images_and_lr(ctraj, digits, memory):
    net = tiny_net()
    s = synset(digits)
    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(0), 4, 2, dtype=torch.float64)
    plan = plan_unroll(np.random.default_rng(0), len(s), 4, 5)
    match_loss(FunctionalNet(net), s.images, s.labels, s.syn_lr, start, target, plan,
               augment=replayable_augment, memory=memory).backward()
    for grad in (s.images.grad, s.syn_lr.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (s.images.grad.flatten(1).abs().sum(1) > 0).all()  # every image was in some minibatch


@pytest.mark.parametrize("augment", [None, replayable_augment, "dsa"], ids=["no-augment", "augment", "dsa"])
def test_constant_memory_gradients_equal_plain_gradients(ctraj, digits, augment):
    if augment == "dsa":
        from trajstore.distill.augment import dsa as augment  # the augmentation real runs use
    net = tiny_net()
    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(2), 4, 3, dtype=torch.float64)
    plan = plan_unroll(np.random.default_rng(2), NUM_CLASSES, 4, 6)
    results = {}
    for memory in ("plain", "constant"):
        s = synset(digits)
        with torch.no_grad():
            s.syn_lr.fill_(0.05)  # large enough that second-order terms matter
        loss = match_loss(FunctionalNet(net), s.images, s.labels, s.syn_lr, start, target, plan, augment=augment,
                          memory=memory)
        loss.backward()
        results[memory] = (loss.detach(), s.images.grad, s.syn_lr.grad)
    (lp, gp, rp), (lc, gc, rc) = results["plain"], results["constant"]
    torch.testing.assert_close(lc, lp, rtol=1e-12, atol=0)
    torch.testing.assert_close(gc, gp, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(rc, rp, rtol=1e-8, atol=1e-14)


def test_constant_memory_drops_second_order_terms_nowhere(ctraj, digits):
    """Guard against the TESLA shortcut (treating each step's theta as fixed): that would differ from plain."""
    net = tiny_net()
    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(2), 4, 3, dtype=torch.float64)
    plan = plan_unroll(np.random.default_rng(2), NUM_CLASSES, 4, 6)
    grads = {}
    for memory in ("plain", "constant"):
        s = synset(digits)
        with torch.no_grad():
            s.syn_lr.fill_(0.05)
        match_loss(FunctionalNet(net), s.images, s.labels, s.syn_lr, start, target, plan, memory=memory).backward()
        grads[memory] = s.images.grad
    first_order = torch.zeros_like(s.images)
    # dL/dX with theta_i held fixed at the plain unroll's values: the approximation the exact mode must beat
    theta = start.clone()
    thetas = []
    student = FunctionalNet(net)
    for step in plan:
        thetas.append(theta)
        p = theta.clone().requires_grad_(True)
        ce = F.cross_entropy(student(p, s.images.detach()[step.indices]), s.labels[step.indices])
        theta = theta - 0.05 * torch.autograd.grad(ce, p)[0]
    adjoint = 2 * (theta - target) / (start - target).square().sum()
    for th, step in zip(thetas, plan):
        p = th.clone().requires_grad_(True)
        x = s.images.detach()[step.indices].requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(student(p, x), s.labels[step.indices]), p, create_graph=True)[0]
        first_order.index_add_(0, step.indices, -0.05 * torch.autograd.grad(g, x, grad_outputs=adjoint)[0])
    # the shortcut is measurably different here, and the constant mode is not it: it equals the plain unroll
    assert not torch.allclose(first_order, grads["plain"], rtol=1e-3, atol=0)
    torch.testing.assert_close(grads["constant"], grads["plain"], rtol=1e-8, atol=1e-14)


class SavedActivations:
    """Peak bytes of tensors autograd keeps for backward, while they are alive."""

    class _Box:
        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self):
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def pack(self, tensor):
        box = self._Box(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, nbytes)
        return box

    @staticmethod
    def unpack(box):
        return box.tensor


def _saved_peak(ctraj, digits, memory, syn_steps) -> int:
    net = tiny_net()
    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(0), 4, 2, dtype=torch.float64)
    plan = plan_unroll(np.random.default_rng(0), NUM_CLASSES, NUM_CLASSES, syn_steps)
    s = synset(digits)
    meter = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, SavedActivations.unpack):
        match_loss(FunctionalNet(net), s.images, s.labels, s.syn_lr, start, target, plan, memory=memory).backward()
    return meter.peak


def test_constant_memory_keeps_activations_independent_of_n(ctraj, digits):
    constant = [_saved_peak(ctraj, digits, "constant", n) for n in (2, 8)]
    plain = [_saved_peak(ctraj, digits, "plain", n) for n in (2, 8)]
    assert constant[0] == constant[1] > 0
    assert plain[1] > 3 * plain[0]
    assert plain[1] > 3 * constant[1]


def _matcher(source, digits, seed, memory="plain", **cfg) -> Matcher:
    config = MatchConfig(**{"syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 4, "batch_syn": 4,
                            "lr_img": 10.0, "lr_lr": 1e-4, "memory": memory, **cfg})
    return Matcher(source, synset(digits), FunctionalNet(tiny_net()), config, rng=np.random.default_rng(seed),
                   augment=replayable_augment)


def _run(matcher, steps):
    return [{k: v for k, v in r.to_json().items() if k != "seconds"} for r in (matcher.step() for _ in range(steps))]


def test_a_step_updates_images_and_lr(ctraj, digits):
    m = _matcher(ConvexifiedSource(ctraj), digits, 0)
    before, lr = m.synset.images.detach().clone(), m.synset.syn_lr.item()
    records = [m.step(), m.step()]
    assert [r.iteration for r in records] == [0, 1] and m.iteration == 2
    assert not torch.equal(m.synset.images, before)
    assert m.synset.syn_lr.item() != lr and records[-1].syn_lr == m.synset.syn_lr.item()
    assert all(0 <= r.start <= 4 and r.target == pytest.approx(r.start + 2) for r in records)


def test_same_seed_gives_the_same_iterations(ctraj, digits):
    a, b = _matcher(ConvexifiedSource(ctraj), digits, 4), _matcher(ConvexifiedSource(ctraj), digits, 4)
    assert _run(a, 3) == _run(b, 3)
    assert torch.equal(a.synset.images, b.synset.images) and torch.equal(a.synset.syn_lr, b.synset.syn_lr)
    assert _run(_matcher(ConvexifiedSource(ctraj), digits, 5), 3) != _run(
        _matcher(ConvexifiedSource(ctraj), digits, 4), 3)


def test_plain_and_constant_runs_agree(ctraj, digits):
    plain, constant = (_matcher(ConvexifiedSource(ctraj), digits, 6, memory) for memory in ("plain", "constant"))
    rp, rc = _run(plain, 2), _run(constant, 2)
    assert [r["start"] for r in rp] == [r["start"] for r in rc]
    assert [r["loss"] for r in rc] == pytest.approx([r["loss"] for r in rp], rel=1e-9)
    torch.testing.assert_close(constant.synset.images, plain.synset.images, rtol=1e-9, atol=1e-12)


def test_state_dict_resumes_exactly(ctraj, digits):
    whole = _matcher(ConvexifiedSource(ctraj), digits, 8)
    expected = _run(whole, 4)
    first = _matcher(ConvexifiedSource(ctraj), digits, 8)
    head = _run(first, 2)
    state = copy.deepcopy(first.state_dict())
    resumed = _matcher(ConvexifiedSource(ctraj), digits, 99)  # different seed and initial set: all restored
    resumed.load_state_dict(state)
    assert head + _run(resumed, 2) == expected
    assert torch.equal(resumed.synset.images, whole.synset.images)


def test_classic_mtt_runs_on_a_legacy_buffer(digits, trajectories):
    class Buffer:
        num_experts, num_timesteps = len(trajectories), K + 1
        layers = trajstore.layer_table(tiny_net())

        @staticmethod
        def timestep(i, t):
            return trajectories[i][t]

    m = _matcher(LegacySource(Buffer()), digits, 0, discrete=True)
    records = [m.step() for _ in range(3)]
    assert all(r.start == int(r.start) and r.target == r.start + 2 and np.isfinite(r.loss) for r in records)


def test_a_diverged_loss_is_refused_and_leaves_the_set_untouched(ctraj, digits):
    m = _matcher(ConvexifiedSource(ctraj), digits, 0)
    with torch.no_grad():
        m.synset.syn_lr.fill_(float("inf"))
    before = m.synset.images.detach().clone()
    with pytest.raises(TrajstoreError, match="diverged"):
        m.step()
    assert torch.equal(m.synset.images, before) and m.iteration == 0


def test_real_initialisation_picks_distinct_images_of_each_class(digits):
    images, labels = digits
    s = synset(digits, seed=3, ipc=4)
    assert s.labels.tolist() == [c for c in range(NUM_CLASSES) for _ in range(4)]
    assert s.syn_lr.item() == pytest.approx(0.01) and s.syn_lr.requires_grad and s.images.requires_grad
    flat_pool = images.flatten(1)
    for img, label in zip(s.images.detach(), s.labels):
        match = (flat_pool == img.flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and (labels[match] == label).all()
    assert len({tuple(img.flatten().tolist()) for img in s.images.detach()}) == len(s)
    assert torch.equal(synset(digits, seed=3, ipc=4).images, s.images)


def test_noise_initialisation():
    s = SyntheticSet.from_noise((3, 4, 4), 5, 2, 0.02, rng=np.random.default_rng(0))
    assert s.images.shape == (10, 3, 4, 4) and s.images.dtype == torch.float32
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert abs(s.images.mean().item()) < 0.3 and 0.7 < s.images.std().item() < 1.3


def test_too_few_real_images_is_refused(digits):
    images, labels = digits
    keep = (labels != 7) | (torch.arange(len(labels)) < 300)  # class 7 keeps only a handful
    with pytest.raises(TrajstoreError, match="class 7"):
        SyntheticSet.from_real(images[keep], labels[keep], ipc=50, lr_teacher=0.01, rng=np.random.default_rng(0))


def test_bad_arguments_are_refused(digits):
    net = tiny_net()
    student = FunctionalNet(net)
    s = synset(digits)
    start = flat_parameters(net)
    plan = [UnrollStep(torch.arange(4), 0)]
    with pytest.raises(TrajstoreError, match="memory"):
        match_loss(student, s.images, s.labels, s.syn_lr, start, start + 1, plan, memory="first-order")
    with pytest.raises(InvalidTensorError, match="start"):
        match_loss(student, s.images, s.labels, s.syn_lr, start[:-1], start, plan)
    with pytest.raises(TrajstoreError, match="coincide"):
        match_loss(student, s.images, s.labels, s.syn_lr, start, start.clone(), plan)
    with pytest.raises(OutOfRangeError):
        match_loss(student, s.images, s.labels, s.syn_lr, start, start + 1, [])
    with pytest.raises(TrajstoreError, match="memory"):
        MatchConfig(memory="low")
    with pytest.raises(OutOfRangeError):
        MatchConfig(syn_steps=0)
    with pytest.raises(InvalidTensorError):
        SyntheticSet(torch.full((2, 1, 4, 4), float("nan")), torch.zeros(2), 0.01)


def test_the_matcher_samples_as_configured(ctraj, digits):
    continuous = _run(_matcher(ConvexifiedSource(ctraj), digits, 1, syn_steps=1), 4)
    discrete = _run(_matcher(ConvexifiedSource(ctraj), digits, 1, syn_steps=1, discrete=True), 4)
    assert all(r["start"] != int(r["start"]) for r in continuous)
    assert all(r["start"] == int(r["start"]) for r in discrete)


def reference_instance_norm(y, weight, bias, eps=1e-5):
    """Instance norm written out with autograd's own derivatives: (y - mean) / sqrt(biased var + eps)."""
    mean = y.mean((2, 3), keepdim=True)
    var = (y - mean).square().mean((2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _second_derivatives(f, inputs, seed):
    """The gradient of a random linear functional of f's first derivatives (what the matching loss needs)."""
    g = torch.Generator().manual_seed(seed)
    out = f(*inputs)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    first = torch.autograd.grad(out, inputs, grad_outputs=upstream, create_graph=True)
    functional = sum((torch.randn(d.shape, generator=g, dtype=d.dtype) * d).sum() for d in first)
    return [d.detach() for d in first], torch.autograd.grad(functional, inputs)


def test_student_instance_norm_and_pooling_second_derivatives_equal_autograds():
    from trajstore.distill.networks.student_ops import avg_pool2, instance_norm

    torch.manual_seed(0)
    y = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    inputs = (y, weight, bias)
    # forward equals the module's; first and second derivatives equal autograd's through the written-out norm
    torch.testing.assert_close(instance_norm(y, weight, bias, 1e-5), F.group_norm(y, 4, weight, bias, 1e-5),
                               rtol=0, atol=1e-14)
    fast = _second_derivatives(lambda *a: torch.relu(instance_norm(*a, 1e-5)), inputs, 1)
    ref = _second_derivatives(lambda *a: torch.relu(reference_instance_norm(*a)), inputs, 1)
    for got, want in zip(fast[0] + list(fast[1]), ref[0] + list(ref[1])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(avg_pool2(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)
    fast = _second_derivatives(lambda x: avg_pool2(x).square(), (x,), 2)
    ref = _second_derivatives(lambda x: F.avg_pool2d(x, 2).square(), (x,), 2)
    torch.testing.assert_close(fast[0][0], ref[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast[1][0], ref[1][0], rtol=1e-12, atol=1e-14)


def test_fast_student_gives_the_module_students_loss_and_gradients(ctraj, digits):
    """Plain-memory Eq. 2 through the default ConvNet's fast student (student_ops) against the same unroll
    through torch.func.functional_call of the nn.Module (PyTorch's own double backward)."""
    from torch.func import functional_call

    net = tiny_net()
    fast = FunctionalNet(net)
    assert fast._forward is not None  # instance norm, ReLU, average pooling: the fast path

    class ModuleStudent(FunctionalNet):
        def __call__(self, flat, x):
            return functional_call(self.net, self.unflatten(flat), (x,))

    start, target, _ = ConvexifiedSource(ctraj).sample(np.random.default_rng(3), 4, 3, dtype=torch.float64)
    plan = plan_unroll(np.random.default_rng(3), NUM_CLASSES, 4, 5)
    results = []
    for student in (fast, ModuleStudent(net)):
        s = synset(digits)
        with torch.no_grad():
            s.syn_lr.fill_(0.05)
        loss = match_loss(student, s.images, s.labels, s.syn_lr, start, target, plan, augment=replayable_augment)
        results.append((loss.detach(), *torch.autograd.grad(loss, (s.images, s.syn_lr))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)
