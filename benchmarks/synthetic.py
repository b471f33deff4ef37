"""Stand-in trajectories for the speed benchmarks, whose timings do not depend on weight values.

(The storage and convergence benchmarks use real trained experts instead.)
"""

from __future__ import annotations

from pathlib import Path

import torch

import trajstore


def convnet_layers(width: int = 128, depth: int = 3, im_size: int = 32, num_classes: int = 10, channel: int = 3):
    """The upstream ConvNet's parameter table (docs/legacy-formats.md §3) for the given variant."""
    layers, c = [], channel
    for d in range(depth):
        i = 4 * d
        layers += [(f"features.{i}.weight", (width, c, 3, 3)), (f"features.{i}.bias", (width,)),
                   (f"features.{i + 1}.weight", (width,)), (f"features.{i + 1}.bias", (width,))]
        c = width
    feat = width * (im_size // 2**depth) ** 2
    layers += [("classifier.weight", (num_classes, feat)), ("classifier.bias", (num_classes,))]
    return layers


def random_walk(layers, num_timesteps: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.05 for _, s in layers]
    traj = []
    for _ in range(num_timesteps):
        traj.append([p.clone() for p in params])
        params = [p + 0.002 * torch.randn(p.shape, generator=g) for p in params]
    return traj


def write_pair(root: Path, layers, *, experts: int, num_timesteps: int, per_file: int = 10,
               waypoints=()) -> tuple[list[Path], Path]:
    """The same trajectories as an MTT buffer (torch.save of lists) and as a .ctraj."""
    root.mkdir(parents=True, exist_ok=True)
    files, batch = [], []
    ctraj = root / "experts.ctraj"
    with trajstore.create(ctraj, layers, num_timesteps, waypoints=waypoints, overwrite=True) as w:
        for i in range(experts):
            traj = random_walk(layers, num_timesteps, seed=i)
            w.write_expert(traj)
            batch.append(traj)
            if len(batch) == per_file or i == experts - 1:
                files.append(root / f"replay_buffer_{len(files)}.pt")
                torch.save(batch, files[-1])
                batch = []
    return files, ctraj
