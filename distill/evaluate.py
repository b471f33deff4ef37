"""Evaluate a distilled set with the family's protocol, and the "Random" real-subset baseline.

Protocol (upstream `utils.evaluate_synset`, docs/legacy-formats.md §6): fresh networks trained on the
set with SGD (momentum 0.9, weight decay 5e-4, batch 256) at the learned lr for epochs + 1 passes, the lr
multiplied by 0.1 (with a fresh optimizer, as upstream) after pass epochs // 2 + 1, DSA on; then the test
accuracy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from trajstore.errors import TrajstoreError

from .augment import STRATEGY, seeded_dsa
from .batched import NetStack, cpu_workers, side_by_side, stackable
from .data import Dataset, load_dataset
from .networks import build
from .synset import load_synset, load_upstream, save_grid
from .train import accuracy, derived_seed, resolve_device, train_epoch

EPOCHS = 1000
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 256
BASELINE_LR = 0.01  # upstream's lr_net default, used for real-image baselines


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies in [0, 1] of each network, their mean and (population) std, as upstream reports."""

    mean: float
    std: float
    accuracies: tuple[float, ...]

    @classmethod
    def of(cls, accuracies) -> "EvalResult":
        return cls(float(np.mean(accuracies)), float(np.std(accuracies)), tuple(accuracies))

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.std:.2f} % over {len(self.accuracies)} networks"


def evaluate_synset(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, *, lr: float, num_nets: int = 5,
                    epochs: int | None = None, model: str = "ConvNet", dsa: bool = True, seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = True,
                    batch_size: int = BATCH_SIZE, dsa_strategy: str = STRATEGY,
                    together: bool | None = None, nets: Sequence[int] | None = None) -> EvalResult:
    """Train num_nets fresh `model`s on (images, labels) and test them on dataset's test set.

    together: True trains the networks at once as one stacked network (`batched.NetStack`; same
    protocol, same draws per network, same accuracies up to float rounding), False one after another.
    None: stacked on a GPU, where one small network leaves it mostly idle; on the CPU, where stacking
    does not pay, side by side, one network per core, each on one thread (`batched.side_by_side`:
    each network its own plain loop), or with one core or one network the plain loop on all threads
    (see benchmarks/RESULTS.md §8). Networks with batch norm are never stacked.
    nets: train only the networks with these numbers (< num_nets, each from its own seed), as processes
    that share an evaluation do (distill.distributed.parallel_evaluation); default all of them.
    """
    epochs = EPOCHS if epochs is None else int(epochs)
    if num_nets < 1 or epochs < 0 or not lr > 0:
        raise TrajstoreError(f"need num_nets >= 1, epochs >= 0 and lr > 0 (got {num_nets}, {epochs}, {lr})")
    if tuple(images.shape[1:]) != (dataset.channel, *dataset.im_size):
        raise TrajstoreError(f"images of shape {tuple(images.shape[1:])} do not fit {dataset.name}'s "
                             f"{(dataset.channel, *dataset.im_size)}")
    dev = resolve_device(device)
    images, labels = images.detach().to(dev, torch.float32), labels.to(dev, torch.int64)
    test_images, test_labels = dataset.test_images.to(dev), dataset.test_labels.to(dev)
    numbers = range(num_nets) if nets is None else list(nets)
    if not numbers or not all(0 <= k < num_nets for k in numbers):
        raise TrajstoreError(f"network numbers {list(numbers)} are not a non-empty part of 0..{num_nets - 1}")
    nets, generators = [], []
    for k in numbers:
        s = derived_seed(seed, k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            nets.append(build(model, dataset.channel, dataset.num_classes, dataset.im_size).to(dev))
        generators.append(torch.Generator().manual_seed(s))
    augments = [seeded_dsa(g, dsa_strategy) for g in generators] if dsa else None
    workers = 1
    if together is None:
        together, workers = dev.type == "cuda", cpu_workers(dev, len(nets))
    schedule = _Schedule(float(lr), epochs)
    with tqdm(total=len(nets) * (epochs + 1), desc="evaluate", unit="epoch", disable=not progress) as bar:
        if together and stackable(nets[0]):
            stack = NetStack(nets)
            optimizer = schedule.optimizer(stack.parameters())
            for ep in range(epochs + 1):
                stack.train_epoch(images, labels, optimizer=optimizer, batch_size=batch_size,
                                  generators=generators, augments=augments, device=dev)
                optimizer = schedule.after_epoch(ep, stack.parameters(), optimizer)
                bar.update(len(nets))
            accuracies = stack.accuracy(test_images, test_labels, device=dev)
        else:
            runs = [_network(net, images, labels, (test_images, test_labels), schedule, batch_size=batch_size,
                             augment=augments[k] if dsa else None, generator=generators[k], device=dev)
                    for k, net in enumerate(nets)]
            accuracies = [0.0] * len(nets)
            for k, item in side_by_side(runs, workers):
                if item is None:  # an epoch done
                    bar.update()
                else:
                    accuracies[k] = item
                    bar.set_postfix(last=f"{100 * item:.2f}%")
    return EvalResult.of(accuracies)


def _network(net, images, labels, test, schedule: "_Schedule", *, batch_size: int, augment, generator,
             device: torch.device):
    """One network of the protocol: None after each of its epochs + 1 passes, then its test accuracy."""
    optimizer = schedule.optimizer(net.parameters())
    for ep in range(schedule.epochs + 1):
        train_epoch(net, images, labels, optimizer=optimizer, batch_size=batch_size, augment=augment,
                    device=device, generator=generator)
        optimizer = schedule.after_epoch(ep, net.parameters(), optimizer)
        yield None
    yield accuracy(net, *test, device=device)


class _Schedule:
    """The protocol's SGD: lr, momentum 0.9, weight decay 5e-4; after pass epochs // 2 + 1 a fresh
    optimizer at a tenth of the lr (as upstream)."""

    def __init__(self, lr: float, epochs: int):
        self.rate, self.epochs = lr, epochs
        self.decay_after = epochs // 2 + 1

    def optimizer(self, params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def after_epoch(self, ep: int, params, optimizer: torch.optim.SGD) -> torch.optim.SGD:
        if ep != self.decay_after:
            return optimizer
        return torch.optim.SGD(params, lr=optimizer.param_groups[0]["lr"] * 0.1, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY)


def random_subset(dataset: Dataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc random real training images of every class, class by class (the "Random" baseline's set)."""
    if ipc < 1:
        raise TrajstoreError(f"ipc must be >= 1, got {ipc}")
    rng = np.random.default_rng(seed)
    labels = dataset.train_labels.numpy()
    picks = []
    for c in range(dataset.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < ipc:
            raise TrajstoreError(f"class {c} of {dataset.name} has {len(idx)} training images, fewer than ipc={ipc}")
        picks.append(rng.permutation(idx)[:ipc])
    idx = torch.from_numpy(np.concatenate(picks))
    return dataset.train_images[idx].clone(), dataset.train_labels[idx].clone()


def evaluate_file(path: str | os.PathLike, *, data_path: str | os.PathLike | None = None, num_nets: int = 5,
                  epochs: int | None = None, model: str | None = None, dsa: bool = True, seed: int = 0,
                  device: str | torch.device | None = None, progress: bool = True,
                  grid: str | os.PathLike | None = None, overwrite: bool = False,
                  together: bool | None = None) -> EvalResult:
    """Evaluate a distilled-set file on the test set of the data it was distilled from.

    The test set is whitened with the file's own ZCA state, so it matches the set exactly. model
    defaults to the file's (else ConvNet); grid, when given, is where the set's PNG grid goes
    (replacing an existing file only with overwrite).
    """
    syn = load_synset(path)
    meta = syn.meta
    dataset = load_dataset(meta["dataset"], data_path=data_path, im_size=meta["im_size"],
                           channels=meta.get("channel", syn.images.shape[1]),
                           zca=syn.zca or False, seed=int(meta.get("split_seed", 0)))
    if grid is not None:
        save_grid(grid, syn.images, syn.labels, syn, class_names=dataset.class_names, overwrite=overwrite)
    return evaluate_synset(syn.images, syn.labels, dataset, lr=syn.lr, num_nets=num_nets, epochs=epochs,
                           model=model or meta.get("model", "ConvNet"), dsa=dsa, seed=seed, device=device,
                           progress=progress, together=together)


def evaluate_random(dataset: str = "digits", *, ipc: int, data_path: str | os.PathLike | None = None,
                    zca: bool = False, lr: float = BASELINE_LR, num_nets: int = 5, epochs: int | None = None,
                    model: str = "ConvNet", dsa: bool = True, seed: int = 0,
                    device: str | torch.device | None = None, progress: bool = True,
                    grid: str | os.PathLike | None = None, overwrite: bool = False,
                    together: bool | None = None) -> EvalResult:
    """The "Random" baseline: a random real subset of ipc images per class, evaluated like a distilled set."""
    ds = load_dataset(dataset, data_path=data_path, zca=zca)
    images, labels = random_subset(ds, ipc, seed)
    if grid is not None:
        save_grid(grid, images, labels, ds, overwrite=overwrite)
    return evaluate_synset(images, labels, ds, lr=lr, num_nets=num_nets, epochs=epochs, model=model, dsa=dsa,
                           seed=seed, device=device, progress=progress, together=together)


def evaluate_upstream(path: str | os.PathLike, *, dataset: str = "digits", data_path: str | os.PathLike | None = None,
                      zca: bool = False, lr: float | None = None, num_nets: int = 5, epochs: int | None = None,
                      model: str = "ConvNet", dsa: bool = True, seed: int = 0,
                      device: str | torch.device | None = None, progress: bool = True,
                      grid: str | os.PathLike | None = None, overwrite: bool = False,
                      together: bool | None = None) -> EvalResult:
    """Evaluate a set saved the upstream way: `images_X.pt`, `labels_X.pt` and, when present, `lr_X.pt`
    beside it (distill.synset.load_upstream). `lr` overrides the saved one. The files carry no metadata,
    so the dataset (and whether the set lives in ZCA space, fitted on the training set as upstream) is named;
    the image size and channels are the images' own."""
    images, labels, saved_lr = load_upstream(path)
    rate = lr if lr is not None else saved_lr
    if rate is None:
        raise TrajstoreError("no learned lr beside the images (lr_<same>.pt): pass --lr", path)
    ds = load_dataset(dataset, data_path=data_path, zca=zca, im_size=tuple(images.shape[-2:]),
                      channels=images.shape[1])  # the size the set was distilled at
    if int(labels.max()) >= ds.num_classes:
        raise TrajstoreError(f"labels go up to {int(labels.max())} but {ds.name} has {ds.num_classes} classes: "
                             "pass the set's --dataset", path)
    if grid is not None:
        save_grid(grid, images, labels, ds, overwrite=overwrite)
    return evaluate_synset(images, labels, ds, lr=rate, num_nets=num_nets, epochs=epochs, model=model, dsa=dsa,
                           seed=seed, device=device, progress=progress, together=together)
