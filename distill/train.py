"""The epoch loops shared by expert training and evaluation (upstream `utils.epoch`), on tensors in memory."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trajstore.errors import TrajstoreError

from .networks.student_ops import convnet_forward


def derived_seed(seed: int, index: int) -> int:
    """The seed of run `index` (an expert, an evaluation network) of a seeded job, independent of the others."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise TrajstoreError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrajstoreError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


# Below this many values in a batch's first activation (batch x width x image pixels), a step is so
# small that the Functions' Python overhead outweighs what they save: the quickstart's ConvNetW32 on 8x8
# digits breaks even at a batch of about 30 (benchmarks/RESULTS.md §8 "faster step"). Such batches run as
# the module.
FAST_STEP_MIN_VALUES = 2**17


def forward_of(net: nn.Module, min_values: int = FAST_STEP_MIN_VALUES) -> Callable[[torch.Tensor], torch.Tensor]:
    """How training and test passes run `net`: upstream's default ConvNet on the CPU from its parameters
    through student_ops' Functions, whose first-order backward is cheaper than the modules' (the first
    convolution on im2col, instance norm + ReLU + 2x2 pooling as one Function with pooling and its spread
    as contiguous adds: benchmarks/RESULTS.md §8 "faster step"); the same arithmetic up to float rounding.
    Other networks, any network on another device, and batches under min_values (see
    FAST_STEP_MIN_VALUES) run as the module."""
    ops = convnet_forward(net)
    if ops is None:
        return net
    width = net.features[0].out_channels  # the first convolution (convnet_forward checked the layers)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.shape[0] * width * x.shape[-2] * x.shape[-1] < min_values:
            return net(x)
        return ops(dict(net.named_parameters()), x)

    return forward


def train_epoch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                batch_size: int, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: str | torch.device, generator: torch.Generator | None = None) -> tuple[float, float]:
    """One pass over shuffled minibatches with cross-entropy; returns (mean loss, accuracy) seen in training.

    generator: a CPU generator for the shuffle, so a seeded run replays; None uses torch's global one.
    """
    net.train()
    device = torch.device(device)
    total_loss, correct = 0.0, 0
    forward = forward_of(net)
    for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
        optimizer.zero_grad(set_to_none=True)
        batch_loss, batch_correct = backward_batch(forward, images, labels, idx, augment=augment, device=device)
        optimizer.step()
        total_loss += batch_loss
        correct += batch_correct
    return total_loss / len(labels), correct / len(labels)


def backward_batch(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                   idx: torch.Tensor, *, augment: Callable[[torch.Tensor], torch.Tensor] | None,
                   device: torch.device) -> tuple[float, int]:
    """The minibatch `idx`, augmented, through a network's `forward_of`; cross-entropy's gradients added to
    the parameters'. Returns (summed loss, correct predictions) over the minibatch."""
    x = images[idx.to(images.device)].to(device, non_blocking=True)
    y = labels[idx.to(labels.device)].to(device, non_blocking=True)
    if augment is not None:
        x = augment(x)
    out = forward(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return loss.item() * len(y), int((out.argmax(1) == y).sum())


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512,
             device: str | torch.device) -> float:
    """Top-1 accuracy in [0, 1], in eval mode, without augmentation."""
    was_training = net.training
    net.eval()
    correct = 0
    forward = forward_of(net)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        correct += int((forward(x).argmax(1) == y).sum())
    net.train(was_training)
    return correct / len(labels)
