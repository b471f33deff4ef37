"""Several processes (and GPUs, and machines) on torch.distributed: launching, the group, data parallelism.

Two ways in, one code path:

- `launch(fn, nproc, ...)` (what `--nproc N` does) starts N local processes with
  torch.multiprocessing's spawn, joins them into a process group over a free localhost port (gloo on
  the CPU, NCCL for CUDA tensors) and runs `fn` in each; a process that fails takes the others down and
  the failure comes back as one TrajstoreError naming its rank.
- Under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR set in the environment) `launch` joins the group
  torchrun describes and runs `fn` in this process; torchrun's agent tears the job down when a worker dies.

Inside `fn`, `current()` is the group (None in a plain single-process run) and `device_for` the
device of this process (cuda:LOCAL_RANK with CUDA). `ShardedSteps` is the data parallelism of
distillation: every process computes the student gradient on its share of each step's synthetic
images and the shares' gradients are summed inside every step, so every process holds the same
student, images and learned lr, and the result does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from trajstore.errors import TrajstoreError

# How long a collective may wait for a process that is still alive: a process that died is noticed by
# the launcher (spawn's join, torchrun's agent) at once; this only bounds a live process that is stuck.
TIMEOUT = datetime.timedelta(minutes=30)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def counter(self, name: str) -> "Counter":
        """A counter shared by the ranks; `name` must be the same on every rank and new to the group."""
        return Counter(dist.distributed_c10d._get_default_store(), f"trajstore/{name}")

    def on_main(self, fn: Callable, *args, **kwargs):
        """fn(...) run by rank 0 only, its result (or its TrajstoreError, raised) on every rank."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except TrajstoreError as exc:
                outcome = ("error", exc)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def check_same(self, what: str, settings: dict) -> None:
        """Refuse to go on unless every rank was given the same settings."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.gather(digest)
        if len(set(digests)) > 1:
            everyone = self.gather(settings)
            diffs = sorted({k for s in everyone for k in s if any(o.get(k) != s.get(k) for o in everyone)})
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(everyone))
                               for k in diffs)
            raise TrajstoreError(f"the {self.world_size} processes were given different {what} settings "
                                 f"({detail}); start every process with the same options")


class Counter:
    """An integer shared by all ranks through the process group's key-value store (no collective)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key

    def add(self, amount: int = 1) -> int:
        """Add `amount`; the new value."""
        return int(self.store.add(self.key, amount))

    @property
    def value(self) -> int:
        return self.add(0)


def current() -> Group | None:
    """The process group this process belongs to, or None when it runs alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def under_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def device_for(device: str | torch.device | None) -> torch.device:
    """This process's device: `device` (default CUDA when present) with the local rank's GPU in a group."""
    from .train import resolve_device

    dev = resolve_device(device)
    group = current()
    if group is None or dev.type != "cuda":
        return dev
    if dev.index is not None and group.world_size > 1:
        raise TrajstoreError(f"device {device!r} names one GPU, but {group.world_size} processes each take "
                             f"their own (cuda:<local rank>): pass --device cuda")
    dev = torch.device("cuda", group.local_rank)
    torch.cuda.set_device(dev)
    return dev


def check_nproc(nproc: int, device: str | torch.device | None) -> None:
    """Refuse more local processes than GPUs when the job runs on CUDA."""
    if nproc < 1:
        raise TrajstoreError(f"--nproc {nproc}: need at least one process")
    wants_cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
    if wants_cuda:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > found:
            raise TrajstoreError(f"--nproc {nproc} processes on CUDA need {nproc} GPUs, but {found} "
                                 f"{'is' if found == 1 else 'are'} present; lower --nproc or use --device cpu")


def _backend() -> str:
    # CPU tensors (object broadcasts, the CPU path) always go through gloo; CUDA tensors through NCCL.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _joined(init_method: str, rank: int | None = None, world_size: int | None = None):
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    dist.init_process_group(_backend(), init_method=init_method, timeout=TIMEOUT, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, nproc: int | None, args: Sequence = (), kwargs: dict | None = None,
           device: str | torch.device | None = None):
    """fn(*args, **kwargs) in a process group; rank 0's return value (None on the other ranks).

    Under torchrun: in this process, in the group torchrun set up (nproc must be None or 1: torchrun
    decides the count). nproc None or 1 otherwise: a plain call, no group. nproc > 1: that many spawned
    local processes; fn, args and kwargs must be picklable (module-level functions, plain values).
    """
    kwargs = dict(kwargs or {})
    if under_torchrun() and not dist.is_initialized():
        if nproc not in (None, 1):
            raise TrajstoreError("--nproc starts local processes itself; under torchrun the process count is "
                                 "torchrun's --nproc-per-node (leave --nproc out)")
        with _joined("env://"):
            check_nproc(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
            value = fn(*args, **kwargs)
            return value if dist.get_rank() == 0 else None
    if nproc in (None, 1) or dist.is_initialized():
        return fn(*args, **kwargs)
    check_nproc(nproc, device)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors, results = ctx.SimpleQueue(), ctx.SimpleQueue()
    port = _free_port()
    procs = mp.start_processes(_worker, args=(nproc, port, fn, args, kwargs, errors, results), nprocs=nproc,
                               join=False, start_method="spawn")
    try:
        while not procs.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        codes = [p.exitcode for p in procs.processes]
        raise TrajstoreError(_failure_message(exc.error_index, codes, failures, nproc)) from None
    finally:
        for p in procs.processes:  # an interrupt (Ctrl-C) in the parent ends the workers too
            if p.is_alive():
                p.terminate()
    return results.get() if not results.empty() else None


def _failure_message(first: int, codes: list[int | None], failures: list[tuple[int, str, bool]],
                     nproc: int) -> str:
    """One line on what went wrong. When one process fails, the others fail too (their collectives
    lose a peer) or are stopped; the cause is bad input (a TrajstoreError) if any process reported
    one, else a process that died without reporting (killed, os._exit; one aborted by gloo only if no
    other died), else the first report."""
    reported = {rank for rank, _, _ in failures}
    stopped = (None, 0, 1, -signal.SIGTERM, -signal.SIGKILL)  # 1: a worker that reported; signals: ours
    died = [r for r, code in enumerate(codes) if r not in reported and (code not in stopped or r == first)]
    for rank, message, input_error in failures:
        if input_error:
            return f"process {rank} of {nproc} failed: {message}"
    if died:
        # a peer's death makes gloo abort the processes waiting on it (SIGABRT), and the one join() noticed
        # first may be such a bystander: a death of another kind, where there is one, is the cause
        causes = [r for r in died if codes[r] != -signal.SIGABRT] or died
        rank = first if first in causes else causes[0]
        code = codes[rank]
        how = f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else (
            f"exited with code {code}")
        return f"process {rank} of {nproc} {how}; the others were stopped"
    rank, message, _ = next((f for f in failures if f[0] == first), failures[0])
    return f"process {rank} of {nproc} failed: {message}"


def _worker(rank: int, nproc: int, port: int, fn: Callable, args, kwargs, errors, results) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(nproc)
    # torch's thread count is left as a single process has it: CPU kernels sum in an order that depends
    # on it, and expert i must come out bit for bit the same whatever the process count.
    try:
        with _joined(f"tcp://127.0.0.1:{port}", rank, nproc):
            value = fn(*args, **kwargs)
    except TrajstoreError as exc:
        errors.put((rank, str(exc), True))
        sys.exit(1)
    except BaseException as exc:  # a bug, or a peer's death seen from here: keep the last lines
        lines = "".join(traceback.format_exception(exc)).strip().splitlines()
        errors.put((rank, " | ".join(line.strip() for line in lines[-3:]), False))
        sys.exit(1)
    if rank == 0:
        results.put(value)


# -- data parallelism over the synthetic images of each student step --------------------------------


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: identity, since what consumes the sum is computed the same
    way on every rank (one loss, replicated), so its gradient is already the gradient of every term."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Replicated(torch.autograd.Function):
    """Forward: identity. Backward: the sum over ranks. Marks where a replicated value (the student's
    parameters) enters one rank's share of the work, so its gradient collects every rank's share; the
    backward is itself differentiable, which second-order unrolls (memory="plain") need."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad)


@dataclass(frozen=True)
class Share:
    """This rank's rows [start, start + count) of a student step's minibatch of `total` images."""

    start: int
    count: int
    total: int

    def gradient(self, student, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, seed: int, augment,
                 create_graph: bool) -> torch.Tensor:
        """The gradient of the whole minibatch's mean cross-entropy w.r.t. theta, given this rank's rows x.

        A rank with no rows (a minibatch smaller than the process count) gets one row weighted 0, so it
        still takes part in the step's all-reduces, forward and backward.
        """
        if augment is not None:  # rows of the whole batch's transform: the same for any process count
            x = augment(x, seed, rows=(self.start if self.count else 0, self.total))
        out = student(_Replicated.apply(theta), x)
        weight = 1.0 / self.total if self.count else 0.0
        loss = torch.nn.functional.cross_entropy(out, y, reduction="sum") * weight
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


class ShardedSteps:
    """The matcher's data-parallel hook: splits each step's images over the ranks, sums the gradients.

    The student gradient of a step is that of the mean cross-entropy over its `total` images; each rank
    takes a contiguous share of the rows (numpy.array_split's), computes sum(cross-entropy) / total on
    it, and the parameters enter the share through `_Replicated`, so the gradient w.r.t. them is the sum
    over ranks: the whole step's gradient, on every rank, in the forward unroll and in its backward.
    """

    def __init__(self, group: Group):
        self.group = group

    def share(self, total: int) -> Share:
        q, r = divmod(total, self.group.world_size)  # the first total % world ranks get one row more
        start = self.group.rank * q + min(self.group.rank, r)
        return Share(start, q + (1 if self.group.rank < r else 0), total)

    def localize(self, plan: list) -> list:
        """The plan's steps cut down to this rank's rows (steps are distill.matching.UnrollStep)."""
        out = []
        for step in plan:
            share = self.share(len(step.indices))
            rows = step.indices[share.start:share.start + share.count] if share.count else step.indices[:1]
            out.append(replace(step, indices=rows, share=share))
        return out

    def reduce_gradients(self, images: torch.Tensor, syn_lr: torch.Tensor) -> None:
        """After backward: the images' gradient summed over the ranks (each holds its shares' rows); the
        lr's gradient is already the same everywhere and is taken from rank 0 so the ranks never drift."""
        if images.grad is not None:
            self.group.sum_(images.grad)
        if syn_lr.grad is not None:
            dist.broadcast(syn_lr.grad, src=0)


def parallel_evaluation(group: Group | None, num_nets: int, evaluate: Callable[[Sequence[int]], Sequence[float]]
                        ) -> list[float]:
    """Accuracies of networks 0..num_nets-1, network k trained by rank k % world_size; `evaluate(indices)`
    trains and tests the networks numbered `indices` (each from its own seed) in this process."""
    if group is None:
        return list(evaluate(range(num_nets)))
    mine = list(range(group.rank, num_nets, group.world_size))
    results = group.gather(list(evaluate(mine)) if mine else [])
    accuracies = [0.0] * num_nets
    for rank, values in enumerate(results):
        for k, acc in zip(range(rank, num_nets, group.world_size), values):
            accuracies[k] = acc
    return accuracies
