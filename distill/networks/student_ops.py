"""Upstream's default ConvNet (instance norm, ReLU, 2x2 average pooling) run from its parameters, with
cheaper second derivatives for the distillation student, and a cheaper first-order backward for the plain
training of evaluation and experts (`train.forward_of`: a backward that is not differentiated calls the
kernels below directly, without the second-order Functions; benchmarks/RESULTS.md §8 "faster step").

The matching loss differentiates through every student step's gradient, so each layer's backward is
itself differentiated. On the CPU, PyTorch does that second differentiation expensively for three layers
of this network (benchmarks/RESULTS.md §10 has the profile and the timings):

- instance norm (`GroupNorm(C, C)`): the derivative of `native_group_norm_backward` is a composite of
  ~20 full-size elementwise operations. `_InstanceNormBackward` below writes it out in closed form as a
  few fused reductions and per-instance linear combinations of the same tensors. The ReLU and the 2x2
  pooling after the norm run in the same Function (fewer graph nodes and full-size temporaries).
- 2x2 average pooling: `avg_pool2d` and `avg_pool2d_backward` run several times slower than the memory
  traffic they need at these shapes. Pooling is linear and its adjoint is spreading each value over its
  2x2 block, so `_Pool2` and `_Spread2` are each other's backward (differentiable to any order) and are
  written with contiguous views.
- convolutions: the double backward's weight term is a convolution of batch-transposed tensors, and
  oneDNN is slow on the first layer's few input channels. `_Conv`'s backward is made of input- and
  weight-gradient Functions whose backwards are plain convolutions, each on the faster backend.

The arithmetic is the same as the module's up to float rounding (summation order, convolution
algorithm); the classifier is PyTorch's own, and so is a ReLU that does not follow a norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """Sum of each 2x2 block over 4, as rows then columns of contiguous views."""
    n, c, h, w = x.shape
    rows = x.contiguous().view(n, c, h // 2, 2, w)
    pairs = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(n, c, h // 2, w // 2, 2)
    return (pairs[..., 0] + pairs[..., 1]).mul_(0.25)


def _spread2(g: torch.Tensor) -> torch.Tensor:
    """Each value over 4, copied to its 2x2 block: the adjoint of _pool2."""
    n, c, h, w = g.shape
    cols = (g * 0.25).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
    return torch.stack([cols, cols], 3).view(n, c, 2 * h, 2 * w)


class _Pool2(Function):
    @staticmethod
    def forward(ctx, x):
        return _pool2(x)

    @staticmethod
    def backward(ctx, g):
        return _Spread2.apply(g) if torch.is_grad_enabled() else _spread2(g)


class _Spread2(Function):
    @staticmethod
    def forward(ctx, g):
        return _spread2(g)

    @staticmethod
    def backward(ctx, gg):
        return _Pool2.apply(gg) if torch.is_grad_enabled() else _pool2(gg)


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2) (no padding, floor mode); even sizes take the fast path."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.avg_pool2d(x, 2)
    return _Pool2.apply(x)


# Convolutions with fewer input channels than this run on PyTorch's own im2col + GEMM instead of oneDNN,
# which is several times slower there (the first layer's 3 image channels: RESULTS §10) and faster on
# many channels; weight gradients are oneDNN's either way. The im2col kernels are called by name, not
# by switching torch.backends.mkldnn off around F.conv2d: that flag is global, and networks trained in
# other threads at the same time (evaluation's side-by-side networks) would see it switched.
_FEW_CHANNELS = 16


def _im2col(t: torch.Tensor, in_channels: int) -> bool:
    return t.device.type == "cpu" and in_channels < _FEW_CHANNELS


def _engine_needs(ctx, i: int) -> bool:
    """Whether the running backward pass uses input i's gradient: a custom Function's needs_input_grad
    only says the input requires grad, and a student step's gradient w.r.t. theta never needs the
    images' (the first convolution's input gradient, computed and dropped, would cost a convolution)."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # a leaf under autograd.grad, or an older torch: assume needed
        return True


def _conv(x, weight, padding, bias=None):
    if _im2col(x, weight.shape[1]):
        return torch.ops.aten._slow_conv2d_forward(x, weight, weight.shape[2:], bias, [1, 1], padding)
    return F.conv2d(x, weight, bias, 1, padding)


def _conv_input_grad(gy, weight, padding, x_shape):
    """The gradient of conv2d(x, weight) w.r.t. x (of shape x_shape) for output gradient gy."""
    if _im2col(gy, weight.shape[1]):
        # only the input's shape is read: a zero-stride stand-in spares materialising it
        shape_only = gy.new_empty(()).expand(x_shape)
        return torch.ops.aten._slow_conv2d_backward(gy, shape_only, weight, weight.shape[2:], [1, 1], padding,
                                                    [True, False, False])[0]
    return F.conv_transpose2d(gy, weight, None, 1, padding)


def _conv_param_grads(x, gy, weight, padding, want_weight=True, want_bias=False):
    """The gradients of conv2d(x, weight, bias) w.r.t. weight and bias (each None unless wanted), from one
    convolution_backward call: the bias's sum is taken in the same pass."""
    _, gw, gb = torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]] if want_bias else None,
                                                    [1, 1], padding, [1, 1], False, [0, 0], 1,
                                                    [False, want_weight, want_bias])
    return gw, gb


class _Conv(Function):
    """conv2d (stride 1, no dilation or groups) whose backward is made of _ConvInputGrad and
    _ConvParamGrads, so that its second derivatives are plain convolutions and weight gradients too
    (PyTorch's double backward computes the weight term as a convolution of batch-transposed tensors,
    slower than a weight gradient) and each runs on the faster backend for its channel count."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.padding, ctx.x_shape = padding, x.shape
        ctx.save_for_backward(x, weight)
        return _conv(x, weight, padding, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        # a backward that is not differentiated (create_graph=False) needs no Functions, only their values
        graph = torch.is_grad_enabled()
        gx = None
        if _engine_needs(ctx, 0):
            gx = (_ConvInputGrad.apply(gy, weight, ctx.padding, ctx.x_shape) if graph
                  else _conv_input_grad(gy, weight, ctx.padding, ctx.x_shape))
        want_weight, want_bias = _engine_needs(ctx, 1), _engine_needs(ctx, 2)
        gw = gb = None
        if want_weight or want_bias:
            gw, gb = (_ConvParamGrads.apply(x, gy, weight, ctx.padding, want_weight, want_bias) if graph
                      else _conv_param_grads(x, gy, weight, ctx.padding, want_weight, want_bias))
        return gx, gw, gb, None


class _ConvInputGrad(Function):
    @staticmethod
    def forward(ctx, gy, weight, padding, x_shape):
        ctx.padding = padding
        ctx.save_for_backward(gy, weight)
        return _conv_input_grad(gy, weight, padding, x_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx):
        gy, weight = ctx.saved_tensors
        d_gy = _conv(ggx, weight, ctx.padding) if _engine_needs(ctx, 0) else None
        d_weight = _conv_param_grads(ggx, gy, weight, ctx.padding)[0] if _engine_needs(ctx, 1) else None
        return d_gy, d_weight, None, None


class _ConvParamGrads(Function):
    """(x, gy) -> the weight's and the bias's gradients (either may be None). The bias's adjoint enters the
    double backward as the bias of the convolution that gives gy's adjoint, instead of as a full-size
    broadcast that autograd would add to it."""

    @staticmethod
    def forward(ctx, x, gy, weight, padding, want_weight, want_bias):
        ctx.padding = padding
        ctx.save_for_backward(x, gy)
        return _conv_param_grads(x, gy, weight, padding, want_weight, want_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, ggw, ggb):
        x, gy = ctx.saved_tensors
        d_x = d_gy = None
        if ggw is not None and _engine_needs(ctx, 0):
            d_x = _conv_input_grad(gy, ggw, ctx.padding, x.shape)
        if _engine_needs(ctx, 1):
            if ggw is not None:
                d_gy = _conv(x, ggw, ctx.padding, ggb)
            elif ggb is not None:
                d_gy = ggb.view(1, -1, 1, 1).expand(gy.shape)
        return d_x, d_gy, None, None, None, None


def conv2d(x, weight, bias, padding):
    return _Conv.apply(x, weight, bias, padding)


def _instance_dims(y: torch.Tensor) -> tuple[int, int, int]:
    return y.shape[0], y.shape[1], math.prod(y.shape[2:])


def _plane_stats(g, x, mean, rstd, mask, gamma=None):
    """native_group_norm_backward over the planes as one image of n*c channels in n*c groups of one (gamma,
    if given, per channel): its per-channel outputs are then per plane, dgamma = <g, (x - mean) rstd>
    and dbeta = <g, 1>, from one fused pass over g and x (no product temporary); dx (mask[0]) is the
    same as the per-image call's, N(gamma g) in _InstanceNormBackward's notation."""
    n, c, d = _instance_dims(x)
    p = n * c
    per_plane = None if gamma is None else gamma.repeat(n)
    dx, dots, sums = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, p, d), x.reshape(1, p, d), mean.reshape(1, p), rstd.reshape(1, p), per_plane, 1, p, d, p,
        mask)
    return (None if dx is None else dx.view_as(x)), dots, sums


def _group_norm_backward(g, y, weight, mean, rstd):
    n, c, hw = _instance_dims(y)
    return torch.ops.aten.native_group_norm_backward(g, y, mean, rstd, weight, n, c, hw, c, [True, True, True])


def _norm_output_grad(g_res, out, pool):
    """The gradient at the norm's output from the one at the layer's result (after ReLU where out, the
    ReLU's output, is given, and 2x2 pooling where pool): the spread is this function's own temporary, so
    the ReLU's mask is applied to it in place."""
    if pool:
        g = _spread2(g_res)
        return g if out is None else torch.ops.aten.threshold_backward.grad_input(g, out, 0, grad_input=g)
    return g_res if out is None else torch.ops.aten.threshold_backward(g_res, out, 0)


class _InstanceNorm(Function):
    """GroupNorm(C, C) with affine weight and bias, each (image, channel) plane normalised on its own; with
    relu=True the ReLU after it and with pool=True the 2x2 average pooling after that (even sizes), in the
    same Function: fewer graph nodes and full-size temporaries per layer, and the mask's second derivative
    (zero) is never materialised as the full-size zeros PyTorch's ReLU adds."""

    @staticmethod
    def forward(ctx, y, weight, bias, eps, relu, pool):
        n, c, hw = _instance_dims(y)
        out, mean, rstd = torch.native_group_norm(y, weight, bias, n, c, hw, c, eps)
        if relu:
            out.relu_()
        ctx.pool = pool
        ctx.save_for_backward(y, weight, mean, rstd, out if relu else None)
        return _pool2(out) if pool else out

    @staticmethod
    def backward(ctx, g_res):
        y, weight, mean, rstd, out = ctx.saved_tensors
        if torch.is_grad_enabled():
            gy, gw, gb = _InstanceNormBackward.apply(g_res, y, weight, mean, rstd, out, ctx.pool)
        else:
            gy, gw, gb = _group_norm_backward(_norm_output_grad(g_res, out, ctx.pool), y, weight, mean, rstd)
        return gy, gw, gb, None, None, None


class _InstanceNormBackward(Function):
    """(g_res, y, gamma) -> (dy, dgamma, dbeta) of instance norm (with out given, of ReLU after it: the
    norm's output gradient is g = g_out where out > 0, else 0; with pool, g_out is g_res spread over the
    2x2 blocks), with its own derivative in closed form.

    Per plane (D values, mean mu, r = 1/sqrt(var + eps), xhat = (y - mu) r), with the projection
    N(u) = r (u - mean(u) - xhat <u, xhat> / D) (symmetric), the backward is
        dy = N(gamma g),  dgamma = sum <g, xhat>,  dbeta = sum <g, 1>.
    Given adjoints v, a, b of (dy, dgamma, dbeta), S = <v, dy> + a dgamma + b dbeta has
        dS/dg     = gamma N(v) + a xhat + b    (dS/dg_out: the same where out > 0, else 0; dS/dg_res its pool)
        dS/dgamma = sum <g, N(v)> = sum r (<g, v> - <g, 1> <v, 1> / D - <g, xhat> <v, xhat> / D)
        dS/dy     = N(a g) - r/D (<v, xhat> N(h) + <h, xhat> N(v)) - r^2 K / D xhat,   h = gamma g,
                    K = <v, h> - D mean(v) mean(h) - <v, xhat> <h, xhat> / D
    (dr/dy = -r^2 xhat / D and dxhat/dy = r (I - 1/D - xhat xhat^T / D); the ReLU mask is piecewise
    constant, so it adds no term). Every full-size term is a per-plane linear combination of g, v, y and
    1: the backward keeps <g, xhat> and <g, 1> per plane from its own pass, and the double backward takes
    <v, xhat>, <v, 1> and <v, g> from two fused reductions, then forms dS/dy and dS/dg with axpys.
    """

    @staticmethod
    def forward(ctx, g_res, y, weight, mean, rstd, out, pool):
        n, c, _ = _instance_dims(y)
        g = _norm_output_grad(g_res, out, pool)
        ctx.pool = pool
        # per plane, so that the double backward has <g, xhat> and <g, 1> without another pass
        gy, g_xhat, sum_g = _plane_stats(g, y, mean, rstd, [True, True, True], weight)
        ctx.save_for_backward(g, y, weight, mean, rstd, out, g_xhat, sum_g)
        return gy, g_xhat.view(n, c).sum(0), sum_g.view(n, c).sum(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, v, a, b):
        g, y, weight, mean, rstd, out, g_xhat, sum_g = ctx.saved_tensors
        n, c, d = _instance_dims(y)
        shape = (1, c, 1, 1)
        v = torch.zeros_like(y) if v is None else v
        a = torch.zeros(shape, dtype=y.dtype, device=y.device) if a is None else a.view(shape)
        b = torch.zeros(shape, dtype=y.dtype, device=y.device) if b is None else b.view(shape)
        gamma = weight.view(shape)
        mu, r = mean.view(n, c, 1, 1), rstd.view(n, c, 1, 1)
        g_xhat, sum_g = g_xhat.view(n, c, 1, 1), sum_g.view(n, c, 1, 1)
        _, v_xhat, sum_v = _plane_stats(v, y, mean, rstd, [False, True, True])
        v_xhat, sum_v = v_xhat.view(n, c, 1, 1), sum_v.view(n, c, 1, 1)
        v_g = _plane_stats(v, g, torch.zeros_like(mean), torch.ones_like(rstd), [False, True, False])[1]
        v_g = v_g.view(n, c, 1, 1)
        # With s = 1/D, rs = r s, rrs = r rs: N(u) = r u - rs <u, 1> - rrs <u, xhat> (y - mu), and with
        # q = <v, g> - s (<v, 1> <g, 1> + <v, xhat> <g, xhat>) (so K = gamma q),
        #   dS/dy = alpha N(g) + beta N(v) - rrs gamma q r (y - mu),  alpha = a - rs gamma <v, xhat>,
        #           beta = -rs gamma <g, xhat>   (N(a g) - r/D <v, xhat> N(gamma g) = N(alpha g))
        #         = alpha r g + beta r v - e (y - mu) - rs (alpha <g, 1> + beta <v, 1>),
        #           e = rrs (alpha <g, xhat> + beta <v, xhat> + r gamma q)
        #   dS/dg = gamma r v + f (y - mu) + b - gamma rs <v, 1>,  f = a r - rrs gamma <v, xhat>
        s = 1.0 / d
        rs = r * s
        rrs = r * rs
        gamma_vx = gamma * v_xhat
        q = torch.sub(v_g, torch.addcmul(sum_v * sum_g, v_xhat, g_xhat), alpha=s)
        alpha = torch.addcmul(a, rs, gamma_vx, value=-1)
        beta = (gamma * g_xhat).mul_(rs).neg_()
        e = (alpha * g_xhat).addcmul_(beta, v_xhat).addcmul_(r * gamma, q).mul_(rrs)
        c_dy = (e * mu).sub_((alpha * sum_g).addcmul_(beta, sum_v).mul_(rs))
        # (out-of-place addcmul with a broadcast first operand is several times slower than mul + add_)
        dy = (y * e.neg_()).add_(c_dy).addcmul_(alpha * r, g).addcmul_(beta * r, v)
        f = torch.addcmul(a * r, rrs, gamma_vx, value=-1)
        c_dg = torch.addcmul(b - f * mu, rs * gamma, sum_v, value=-1)
        dg = (y * f).add_(c_dg).addcmul_(gamma * r, v)
        if out is not None:  # through the ReLU's mask, in place: dg is this function's own temporary
            torch.ops.aten.threshold_backward.grad_input(dg, out, 0, grad_input=dg)
        dgamma = (r * q).sum(0).view(-1)
        return _pool2(dg) if ctx.pool else dg, dy, dgamma, None, None, None, None


def instance_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  relu: bool = False, pool: bool = False) -> torch.Tensor:
    """GroupNorm(C, C) (affine), then ReLU where relu is true, then F.avg_pool2d(., 2) where pool is."""
    if pool and (y.shape[-1] % 2 or y.shape[-2] % 2):
        return F.avg_pool2d(_InstanceNorm.apply(y, weight, bias, eps, relu, False), 2)
    return _InstanceNorm.apply(y, weight, bias, eps, relu, pool)


def convnet_forward(net: nn.Module) -> Callable | None:
    """forward(params, x) for upstream's ConvNet, params keyed by parameter name; None where the network
    has a layer this module does not run (any norm but instance norm, any activation but ReLU, max
    pooling): FunctionalNet then uses torch.func.functional_call."""
    from .convnet import ConvNet

    if type(net) is not ConvNet:
        return None
    steps = []
    for index, module in enumerate(net.features):
        prefix = f"features.{index}."
        if (type(module) is nn.Conv2d and module.stride == (1, 1) and module.dilation == (1, 1)
                and module.groups == 1 and module.padding_mode == "zeros" and module.bias is not None):
            steps.append(("conv", prefix, module))
        elif type(module) is nn.GroupNorm and module.num_groups == module.num_channels and module.affine:
            steps.append(("instancenorm", prefix, module))
        elif type(module) is nn.ReLU:
            steps.append(("relu", prefix, module))
        elif (type(module) is nn.AvgPool2d and module.kernel_size == 2 and module.stride == 2
              and module.padding == 0 and not module.ceil_mode):
            steps.append(("avgpool", prefix, module))
        else:
            return None
    # a norm and the ReLU and pooling after it run as one Function: (kind, prefix, module, relu, pool)
    fused = []
    for kind, prefix, module in steps:
        norm = fused[-1] if fused and fused[-1][0] == "instancenorm" else None
        if norm and kind == "relu" and not norm[3] and not norm[4]:
            fused[-1] = (*norm[:3], True, False)
        elif norm and kind == "avgpool" and not norm[4]:
            fused[-1] = (*norm[:4], True)
        else:
            fused.append((kind, prefix, module, False, False))

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        for kind, prefix, m, relu, pool in fused:
            if kind == "conv":
                x = conv2d(x, params[prefix + "weight"], params[prefix + "bias"], list(m.padding))
            elif kind == "instancenorm":
                x = instance_norm(x, params[prefix + "weight"], params[prefix + "bias"], m.eps, relu, pool)
            elif kind == "relu":
                x = torch.relu_(x)  # in place: the convolution before it keeps its input, not its output
            else:
                x = avg_pool2(x)
        return F.linear(x.reshape(x.size(0), -1), params["classifier.weight"], params["classifier.bias"])

    return forward
