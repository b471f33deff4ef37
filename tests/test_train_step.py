"""The first-order training step of evaluation and experts (distill.train): upstream's default ConvNet on
the CPU runs through student_ops' Functions (`forward_of`); its values and gradients must be the module's,
whose autograd is the reference (float64, so that only rounding can differ)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trajstore.distill.augment import seeded_dsa
from trajstore.distill.networks import build
from trajstore.distill.train import FAST_STEP_MIN_VALUES, accuracy, forward_of, train_epoch


def _graph(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            todo.extend(n for n, _ in node.next_functions)
    return seen


def _net(model: str, im_size, channel: int = 3, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(model, channel, 10, im_size).double()


# (model, channels, image size): the default ConvNet; a 1-channel image (padding 3 on the first layer);
# 18 px, whose second pooling sees 9 px (odd: PyTorch's avg_pool2d); 20 px (10, then 5: the third odd)
CASES = [("ConvNet", 3, (32, 32)), ("ConvNetW8", 1, (28, 28)), ("ConvNetW8", 3, (18, 18)),
         ("ConvNetD4", 3, (20, 20))]


@pytest.mark.parametrize("model,channel,im_size", CASES)
def test_fast_forward_and_gradients_equal_the_modules_autograd(model, channel, im_size):
    net = _net(model, im_size, channel)
    ref = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, channel, *im_size, generator=g, dtype=torch.float64)
    y = torch.randint(10, (6,), generator=g)
    out = forward_of(net, min_values=0)(x)  # the fast path at any size
    assert "_ConvBackward" in _graph(out) and "ConvolutionBackward0" not in _graph(out)
    want = ref(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(want, y).backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_other_networks_run_as_their_modules():
    for model in ("ConvNetBN", "ConvNetMP", "MLP"):
        net = build(model, 3, 10, (32, 32))
        assert forward_of(net) is net, model


def test_small_batches_run_as_the_module_and_large_ones_fast():
    net = build("ConvNetW8", 3, 10, (16, 16))  # 8 channels x 256 pixels per image in the first layer's output
    small = FAST_STEP_MIN_VALUES // (8 * 256) - 1
    assert "ConvolutionBackward0" in _graph(forward_of(net)(torch.randn(small, 3, 16, 16)))
    assert "_ConvBackward" in _graph(forward_of(net)(torch.randn(small + 1, 3, 16, 16)))


def test_training_epochs_equal_a_plain_module_loop():
    """Two epochs of train_epoch (shuffles, DSA, SGD with momentum and weight decay) against the same loop
    written here with the module's forward, on the same draws; the default width, so that batches of 10
    take the fast path."""
    net = _net("ConvNet", (16, 16))
    ref = copy.deepcopy(net)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(20, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(20) % 10
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g_fast, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug_fast, aug_ref = seeded_dsa(g_fast), seeded_dsa(g_ref)
    for _ in range(2):
        loss, acc = train_epoch(net, images, labels, optimizer=opt, batch_size=10, augment=aug_fast, device="cpu",
                                generator=g_fast)
        ref_loss, ref_correct = 0.0, 0
        for idx in torch.randperm(20, generator=g_ref).split(10):
            ref_opt.zero_grad()
            out = ref(aug_ref(images[idx]))
            batch_loss = F.cross_entropy(out, labels[idx])
            batch_loss.backward()
            ref_opt.step()
            ref_loss += batch_loss.item() * len(idx)
            ref_correct += int((out.argmax(1) == labels[idx]).sum())
        assert loss == pytest.approx(ref_loss / 20, rel=1e-9) and acc == ref_correct / 20
    moved = 0.0
    for p, q, p0 in zip(net.parameters(), ref.parameters(), _net("ConvNet", (16, 16)).parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)
        moved = max(moved, float((p - p0).detach().abs().max()))
    assert moved > 1e-3  # it did train
    test = torch.randn(30, 3, 16, 16, generator=g, dtype=torch.float64)
    test_labels = ref(test).argmax(1)
    test_labels[:7] = (test_labels[:7] + 1) % 10  # 7 of 30 wrong by construction
    assert accuracy(net, test, test_labels, batch_size=10, device="cpu") == pytest.approx(23 / 30)


def test_a_seeded_training_run_repeats_bit_for_bit():
    """float32 on one thread, as evaluation's side-by-side networks run: the same seed, the same bits."""
    runs = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            net = build("ConvNet", 3, 10, (16, 16))  # batches of 8 take the fast path
        g = torch.Generator().manual_seed(5)
        images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(6))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_epoch(net, images, torch.arange(16) % 10, optimizer=opt, batch_size=8, augment=seeded_dsa(g),
                        device="cpu", generator=g)
        finally:
            torch.set_num_threads(before)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
