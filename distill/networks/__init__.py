"""The networks of upstream MTT's `networks.py`, one module per family, with upstream's module names,
parameter order and defaults.

Legacy buffers store `list(net.parameters())` without names, so each network's parameter order and
module indices must match upstream's for buffers to map 1:1; each family's table lives in
`trajstore.architectures` (shapes alone, no torch), and each module here builds the network of one
family, ending in `NETWORK = <its nn.Module class>` (whose `spec` is the family's description). This
registry collects them, so adding a family is one file here and one there.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from trajstore import architectures
from trajstore.architectures.base import ArchSpec
from trajstore.architectures.convnet import ConvNetSpec
from trajstore.errors import InvalidTensorError, TrajstoreError

from .convnet import ConvNet
from .student_ops import convnet_forward


class ModelError(TrajstoreError, ValueError):
    """An unknown network name or an unsupported configuration."""


# The family's configurations live with the layer tables trajstore infers names from, so the two
# can never disagree; a ConvNet is built from one.
ConvNetConfig = ConvNetSpec


def _discover() -> dict[type[ArchSpec], type[nn.Module]]:
    networks = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        network = getattr(importlib.import_module(f"{__name__}.{info.name}"), "NETWORK", None)
        if network is not None:
            networks[network.spec] = network
    return networks


NETWORKS: dict[type[ArchSpec], type[nn.Module]] = _discover()


def config_for(model: str, channel: int, num_classes: int, im_size: Sequence[int]) -> ArchSpec:
    """Upstream names: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, MLP, LeNet, AlexNet, VGG11, ResNet18, ..."""
    try:
        return architectures.spec_for(model, channel, num_classes, im_size)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def build_spec(spec: ArchSpec) -> nn.Module:
    """The network a description describes (its parameter table is `spec.layers()`)."""
    network = NETWORKS.get(type(spec))
    if network is None:
        raise ModelError(f"no network is registered for the {spec.family} family (distill/networks/)")
    try:
        spec.layers()  # refuses images too small for the network, before any module is made
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    return network(spec)


def build(model: str = "ConvNet", channel: int = 3, num_classes: int = 10,
          im_size: Sequence[int] = (32, 32)) -> nn.Module:
    """Upstream's `get_network(model, channel, num_classes, im_size)` (without its seeding and moving)."""
    return build_spec(config_for(model, channel, num_classes, im_size))


def flat_parameters(net: nn.Module) -> torch.Tensor:
    """All parameters, in `parameters()` order, as one vector (MTT's flattening)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


class FunctionalNet:
    """Runs a network from one flat parameter vector, so students can be unrolled and differentiated.

    BatchNorm layers of `net` are switched to batch statistics for good: upstream's student (a
    ReparamModule in train mode) normalises each batch with its own statistics, and a trajectory holds
    parameters only, so there are no running statistics to start from. Without them the student is a
    pure function of (flat, x): unrolling updates no buffer, and a recomputation sees the same network.
    """

    def __init__(self, net: nn.Module):
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = module.running_var = module.num_batches_tracked = None
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.numels = [p.numel() for _, p in net.named_parameters()]
        self.num_params = sum(self.numels)
        # upstream's default ConvNet runs with cheaper second derivatives (student_ops); others as modules
        self._forward = convnet_forward(net)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.numel() != self.num_params:
            raise InvalidTensorError(f"flat vector has {flat.numel()} values, the network {self.num_params}")
        return {n: p.view(s) for n, p, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._forward is not None:
            return self._forward(self.unflatten(flat), x)
        return functional_call(self.net, self.unflatten(flat), (x,))
