"""The matching loop side by side: trajstore's Matcher (`distill --method mtt`) against a re-implementation
of upstream MTT's `distill.py` loop written here.

    python -m benchmarks.bench_upstream_loop [--iterations 21] [--device cpu|cuda] [--profile]

Upstream's script is not in the repository, so `UpstreamLoop` below re-implements what one iteration of
its `distill.py` does, step for step (read from GeorgeCazenavette/mtt-distillation, distill.py and
reparam_module.py): a fresh randomly initialised student wrapped ReparamModule-style (its parameters
deleted and replaced by views of one flat vector on every forward), a start epoch from
np.random.randint(0, max_start_epoch), start and target flattened with torch.cat, N steps of
`x = syn[idx]; DiffAugment; CE; grad(create_graph=True); p - syn_lr * grad`, the loss
mse(sum)/num_params over mse(sum)/num_params, backward, two SGD steps (momentum 0.5), and
`grand_loss.item()` every 10 iterations. Its DiffAugment is trajstore's `augment.dsa` drawing from
torch's global generator (the same one-operation-per-call DSA upstream uses, operation for operation).

Both loops read the same MTT buffer (random-walk ConvNet trajectories; timings do not depend on the
weight values) and train the same synthetic set shape: ConvNet (depth 3, width 128, instance norm) on
3x32x32 digits, ipc 1 (10 images), N = 20, M = 2, no evaluation. The two take turns iteration by
iteration, so load from other jobs on a shared machine falls on both alike; s/iteration is
(time of `iterations` iterations - time of the first) / (iterations - 1) per loop, in wall seconds and
in this process's CPU seconds (`time.process_time`, which a loaded machine disturbs far less).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import add_device_option, check_device, write_result
from benchmarks.synthetic import convnet_layers, write_pair
from trajstore.distill.augment import dsa
from trajstore.distill.data import load_dataset
from trajstore.distill.matching import MatchConfig, Matcher, SyntheticSet
from trajstore.distill.networks import FunctionalNet, build
from trajstore.distill.run import open_experts


class ReparamNet(nn.Module):
    """Upstream's ReparamModule, reduced to what distill.py uses: forward(x, flat_param=...) runs the
    wrapped network with its parameters replaced by views of flat_param (deleted as parameters at wrap
    time, set as plain attributes on every call)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        infos, params = [], []
        for mn, m in self.named_modules():
            for n, p in m.named_parameters(recurse=False):
                infos.append((mn, n))
                params.append(p.detach())
        self._infos = tuple(infos)
        self._numels = tuple(p.numel() for p in params)
        self._shapes = tuple(p.size() for p in params)
        self.flat_param = nn.Parameter(torch.cat([p.reshape(-1) for p in params], 0))
        for mn, n in self._infos:
            delattr(self._module(mn), n)
        self._unflatten(self.flat_param)

    def _module(self, mn: str) -> nn.Module:
        m = self
        for part in mn.split(".") if mn else ():
            m = getattr(m, part)
        return m

    def _unflatten(self, flat: torch.Tensor) -> None:
        views = (t.view(s) for t, s in zip(flat.split(self._numels), self._shapes))
        for (mn, n), p in zip(self._infos, views):
            setattr(self._module(mn), n, p)

    def forward(self, x: torch.Tensor, flat_param: torch.Tensor) -> torch.Tensor:
        flat_param = torch.squeeze(flat_param)
        saved = [getattr(self._module(mn), n) for mn, n in self._infos]
        self._unflatten(flat_param)
        try:
            return self.module(x)
        finally:
            for (mn, n), p in zip(self._infos, saved):
                setattr(self._module(mn), n, p)


class UpstreamLoop:
    """One upstream distill.py iteration per `step()` (see the module docstring)."""

    def __init__(self, buffer: list, images: torch.Tensor, labels: torch.Tensor, channel: int, num_classes: int,
                 im_size, *, model: str, syn_steps: int, expert_epochs: int, max_start_epoch: int, lr_teacher: float,
                 device: str):
        self.buffer, self.channel, self.num_classes, self.im_size = buffer, channel, num_classes, im_size
        self.model = model
        self.syn_steps, self.expert_epochs, self.max_start_epoch = syn_steps, expert_epochs, max_start_epoch
        self.device = device
        self.image_syn = images.detach().clone().to(device).requires_grad_(True)
        self.label_syn = labels.clone().to(device)
        self.syn_lr = torch.tensor(lr_teacher).to(device).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=1000.0, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=1e-5, momentum=0.5)
        self.batch_syn = len(self.label_syn)
        self.it = 0

    def step(self) -> None:
        dev = self.device
        student_net = ReparamNet(build(self.model, self.channel, self.num_classes, self.im_size).to(dev))
        student_net.train()
        num_params = sum([np.prod(p.size()) for p in student_net.parameters()])
        expert_trajectory = self.buffer[np.random.randint(0, len(self.buffer))]
        start_epoch = np.random.randint(0, self.max_start_epoch)
        starting_params = expert_trajectory[start_epoch]
        target_params = expert_trajectory[start_epoch + self.expert_epochs]
        target_params = torch.cat([p.data.to(dev).reshape(-1) for p in target_params], 0)
        student_params = [torch.cat([p.data.to(dev).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
        starting_params = torch.cat([p.data.to(dev).reshape(-1) for p in starting_params], 0)
        indices_chunks: list = []
        for _ in range(self.syn_steps):
            if not indices_chunks:
                indices_chunks = list(torch.split(torch.randperm(len(self.image_syn)), self.batch_syn))
            these = indices_chunks.pop()
            x = dsa(self.image_syn[these], None)
            out = student_net(x, flat_param=student_params[-1])
            ce_loss = F.cross_entropy(out, self.label_syn[these])
            grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)
        param_loss = torch.tensor(0.0).to(dev)
        param_dist = torch.tensor(0.0).to(dev)
        param_loss += F.mse_loss(student_params[-1], target_params, reduction="sum")
        param_dist += F.mse_loss(starting_params, target_params, reduction="sum")
        param_loss /= num_params
        param_dist /= num_params
        param_loss /= param_dist
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        param_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        param_loss.detach().cpu()  # upstream's wandb.log of the loss
        if self.it % 10 == 0:
            param_loss.item()
        self.it += 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=21)
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--timesteps", type=int, default=11, help="epochs + 1 of each stand-in trajectory")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 gives stable timings on a shared machine")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's op table of one "
                   "iteration of each loop")
    add_device_option(p)
    p.add_argument("--out", default="benchmarks/results/upstream_loop.json")
    args = p.parse_args(argv)
    device = check_device(args.device)
    torch.set_num_threads(args.threads)
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2")
    ds = load_dataset("digits", im_size=(32, 32), channels=3)
    model = "ConvNet" if args.width == 128 else f"ConvNetW{args.width}"
    max_start = args.timesteps - 1 - args.expert_epochs
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        layers = convnet_layers(width=args.width, num_classes=ds.num_classes)
        files, _ = write_pair(Path(tmp), layers, experts=args.experts, num_timesteps=args.timesteps,
                              per_file=args.experts)
        experts = open_experts(files[0], "mtt", model=model)
        synset = SyntheticSet.from_real(ds.train_images, ds.train_labels, args.ipc, 0.01, rng=rng, device=device)
        student = FunctionalNet(build(model, ds.channel, ds.num_classes, ds.im_size))
        config = MatchConfig(syn_steps=args.syn_steps, expert_epochs=args.expert_epochs, max_start_epoch=max_start)
        matcher = Matcher(experts.source, synset, student, config, rng=rng, augment=dsa)
        buffer = torch.load(files[0], weights_only=True)  # upstream holds its buffer in RAM
        upstream = UpstreamLoop(buffer, synset.images, synset.labels, ds.channel, ds.num_classes, ds.im_size,
                                model=model, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
                                max_start_epoch=max_start, lr_teacher=0.01, device=device)
        loops = {"upstream_reimplementation": upstream.step, "trajstore_matcher": matcher.step}
        times: dict[str, list[float]] = {name: [] for name in loops}
        cpu_times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.iterations):
            for name, step in loops.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
        if args.profile:
            from torch.profiler import profile

            for name, step in loops.items():
                with profile() as prof:
                    step()
                print(f"--- {name}: one iteration")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    per_it = {name: (sum(t) - t[0]) / (len(t) - 1) for name, t in times.items()}
    cpu_per_it = {name: (sum(t) - t[0]) / (len(t) - 1) for name, t in cpu_times.items()}
    # each iteration's ratio against the upstream iteration run just before it: the spread says how well
    # the load on a shared machine lets this many iterations resolve the ratio
    paired = {kind: np.array(t["trajstore_matcher"][1:]) / np.array(t["upstream_reimplementation"][1:])
              for kind, t in (("wall", times), ("cpu", cpu_times))}
    spread = {kind: {"median": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
                     "q75": float(np.quantile(r, 0.75)), "min": float(r.min()), "max": float(r.max())}
              for kind, r in paired.items()}
    results = {device.split(":")[0]: {
        "seconds_per_iteration": per_it, "iteration_seconds": times,
        "cpu_seconds_per_iteration": cpu_per_it, "iteration_cpu_seconds": cpu_times,
        "ratio_trajstore_over_upstream": per_it["trajstore_matcher"] / per_it["upstream_reimplementation"],
        "cpu_ratio_trajstore_over_upstream":
            cpu_per_it["trajstore_matcher"] / cpu_per_it["upstream_reimplementation"],
        "per_iteration_ratio_spread": spread}}
    print(f"s/it upstream {per_it['upstream_reimplementation']:.3f}, trajstore {per_it['trajstore_matcher']:.3f} "
          f"(wall {results[device.split(':')[0]]['ratio_trajstore_over_upstream']:.3f}x, "
          f"CPU time {results[device.split(':')[0]]['cpu_ratio_trajstore_over_upstream']:.3f}x; per-iteration "
          f"CPU ratio median {spread['cpu']['median']:.3f}, quartiles {spread['cpu']['q25']:.3f}-"
          f"{spread['cpu']['q75']:.3f})")
    return write_result(args.out, "upstream_loop", vars(args), results)


if __name__ == "__main__":
    main()
