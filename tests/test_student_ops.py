"""The distillation student's own layer Functions (distill/networks/student_ops.py): convolutions, against
PyTorch's F.conv2d and its autograd, and free of process-global state."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from trajstore.distill.networks import FunctionalNet, build, flat_parameters
from trajstore.distill.networks.student_ops import conv2d, instance_norm


def _conv_inputs(in_channels: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, in_channels, 6, 5, generator=g, dtype=dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(7, in_channels, 3, 3, generator=g, dtype=dtype)).requires_grad_(True)
    bias = torch.randn(7, generator=g, dtype=dtype).requires_grad_(True)
    return x, weight, bias


def _second_derivatives_of(f, inputs, used, seed=1):
    """The gradient of a random linear functional of the first derivatives numbered in `used` (the others'
    adjoints are then None in the double backward)."""
    g = torch.Generator().manual_seed(seed)
    out = f(*inputs)
    first = torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g, dtype=out.dtype),
                                create_graph=True)
    adjoints = [torch.randn(d.shape, generator=g, dtype=d.dtype) for d in first]
    functional = sum((adjoints[i] * first[i]).sum() for i in used)
    return [d.detach() for d in first], torch.autograd.grad(functional, inputs, allow_unused=True)


def _assert_same_derivatives(fast, ref, rtol, atol):
    for got, want in zip(fast[0] + list(fast[1]), ref[0] + list(ref[1])):
        if want is None:  # autograd: unused; the Function may return zeros instead
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# 3 input channels take the im2col kernels, 20 oneDNN's (float32 on the CPU; float64 is never oneDNN's);
# the functional reads all first derivatives (x, weight, bias) or the weight's or the bias's alone
@pytest.mark.parametrize("in_channels", [3, 20])
@pytest.mark.parametrize("used", [(0, 1, 2), (1,), (2,), (0, 2)])
def test_student_convolution_first_and_second_derivatives_equal_autograds(in_channels, used):
    inputs = _conv_inputs(in_channels, torch.float64)
    # squared, so that second derivatives w.r.t. every input are non-zero
    fast = _second_derivatives_of(lambda x, w, b: conv2d(x, w, b, [1, 1]).square(), inputs, used)
    ref = _second_derivatives_of(lambda x, w, b: F.conv2d(x, w, b, 1, 1).square(), inputs, used)
    _assert_same_derivatives(fast, ref, 1e-10, 1e-12)


@pytest.mark.parametrize("in_channels", [3, 20])
@pytest.mark.parametrize("padding", [0, 1])
def test_student_convolution_equals_f_conv2d_in_float32(in_channels, padding):
    x, weight, bias = _conv_inputs(in_channels, torch.float32, seed=2)
    gy = torch.randn(3, 7, 6 + 2 * padding - 2, 5 + 2 * padding - 2, generator=torch.Generator().manual_seed(3))
    got = conv2d(x, weight, bias, [padding, padding])
    want = F.conv2d(x, weight, bias, 1, padding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), gy), torch.autograd.grad(want, (x, weight, bias), gy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_student_leaves_the_global_mkldnn_switch_alone():
    """Networks trained side by side in threads (evaluation) must never see torch.backends.mkldnn switched
    while a student runs its first convolution on the im2col kernels."""
    torch.manual_seed(0)
    net = build("ConvNetW32", channel=3, num_classes=10, im_size=(32, 32))
    student = FunctionalNet(net)
    assert student._forward is not None
    theta = flat_parameters(net).requires_grad_(True)
    x = torch.randn(10, 3, 32, 32, requires_grad=True)
    before = torch.backends.mkldnn.enabled
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(torch.backends.mkldnn.enabled)
            time.sleep(1e-5)  # lets the main thread have the GIL; convolutions run without it

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            loss = F.cross_entropy(student(theta, x), torch.arange(10))
            g = torch.autograd.grad(loss, theta, create_graph=True)[0]
            torch.autograd.grad(g.square().sum(), (x, theta))
    finally:
        stop.set()
        watcher.join()
    assert seen == {before}


def _norm_inputs(seed: int = 0, width: int = 5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(3, 4, 6, width, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = (1 + 0.3 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    bias = (0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    return y, weight, bias


def _written_out_norm_relu(y, weight, bias, eps=1e-5):
    """Instance norm and ReLU in plain ops, differentiated by autograd: (y - mean) / sqrt(biased var + eps)."""
    mean = y.mean((2, 3), keepdim=True)
    var = (y - mean).square().mean((2, 3), keepdim=True)
    return torch.relu((y - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


# which first derivatives the differentiated functional reads: all, or one of them alone (the double
# backward's other adjoints are then None); pooled: even sizes take the fused pooling, odd F.avg_pool2d
@pytest.mark.parametrize("used", [(0, 1, 2), (0,), (1,), (2,)])
@pytest.mark.parametrize("pool, width", [(False, 5), (True, 4), (True, 5)])
def test_student_norm_relu_first_and_second_derivatives_equal_autograds(used, pool, width):
    inputs = _norm_inputs(width=width)

    def written_out(*a):
        out = _written_out_norm_relu(*a)
        return F.avg_pool2d(out, 2) if pool else out

    got_out = instance_norm(*inputs, 1e-5, relu=True, pool=pool)
    want_out = torch.relu(F.group_norm(inputs[0], 4, inputs[1], inputs[2], 1e-5))
    assert (want_out == 0).float().mean() > 0.2  # the mask matters
    want_out = F.avg_pool2d(want_out, 2) if pool else want_out
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-14)

    # a convolution and a square after the layer, as in the student: the layer's output gradient then
    # depends on the inputs and is non-zero where the ReLU is off
    after = 0.3 * torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fast = _second_derivatives_of(lambda *a: F.conv2d(instance_norm(*a, 1e-5, relu=True, pool=pool), after,
                                                       padding=1).square(), inputs, used)
    ref = _second_derivatives_of(lambda *a: F.conv2d(written_out(*a), after, padding=1).square(), inputs, used)
    _assert_same_derivatives(fast, ref, 1e-9, 1e-11)


def test_student_convolution_with_a_constant_weight_differentiates_its_bias_twice():
    """Only the bias is trained: its gradient's derivative reaches x through the output gradient alone."""
    x, weight, bias = _conv_inputs(3, torch.float64)
    weight = weight.detach()
    fast = _second_derivatives_of(lambda x, b: conv2d(x, weight, b, [1, 1]).square(), (x, bias), (1,))
    ref = _second_derivatives_of(lambda x, b: F.conv2d(x, weight, b, 1, 1).square(), (x, bias), (1,))
    _assert_same_derivatives(fast, ref, 1e-10, 1e-12)
