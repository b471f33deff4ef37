"""K networks of one architecture trained as one: stacked parameters, one vmapped forward and backward.

Each network keeps everything of its own: its initialisation (built by the caller), its shuffle and
its DSA draws (one CPU generator per network, consumed in the same order as `train.train_epoch`
consumes it for a network trained alone), and its optimizer state (SGD acts element by element, so
one SGD over the stacked tensors is K independent SGDs with the same hyper-parameters). The loss is
the sum of the K per-network mean losses, whose gradient with respect to network k's parameters is
exactly network k's own gradient. So K networks trained together follow the same trajectories as the
same K trained one by one, up to float rounding (the stacked convolutions add in another order).

Networks with buffers (batch norm's running statistics) are not stacked: `stackable` says so and the
callers train those one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def stackable(net: nn.Module) -> bool:
    """Whether `NetStack` can train copies of `net`: no buffers to update in the forward pass."""
    return next(net.buffers(), None) is None


class NetStack:
    """K same-shaped networks as stacked (K, ...) parameter tensors."""

    def __init__(self, nets: Sequence[nn.Module]):
        if not nets:
            raise ValueError("NetStack needs at least one network")
        if not all(stackable(n) for n in nets):
            raise ValueError("networks with buffers (batch norm) cannot be stacked; train them one by one")
        params, _ = stack_module_state(list(nets))
        self.names = [n for n, _ in nets[0].named_parameters()]
        self.params = {n: params[n].detach().requires_grad_(True) for n in self.names}
        self.k = len(nets)
        base = copy.deepcopy(nets[0]).to("meta")
        base.train()

        def one(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, p, (x,))

        self._base = base
        self._each = vmap(one)                       # (K, B, ...) inputs: one batch per network
        self._shared = vmap(one, in_dims=(0, None))  # one batch for all networks (testing)

    def parameters(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names]

    def network(self, k: int) -> list[torch.Tensor]:
        """Network k's parameters in `parameters()` order (views of the stack)."""
        return [self.params[n][k] for n in self.names]

    def train(self, mode: bool = True) -> None:
        self._base.train(mode)

    def train_epoch(self, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                    batch_size: int, generators: Sequence[torch.Generator],
                    augments: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None,
                    device: torch.device) -> tuple[list[float], list[float]]:
        """`train.train_epoch` for all K networks: per network (mean loss, accuracy) seen in training."""
        self.train(True)
        n = len(labels)
        orders = [torch.randperm(n, generator=g).split(batch_size) for g in generators]
        loss_sum = torch.zeros(self.k, device=device)
        correct = torch.zeros(self.k, dtype=torch.long, device=device)
        for j in range(len(orders[0])):
            xs, ys = [], []
            for k, order in enumerate(orders):
                idx = order[j]
                x = images[idx.to(images.device)].to(device, non_blocking=True)
                if augments is not None:
                    x = augments[k](x)
                xs.append(x)
                ys.append(labels[idx.to(labels.device)].to(device, non_blocking=True))
            x, y = torch.stack(xs), torch.stack(ys)
            out = self._each(self.params, x)  # (K, B, classes)
            losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            loss_sum += losses.detach() * y.shape[1]
            correct += (out.detach().argmax(2) == y).sum(1)
        return (loss_sum / n).tolist(), (correct.double() / n).tolist()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512,
                 device: torch.device) -> list[float]:
        """`train.accuracy` of every network: top-1 in eval mode, without augmentation."""
        self.train(False)
        correct = torch.zeros(self.k, dtype=torch.long, device=device)
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            correct += (self._shared(self.params, x).argmax(2) == y).sum(1)
        self.train(True)
        return (correct.double() / len(labels)).tolist()
