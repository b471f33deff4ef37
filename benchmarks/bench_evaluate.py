"""Evaluation: K networks side by side, one by one and stacked, against one network; where the time goes.

    python -m benchmarks.bench_evaluate [--epochs 300] [--nets 5] [--device cpu|cuda] [--threads N]

The setting of `trajstore evaluate --random --ipc 1 --epochs 300`: ConvNet on 3x32x32 digits, a random
real subset of 1 image per class, the evaluation protocol. Variants (all with the thread setting the
CLI has, torch's default unless --threads):

- one_network: 1 network, `evaluate`'s default path (the plain loop on all intra-op threads);
- one_network_one_thread: the same on one thread (the work of one network, for the CPU ratio);
- k_default: K networks, `evaluate`'s default (CPU: side by side, one per core; GPU: stacked);
- k_one_by_one: K networks one after another (`--one-by-one`);
- k_together: K networks stacked and vmapped (`--together`).

The variants take turns within every round, so load from other jobs falls on all of them alike; the
figures are medians over rounds, in wall seconds and in this process's CPU seconds (all its threads).
`breakdown` says where one network's time goes: FLOPs of one training step (torch's FlopCounterMode),
its CPU time on one thread (hence GFLOP/s: compute- or dispatch-bound), DSA's share, the test pass and
the data set-up, all on one thread, and which operations its step spends the time in (torch.profiler).

`layouts` (--layouts) asks whether K networks could run more efficiently per FLOP than one: CPU time per
network-step (forward and backward, no DSA) on one thread (--threads N: on N), the variants taking turns,
of one network, K networks as one wide network (`_Wide`: their channels side by side, grouped convolutions, per-network
classifiers as one batched matmul; checked against the K networks before timing) and both in channels_last;
and the roofline: the network's convolutions alone (`conv_forward`, `conv_backward`: oneDNN at the
step's shapes, on one core), the least time any layout of the same FLOPs can approach.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks.common import add_device_option, add_modules_option, as_modules, check_device, write_result
from trajstore.distill.augment import seeded_dsa
from trajstore.distill.data import load_dataset
from trajstore.distill.evaluate import BASELINE_LR, _Schedule, evaluate_synset, random_subset
from trajstore.distill.networks import build
from trajstore.distill.train import accuracy, train_epoch
from trajstore.tools.threads import single_threaded


def _cpu(fn, repeat: int = 1) -> float:
    c0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - c0) / repeat


def breakdown(model: str, ipc: int, device: str, steps: int = 20) -> dict:
    """One network's costs on one thread, in CPU seconds: a training step (with and without DSA), the
    test pass, the data set-up; the FLOPs of a step."""
    from torch.utils.flop_counter import FlopCounterMode

    with single_threaded():
        setup = _cpu(lambda: load_dataset("digits"))
        ds = load_dataset("digits")
        images, labels = random_subset(ds, ipc, seed=0)
        torch.manual_seed(0)
        net = build(model, ds.channel, ds.num_classes, ds.im_size).to(device)
        g = torch.Generator().manual_seed(0)
        opt = _Schedule(BASELINE_LR, 300).optimizer(net.parameters())
        images, labels = images.to(device), labels.to(device)

        def step(augment):
            return lambda: train_epoch(net, images, labels, optimizer=opt, batch_size=256, augment=augment,
                                       device=device, generator=g)

        with as_modules(), FlopCounterMode(display=False) as counter:
            step(None)()
        flops = counter.get_total_flops()
        step(seeded_dsa(g))()  # warm
        with_dsa = _cpu(step(seeded_dsa(g)), steps)
        without = _cpu(step(None), steps)
        test = _cpu(lambda: accuracy(net, ds.test_images.to(device), ds.test_labels.to(device), device=device))
        with as_modules(), FlopCounterMode(display=False) as counter:
            accuracy(net, ds.test_images.to(device), ds.test_labels.to(device), device=device)
        test_flops = counter.get_total_flops()
        profile = _profile_step(step(seeded_dsa(g)), steps)
    return {"batch": len(labels), "step_flops": flops, "step_cpu_s": with_dsa, "step_cpu_s_without_dsa": without,
            "dsa_share": 1 - without / with_dsa, "gflops_per_cpu_s": flops / without / 1e9,
            "test_pass_cpu_s": test, "test_pass_flops": test_flops, "test_images": len(ds.test_labels),
            "data_setup_cpu_s": setup, "step_profile_shares": profile}


def _profile_step(step, steps: int) -> dict:
    """Shares of one step function's self CPU time by kind of operation (torch.profiler, one thread; shares,
    as the profiler's own overhead inflates the absolute times)."""
    from torch.profiler import ProfilerActivity, profile

    kinds = {"conv_forward": ("mkldnn_convolution", "_convolution", "thnn_conv2d", "_slow_conv2d_forward"),
             "conv_backward": ("convolution_backward",), "norm": ("group_norm",), "pool": ("avg_pool2d",),
             "relu": ("threshold", "relu", "clamp_min"), "fill_and_copy": ("fill_", "copy_", "zero_")}
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out = dict.fromkeys([*kinds, "other"], 0.0)
    for e in prof.key_averages():
        kind = next((k for k, names in kinds.items() if any(n in e.key for n in names)), "other")
        out[kind] += e.self_cpu_time_total
    total = sum(out.values())
    return {kind: t / total for kind, t in out.items()}


class _Wide(torch.nn.Module):
    """K ConvNets (instance norm) as one network: their channels side by side, each convolution grouped
    by network (the first over the K networks' own batches stacked along channels), instance norm per
    channel (so per network), ReLU and pooling as they are, the K classifiers as one batched matmul.
    Input (B, K*C, H, W): network k's batch in channels [k*C, (k+1)*C); output (B, K, classes)."""

    def __init__(self, nets):
        super().__init__()
        self.k, layers = len(nets), []
        for mods in zip(*(n.features for n in nets)):
            m = mods[0]
            cat = [torch.nn.Parameter(torch.cat([getattr(x, a).detach() for x in mods]))
                   for a in ("weight", "bias") if hasattr(m, a)]
            if isinstance(m, torch.nn.Conv2d):
                layers.append(("conv", m.padding, *cat))
            elif isinstance(m, torch.nn.GroupNorm):
                assert m.num_groups == m.num_channels, "instance norm only"
                layers.append(("norm", m.eps, *cat))
            else:
                layers.append(("module", m))
        self.layers = layers
        self.weights = torch.nn.ParameterList([p for layer in layers for p in layer[2:]])
        self.fc_w = torch.nn.Parameter(torch.stack([n.classifier.weight.detach() for n in nets]))  # (K, O, F)
        self.fc_b = torch.nn.Parameter(torch.stack([n.classifier.bias.detach() for n in nets]))

    def forward(self, x):
        for layer in self.layers:
            if layer[0] == "conv":
                x = torch.nn.functional.conv2d(x, layer[2], layer[3], padding=layer[1], groups=self.k)
            elif layer[0] == "norm":
                x = torch.nn.functional.group_norm(x, x.size(1), layer[2], layer[3], layer[1])
            else:
                x = layer[1](x)
        x = x.contiguous().view(x.size(0), self.k, -1)  # network k's features, in its own (C, H, W) order
        return torch.einsum("bkf,kof->bko", x, self.fc_w) + self.fc_b


def layouts(model: str, ipc: int, k: int, rounds: int, threads: int = 1) -> dict:
    """CPU ms per network-step (and GFLOP per CPU second) on `threads` intra-op threads: one network, K as
    one wide network, each in channels_last; the convolution roofline; profile shares. See the module's doc."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    ds = load_dataset("digits")
    b = ipc * ds.num_classes
    torch.manual_seed(0)
    nets = [build(model, ds.channel, ds.num_classes, ds.im_size) for _ in range(k)]
    wide = _Wide(nets)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(k, b, ds.channel, *ds.im_size, generator=g)
    ys = torch.randint(ds.num_classes, (k, b), generator=g)
    x_wide = xs.transpose(0, 1).reshape(b, k * ds.channel, *ds.im_size)
    with torch.no_grad():  # the wide network is the K networks
        torch.testing.assert_close(wide(x_wide), torch.stack([n(x) for n, x in zip(nets, xs)], 1),
                                   rtol=1e-4, atol=1e-4)
    one_cl = copy.deepcopy(nets[0]).to(memory_format=torch.channels_last)
    wide_cl = copy.deepcopy(wide).to(memory_format=torch.channels_last)

    def one_step(net, x):
        def step():
            F.cross_entropy(net(x), ys[0]).backward()
        return step

    def wide_step(net, x):
        def step():
            out = net(x)
            losses = F.cross_entropy(out.flatten(0, 1), ys.t().flatten(), reduction="none").view(b, k)
            losses.mean(0).sum().backward()  # each network's gradient is its own mean loss's
        return step

    steps = {"one": (one_step(nets[0], xs[0]), 1),
             "one_channels_last": (one_step(one_cl, xs[0].contiguous(memory_format=torch.channels_last)), 1),
             f"wide{k}": (wide_step(wide, x_wide), k),
             f"wide{k}_channels_last": (wide_step(wide_cl, x_wide.contiguous(memory_format=torch.channels_last)), k)}
    with FlopCounterMode(display=False) as counter:
        steps["one"][0]()
    flops = counter.get_total_flops()
    # the roofline: the network's convolutions alone at their shapes in the step, forward and backward (as
    # training asks: no input gradient for the first, whose input is the images)
    convs = []
    hooks = [m.register_forward_hook(lambda m, i, o: convs.append((m, i[0].detach(), torch.randn_like(o))))
             for m in nets[0].features if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        nets[0](xs[0])
    for h in hooks:
        h.remove()
    conv_flops = sum(2 * o.numel() * m.weight[0].numel() for m, _, o in convs)  # 2 x outputs x (Cin k k)

    def conv_forward():
        for m, x, _ in convs:
            F.conv2d(x, m.weight.detach(), m.bias.detach(), m.stride, m.padding)

    def conv_backward():
        for i, (m, x, g) in enumerate(convs):
            torch.ops.aten.convolution_backward(g, x, m.weight.detach(), [m.out_channels], m.stride, m.padding,
                                                m.dilation, False, [0, 0], 1, [i > 0, True, True])

    conv_backward_flops = 2 * conv_flops - 2 * convs[0][2].numel() * convs[0][0].weight[0].numel()
    steps["conv_forward"] = (conv_forward, 1)
    steps["conv_backward"] = (conv_backward, 1)
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(rounds):
            for name, (step, per) in tqdm(steps.items(), desc="layouts", leave=False):
                step()
                n = max(2, 24 // (per * ipc))
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    step()
                cpu[name].append((time.process_time() - c0) / n / per)
                wall[name].append((time.perf_counter() - t0) / n / per)
        profile = {"one": _profile_step(steps["one"][0], 10), f"wide{k}": _profile_step(steps[f"wide{k}"][0], 2)}
    finally:
        torch.set_num_threads(before)
    med = {name: statistics.median(t) for name, t in cpu.items()}
    work = {name: flops for name in steps} | {"conv_forward": conv_flops, "conv_backward": conv_backward_flops}
    return {"batch": b, "networks": k, "threads": threads, "step_flops": flops,
            "conv_flops": {"forward": conv_flops, "backward": conv_backward_flops},
            "cpu_ms_per_network_step": {n: 1e3 * t for n, t in med.items()},
            "wall_ms_per_network_step": {n: 1e3 * statistics.median(t) for n, t in wall.items()},
            "all_cpu_ms": {n: [1e3 * t for t in v] for n, v in cpu.items()},
            "gflops_per_cpu_s": {n: work[n] / t / 1e9 for n, t in med.items()},
            "profile_shares": profile}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--nets", type=int, default=5)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variants", default="one_network,one_network_one_thread,k_default,k_one_by_one,k_together",
                   help="comma-separated, of those in the module's doc")
    add_device_option(p)
    add_modules_option(p)
    p.add_argument("--layouts", action="store_true",
                   help="only the per-FLOP comparison of one network, K as one wide network and channels_last")
    p.add_argument("--out", default="benchmarks/results/evaluate.json")
    args = p.parse_args(argv)
    with as_modules(args.modules):
        return _run(args)


def _run(args):
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layouts:
        return write_result(args.out, "evaluate_layouts", vars(args),
                            {"cpu": layouts(args.model, args.ipc, args.nets, max(args.rounds, 3), args.threads or 1)})
    ds = load_dataset("digits")
    images, labels = random_subset(ds, args.ipc, seed=0)
    every = {"one_network": (dict(num_nets=1), contextlib.nullcontext),
             "one_network_one_thread": (dict(num_nets=1), single_threaded),
             "k_default": (dict(num_nets=args.nets), contextlib.nullcontext),
             "k_one_by_one": (dict(num_nets=args.nets, together=False), contextlib.nullcontext),
             "k_together": (dict(num_nets=args.nets, together=True), contextlib.nullcontext)}
    runs = {name: every[name] for name in args.variants.split(",")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    accuracies = {}
    # One short untimed pass of each variant first, so one-time costs (CUDA context, cuDNN plans, vmap
    # tracing) are not charged to whichever variant is timed first.
    for kw, threads in runs.values():
        with threads():
            evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=2, model=args.model, device=device,
                            progress=False, **kw)
    for _ in range(args.rounds):
        for name, (kw, threads) in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            with threads():
                t0, c0 = time.perf_counter(), time.process_time()
                result = evaluate_synset(images, labels, ds, lr=BASELINE_LR, epochs=args.epochs, model=args.model,
                                         device=device, progress=False, **kw)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
            accuracies[name] = list(result.accuracies)
    med = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    base = "one_network" if "one_network" in med else next(iter(med))
    results = {device.split(":")[0]: {
        "seconds": med, "all_seconds": times, "cpu_seconds": cpu, "accuracies": accuracies,
        "ratio_over_one_network": {name: t / med[base] for name, t in med.items()},
        "cpu_ratio_over_one_network": {name: t / cpu[base] for name, t in cpu.items()},
        "breakdown": breakdown(args.model, args.ipc, device)}}
    return write_result(args.out, "evaluate", vars(args), results)


if __name__ == "__main__":
    main()
