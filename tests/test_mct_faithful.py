"""MCT as its authors run it: the first-order ("tesla") update rule, the expert walk and discrete starts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call

from trajstore.distill.matching import MatchConfig, Matcher, SyntheticSet, match_loss, plan_unroll
from trajstore.distill.networks import FunctionalNet, build
from trajstore.distill.sources import ConvexifiedSource, ExpertWalk, LegacySource
from trajstore import OutOfRangeError, TrajstoreError
from trajstore.tools.threads import single_threaded

NUM_CLASSES = 10


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("ConvNetW8", channel=1, num_classes=NUM_CLASSES, im_size=(8, 8)).double()


@pytest.fixture(autouse=True)
def one_thread():
    with single_threaded():  # tiny networks: a second thread only waits on the busy CI machine
        yield


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.from_numpy(d.images / 16.0).unsqueeze(1), torch.from_numpy(d.target)


def shifted_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A differentiable augmentation decided by the seed alone (flip and brightness)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    scale = 1 + 0.4 * (torch.rand(x.shape[0], 1, 1, 1, generator=g, dtype=x.dtype) - 0.5)
    return torch.where(flip[:, None, None, None], x.flip(-1), x) * scale


def problem(digits, *, ipc=2, drift=0.05, seed=0):
    """A synthetic set, a start (the net's init) and a target that lies `drift` away in a random direction."""
    net = tiny_net(seed)
    s = SyntheticSet.from_real(*digits, ipc=ipc, lr_teacher=0.01, rng=np.random.default_rng(seed), dtype=torch.float64)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    g = torch.Generator().manual_seed(seed + 1)
    target = start + drift * torch.randn(start.shape, generator=g, dtype=torch.float64)
    return net, s, start, target


def reference_first_order(net, images, labels, lr, start, target, plan, augment):
    """The MCT code's rule written out as its distill_compressed.py does it, with torch.func on a plain
    nn.Module: unroll with detached gradients summed into G, then for every step
    dL/dx_i = 2 d[(lr (target - start) + lr^2 G) . g_i / D] / dx_i, and dL/dlr from ||start - lr G - target||^2 / D."""
    net = copy.deepcopy(net)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]

    def logits(theta, x):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            params[name] = theta[offset:offset + n].view(shape)
            offset += n
        return functional_call(net, params, (x,))

    student = [start.clone().requires_grad_(True)]
    total = torch.zeros_like(start)
    originals, augmented = [], []
    for step in plan:
        x0 = images.detach()[step.indices].clone().requires_grad_(True)
        x = augment(x0, step.seed) if augment else x0
        ce = F.cross_entropy(logits(student[-1], x), labels[step.indices])
        g = torch.autograd.grad(ce, student[-1], create_graph=True)[0].detach()
        student.append(student[-1] - lr * g)
        total += g
        originals.append(x0)
        augmented.append(x)
    dist = F.mse_loss(start, target, reduction="sum")
    grad_images = torch.zeros_like(images)
    for i, step in enumerate(plan):
        ce = F.cross_entropy(logits(student[i], augmented[i]), labels[step.indices])
        g_i = torch.autograd.grad(ce, student[i], create_graph=True)[0]
        single, square = lr * (target - start), lr ** 2 * total
        grad_images[step.indices] += 2 * torch.autograd.grad((single + square) @ g_i / dist, originals[i])[0]
    lr_t = torch.tensor(lr, dtype=torch.float64, requires_grad=True)
    grand = start - lr_t * total - target
    loss = grand.dot(grand) / dist
    (grad_lr,) = torch.autograd.grad(loss, lr_t)
    return loss.item(), grad_images, grad_lr.item()


def gradients(net, s, start, target, plan, memory, augment=None):
    images = s.images.detach().clone().requires_grad_(True)
    lr = s.syn_lr.detach().clone().requires_grad_(True)
    loss = match_loss(FunctionalNet(copy.deepcopy(net)), images, s.labels, lr, start, target, plan, augment=augment,
                      memory=memory)
    loss.backward()
    return loss.item(), images.grad, lr.grad.item()


@pytest.mark.parametrize("batch_syn, augment", [(None, None), (7, shifted_augment)])
def test_tesla_equals_the_mct_codes_rule_written_out(digits, batch_syn, augment):
    net, s, start, target = problem(digits)
    plan = plan_unroll(np.random.default_rng(3), len(s), batch_syn or len(s), 6)
    loss, g_img, g_lr = gradients(net, s, start, target, plan, "tesla", augment)
    ref_loss, ref_img, ref_lr = reference_first_order(net, s.images, s.labels, s.syn_lr.item(), start, target, plan,
                                                      augment)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(g_img, ref_img, rtol=1e-9, atol=1e-14)
    assert g_lr == pytest.approx(ref_lr, rel=1e-9)
    assert g_img.abs().sum() > 0 and g_lr != 0


def test_tesla_is_exact_for_one_step_and_differs_when_hessian_terms_matter(digits):
    net, s, start, target = problem(digits)
    one = plan_unroll(np.random.default_rng(1), len(s), len(s), 1)
    _, tesla_img, tesla_lr = gradients(net, s, start, target, one, "tesla")
    _, exact_img, exact_lr = gradients(net, s, start, target, one, "plain")
    torch.testing.assert_close(tesla_img, exact_img, rtol=1e-9, atol=1e-14)  # N = 1: no later step to differentiate
    assert tesla_lr == pytest.approx(exact_lr, rel=1e-9)

    with torch.no_grad():
        s.syn_lr.fill_(1.0)  # big steps: the student's Hessian reshapes every later step
    many = plan_unroll(np.random.default_rng(1), len(s), len(s), 12)
    loss_t, tesla_img, tesla_lr = gradients(net, s, start, target, many, "tesla")
    loss_e, exact_img, exact_lr = gradients(net, s, start, target, many, "plain")
    _, constant_img, _ = gradients(net, s, start, target, many, "constant")
    assert loss_t == pytest.approx(loss_e, rel=1e-9)  # same loss, different gradients
    torch.testing.assert_close(constant_img, exact_img, rtol=1e-7, atol=1e-12)
    cosine = F.cosine_similarity(tesla_img.reshape(1, -1), exact_img.reshape(1, -1)).item()
    assert cosine < 0.95, cosine
    assert abs(tesla_lr - exact_lr) > 0.01 * abs(exact_lr)


class SavedBytes:
    """Peak bytes of tensors autograd keeps for a backward pass, tracked through saved-tensor hooks
    (works on any device): the memory that grows with N when the whole unroll is kept."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        meter, nbytes = self, t.numel() * t.element_size()
        meter.live += nbytes
        meter.peak = max(meter.peak, meter.live)

        class Held:
            def __init__(self):
                self.t = t

            def __del__(self):
                meter.live -= nbytes
        return Held()

    @staticmethod
    def unpack(held):
        return held.t


def peak_saved(digits, memory, syn_steps):
    net, s, start, target = problem(digits)
    plan = plan_unroll(np.random.default_rng(0), len(s), len(s), syn_steps)
    meter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        gradients(net, s, start, target, plan, memory)
    return meter.peak


def test_tesla_memory_does_not_grow_with_n(digits):
    tesla = [peak_saved(digits, "tesla", n) for n in (2, 8)]
    plain = [peak_saved(digits, "plain", n) for n in (2, 8)]
    assert plain[1] > 3 * plain[0]  # the meter sees the unrolled graph grow ...
    assert tesla[0] > 0 and tesla[1] == tesla[0]  # ... and a flat one for the first-order rule
    assert tesla[1] < plain[1] / 3


# --- sampling: the expert walk and discrete starts ---------------------------------------------------


def test_every_pass_visits_each_expert_once_before_any_repeats():
    walk, rng = ExpertWalk(5), np.random.default_rng(0)
    drawn = [walk.next(rng) for _ in range(50)]
    passes = [drawn[i:i + 5] for i in range(0, 50, 5)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_walk_state_resumes_mid_pass_and_refuses_foreign_states():
    a, rng = ExpertWalk(4), np.random.default_rng(1)
    [a.next(rng) for _ in range(6)]
    b = ExpertWalk(4)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    state = copy.deepcopy(rng.bit_generator.state)
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = state
    assert [a.next(rng) for _ in range(9)] == [b.next(rng2) for _ in range(9)]
    for bad in ({"order": [0, 1, 1, 2], "position": 0}, {"order": [0, 1, 2, 3], "position": 5}, {"order": "x"}, {}):
        with pytest.raises(TrajstoreError):
            ExpertWalk(4).load_state_dict(bad)
    with pytest.raises(OutOfRangeError):
        ExpertWalk(0)
