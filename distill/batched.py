"""K networks of one architecture trained at once: on a GPU as one stacked network (`NetStack`), on the
CPU side by side on the cores (`side_by_side`, `NetGroup`).

`NetStack`: stacked parameters, one vmapped forward and backward.

Each network keeps everything of its own: its initialisation (built by the caller), its shuffle and
its DSA draws (one CPU generator per network, consumed in the same order as `train.train_epoch`
consumes it for a network trained alone), and its optimizer state (SGD acts element by element, so
one SGD over the stacked tensors is K independent SGDs with the same hyper-parameters). The loss is
the sum of the K per-network mean losses, whose gradient with respect to network k's parameters is
exactly network k's own gradient. So K networks trained together follow the same trajectories as the
same K trained one by one, up to float rounding (the stacked convolutions add in another order).

Networks with buffers (batch norm's running statistics) are not stacked: `stackable` says so and the
callers train those one by one.

On the CPU stacking does not pay (benchmarks/RESULTS.md §8): a small network at a small batch is
compute-bound, the stacked (grouped) convolutions do the same FLOPs more slowly, and two intra-op
threads on one network wait for each other at every operation (on a busy machine, for a descheduled
thread). What pays is running whole networks at once, one per core, each on one thread: torch runs
an operation on the thread that calls it and releases the GIL meanwhile, so Python threads overlap.
`side_by_side` does that for independent runs (each network its own loop: the draws of the network
trained alone, in the same order); `NetGroup` is `NetStack`'s interface over it, one step of every
network at a time, for callers that share one optimizer over all K networks.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from trajstore.tools.threads import single_threaded

from . import train as training  # (its forward_of looked up when used: benchmarks swap it for the modules)
from .train import accuracy, backward_batch

T = TypeVar("T")


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


def cpu_workers(device: torch.device, k: int) -> int:
    """How many of k networks to run side by side: one per intra-op thread torch may use (the cores,
    unless set lower), on the CPU only; 1 means the plain loop with all the threads."""
    return min(k, torch.get_num_threads()) if device.type == "cpu" else 1


def trained_at_once(nets: Sequence[nn.Module], device: torch.device) -> "NetStack | NetGroup":
    """K networks to train at once: stacked on a GPU, side by side on the CPU's cores (see the module's doc)."""
    return NetGroup(nets, cpu_workers(device, len(nets))) if device.type == "cpu" else NetStack(nets)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def side_by_side(runs: Sequence[Iterator[T]], workers: int) -> Iterator[tuple[int, T]]:
    """Advance independent runs on `workers` threads at once; yield (run number, item) as items come.
    workers <= 1: one run after another on this thread, with torch's thread setting as it is.

    Each `next` of a run is a piece of work (an epoch). A worker takes the run that has waited
    longest, advances it once and puts it back, so the runs share the workers evenly: 5 equal runs
    on 2 workers take 2.5 runs' time, not 3. A run's items come in its own order. The runs must be
    independent of each other and of torch's global RNG (their own generators). While they run,
    torch uses one intra-op thread per worker; the first error of any run stops all and is raised.
    """
    if workers <= 1:
        for k, run in enumerate(runs):
            for item in run:
                yield k, item
        return
    ready: queue.SimpleQueue = queue.SimpleQueue()
    out: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    for k in range(len(runs)):
        ready.put(k)

    def work() -> None:
        torch.set_num_threads(1)  # this thread's own OpenMP setting
        while (k := ready.get()) is not None and not stop.is_set():
            try:
                item = next(runs[k])
            except StopIteration:
                out.put((k, _DONE))
                continue
            except BaseException as exc:  # handed to the caller's thread
                out.put((k, _Failed(exc)))
                continue
            out.put((k, item))
            ready.put(k)

    left = len(runs)
    with single_threaded():
        threads = [threading.Thread(target=work, daemon=True, name=f"side-by-side-{i}")
                   for i in range(max(1, min(workers, left)))]
        for t in threads:
            t.start()
        try:
            while left:
                k, item = out.get()
                if item is _DONE:
                    left -= 1
                elif isinstance(item, _Failed):
                    raise item.exc
                else:
                    yield k, item
        finally:
            stop.set()
            for _ in threads:
                ready.put(None)
            for t in threads:
                t.join()


class NetGroup:
    """`NetStack`'s interface over K separate networks trained side by side on the CPU's cores.

    Every network's step runs on a worker thread (one intra-op thread each): its batch, its DSA draw,
    its forward and backward; then the one optimizer over all K networks steps, as `NetStack`'s does.
    Each network computes exactly what it computes trained alone on one thread.
    """

    def __init__(self, nets: Sequence[nn.Module], workers: int):
        if not nets:
            raise ValueError("NetGroup needs at least one network")
        self.nets = list(nets)
        self.k = len(self.nets)
        self.workers = max(1, min(workers, self.k))

    def parameters(self) -> list[torch.Tensor]:
        return [p for net in self.nets for p in net.parameters()]

    def network(self, k: int) -> list[torch.Tensor]:
        return list(self.nets[k].parameters())

    def train(self, mode: bool = True) -> None:
        for net in self.nets:
            net.train(mode)

    @contextlib.contextmanager
    def _pool(self):
        """Worker threads on one intra-op thread each (and this one too meanwhile)."""
        with single_threaded(), ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads,
                                                   initargs=(1,)) as pool:
            yield pool

    def train_epoch(self, images: torch.Tensor, labels: torch.Tensor, *, optimizer: torch.optim.Optimizer,
                    batch_size: int, generators: Sequence[torch.Generator],
                    augments: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None,
                    device: torch.device) -> tuple[list[float], list[float]]:
        """`train.train_epoch` for all K networks: per network (mean loss, accuracy) seen in training."""
        self.train(True)
        n = len(labels)
        orders = [torch.randperm(n, generator=g).split(batch_size) for g in generators]
        loss_sum, correct = [0.0] * self.k, [0] * self.k
        forwards = [training.forward_of(net) for net in self.nets]

        def step(j: int) -> Callable[[int], None]:
            def one(k: int) -> None:
                batch_loss, batch_correct = backward_batch(forwards[k], images, labels, orders[k][j],
                                                           augment=None if augments is None else augments[k], device=device)
                loss_sum[k] += batch_loss
                correct[k] += batch_correct
            return one

        with self._pool() as pool:
            for j in range(len(orders[0])):
                optimizer.zero_grad(set_to_none=True)
                list(pool.map(step(j), range(self.k)))
                optimizer.step()
        return [s / n for s in loss_sum], [c / n for c in correct]

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512,
                 device: torch.device) -> list[float]:
        """`train.accuracy` of every network."""
        with self._pool() as pool:
            return list(pool.map(lambda k: accuracy(self.nets[k], images, labels, batch_size=batch_size,
                                                    device=device), range(self.k)))
