"""One iteration of trajectory-matching distillation (MTT's Eq. 2, the loss MCT keeps).

A student starts at an expert's parameters, takes N = syn_steps SGD steps on minibatches of the
synthetic set with the learnable lr, and is scored by how close it lands to the expert's target:

    L = ||theta_N - target||^2 / ||start - target||^2

(upstream divides both sums by the parameter count; the factors cancel). Three ways to get the
gradients of the images and the lr (`memory=`):

- "plain": the exact gradient through the whole unrolled graph, as MTT's distill.py. Memory grows
  with N steps of activations.
- "constant": the same exact gradient (Hessian-vector products included) by walking the steps
  backwards and recomputing each one; keeps the N parameter vectors instead of N steps of activations.
- "tesla": the first-order rule the MCT authors' code distills with (TESLA's memory-saving rule, Cui
  et al. 2023): every student step's weights are treated as constants, so with G = sum_j g_j,
      dL/dx_i  = d/dx_i [ 2 (lr (target - start) + lr^2 G) . g_i(theta_i, x_i) / D ]   (G held fixed)
      dL/dlr   = d/dlr ||start - lr G - target||^2 / D                                  (G held fixed)
  It is not the gradient of L (the Hessian terms through later steps are dropped) and agrees with
  it only when those are small. Memory is flat in N: a forward pass sums G, the backward pass
  replays the steps from the start, one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from trajstore.distill.networks import FunctionalNet
from trajstore.distill.sources import TrajectorySource
from trajstore import InvalidTensorError, OutOfRangeError, TrajstoreError

MEMORY_MODES = ("plain", "constant", "tesla")

# augment(x, seed) must return the same augmentation for the same seed: the constant-memory backward
# pass replays every step's augmentation from its seed.
Augment = Callable[[torch.Tensor, int], torch.Tensor]

_SEED_BOUND = 2**31


class SyntheticSet:
    """Learnable images with fixed class-major labels and the learnable scalar lr `syn_lr`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, syn_lr: float | torch.Tensor):
        if images.dim() != 4 or not images.is_floating_point():
            raise InvalidTensorError(f"synthetic images must be a float (n, channels, height, width) tensor, "
                                     f"got {images.dtype} of shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise InvalidTensorError(f"{images.shape[0]} images need {images.shape[0]} labels, "
                                     f"got shape {tuple(labels.shape)}")
        if not torch.isfinite(images).all():
            raise InvalidTensorError("synthetic images hold NaN or infinite values")
        self.images = images.detach().clone().requires_grad_(True)
        self.labels = labels.detach().to(device=images.device, dtype=torch.long).clone()
        self.syn_lr = torch.as_tensor(syn_lr, dtype=images.dtype).detach().to(images.device).clone()
        self.syn_lr.requires_grad_(True)

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def class_major_labels(num_classes: int, ipc: int, device=None) -> torch.Tensor:
        """[0]*ipc + [1]*ipc + ...: upstream's label layout."""
        return torch.arange(num_classes, device=device).repeat_interleave(ipc)

    @classmethod
    def from_real(cls, images: torch.Tensor, labels: torch.Tensor, ipc: int, lr_teacher: float, *,
                  rng: np.random.Generator, num_classes: int | None = None, device=None,
                  dtype: torch.dtype | None = None) -> "SyntheticSet":
        """ipc distinct random real images of every class (upstream's `pix_init=real`)."""
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise InvalidTensorError(f"the real pool needs (n, c, h, w) images and n labels, got shapes "
                                     f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if ipc < 1:
            raise OutOfRangeError(f"ipc={ipc} must be at least 1")
        pool_labels = labels.detach().cpu().numpy()
        num_classes = int(pool_labels.max()) + 1 if num_classes is None else num_classes
        chosen = []
        for c in range(num_classes):
            members = np.flatnonzero(pool_labels == c)
            if len(members) < ipc:
                raise TrajstoreError(f"class {c} has {len(members)} real images; ipc={ipc} needs at least {ipc}")
            chosen.append(rng.permutation(members)[:ipc])
        picked = images.detach()[torch.from_numpy(np.concatenate(chosen)).to(images.device)]
        picked = picked.to(device=device, dtype=dtype or picked.dtype)
        return cls(picked, cls.class_major_labels(num_classes, ipc, picked.device), lr_teacher)

    @classmethod
    def from_noise(cls, image_shape: Sequence[int], num_classes: int, ipc: int, lr_teacher: float, *,
                   rng: np.random.Generator, device=None, dtype: torch.dtype = torch.float32) -> "SyntheticSet":
        """Standard normal images (upstream's `pix_init=noise`)."""
        if ipc < 1 or num_classes < 1:
            raise OutOfRangeError(f"ipc={ipc} and num_classes={num_classes} must be at least 1")
        noise = rng.standard_normal((num_classes * ipc, *image_shape))
        images = torch.from_numpy(noise).to(device=device, dtype=dtype)
        return cls(images, cls.class_major_labels(num_classes, ipc, images.device), lr_teacher)


@dataclass(frozen=True)
class UnrollStep:
    """One student step: which synthetic images it trains on and the seed of their augmentation."""

    indices: torch.Tensor
    seed: int
    share: object | None = None  # this process's part of the step when data-parallel (distill.distributed)


def plan_unroll(rng: np.random.Generator, num_images: int, batch_syn: int, syn_steps: int) -> list[UnrollStep]:
    """Minibatches as upstream draws them: a fresh shuffled permutation, split into chunks of batch_syn,
    consumed from the last chunk; a new permutation whenever the chunks run out."""
    if syn_steps < 1 or batch_syn < 1 or num_images < 1:
        raise OutOfRangeError(f"syn_steps={syn_steps}, batch_syn={batch_syn} and the number of synthetic "
                              f"images ({num_images}) must all be at least 1")
    steps: list[UnrollStep] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.from_numpy(rng.permutation(num_images)), batch_syn))
        steps.append(UnrollStep(chunks.pop(), int(rng.integers(_SEED_BOUND))))
    return steps


def _student_gradient(student: FunctionalNet, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      step: UnrollStep, augment: Augment | None, create_graph: bool) -> torch.Tensor:
    """d cross_entropy / d theta on one (augmented) minibatch; with a data-parallel share, x is this
    process's rows and the result is the whole minibatch's gradient, summed over the processes."""
    if step.share is not None:
        return step.share.gradient(student, theta, x, y, step.seed, augment, create_graph)
    if augment is not None:
        x = augment(x, step.seed)
    loss = F.cross_entropy(student(theta, x), y)
    return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


def _unroll_plain(student, images, labels, syn_lr, start, plan, augment) -> torch.Tensor:
    theta = start.detach().requires_grad_(True)
    for step in plan:
        idx = step.indices.to(images.device)
        grad = _student_gradient(student, theta, images[idx], labels[idx], step, augment, create_graph=True)
        theta = theta - syn_lr * grad
    return theta


class _ConstantMemoryMatch(torch.autograd.Function):
    """Eq. 2 with a hand-written reverse pass over the unroll.

    With theta_{i+1} = theta_i - lr * g_i(theta_i, X) and adjoint a_{i+1} = dL/dtheta_{i+1}:
        dL/dX  += -lr * a_{i+1}^T dg_i/dX
        dL/dlr += -a_{i+1}^T g_i
        a_i     = a_{i+1} - lr * H_i a_{i+1}          (H_i = dg_i/dtheta_i, a Hessian-vector product)
    Each step's graph is rebuilt from its stored theta_i, used for one vector-Jacobian product and
    freed, so activation memory is one step's whatever N is.
    """

    @staticmethod
    def forward(ctx, images, syn_lr, start, target, dist, student, labels, plan, augment):
        lr = syn_lr.detach()
        thetas = [start]
        with torch.enable_grad():
            for step in plan:
                theta = thetas[-1].detach().requires_grad_(True)
                idx = step.indices.to(images.device)
                grad = _student_gradient(student, theta, images.detach()[idx], labels[idx], step, augment,
                                         create_graph=False)
                thetas.append(theta.detach() - lr * grad)
        ctx.thetas, ctx.student, ctx.labels, ctx.plan, ctx.augment = thetas, student, labels, plan, augment
        ctx.save_for_backward(images, syn_lr, target, dist)
        return (thetas[-1] - target).square().sum() / dist

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        images, syn_lr, target, dist = ctx.saved_tensors
        lr = syn_lr.detach()
        thetas, ctx.thetas = ctx.thetas, None
        adjoint = grad_loss * 2 * (thetas.pop() - target) / dist
        grad_images = torch.zeros_like(images)
        grad_lr = torch.zeros_like(lr)
        for i in reversed(range(len(ctx.plan))):
            step = ctx.plan[i]
            idx = step.indices.to(images.device)
            with torch.enable_grad():
                theta = thetas.pop().requires_grad_(True)
                x = images.detach()[idx].requires_grad_(True)
                grad = _student_gradient(ctx.student, theta, x, ctx.labels[idx], step, ctx.augment,
                                         create_graph=True)
                grad_lr -= torch.dot(adjoint, grad.detach())
                # theta_0 is the expert's start, a constant: no Hessian-vector product needed there.
                wrt = (x, theta) if i > 0 else (x,)
                vjp = torch.autograd.grad(grad, wrt, grad_outputs=adjoint)
            grad_images.index_add_(0, idx, -lr * vjp[0])
            if i > 0:
                adjoint = adjoint - lr * vjp[1]
        return grad_images, grad_lr, None, None, None, None, None, None, None


class _FirstOrderMatch(torch.autograd.Function):
    """Eq. 2 with the MCT code's first-order (TESLA-style) gradients; see the module docstring.

    forward: theta_{i+1} = theta_i - lr g_i with nothing kept but theta and G = sum g_i; the loss is
    ||start - lr G - target||^2 / D, as the MCT code reports it. backward: the residual
    r = start - lr G - target fixes the vector v = -2 lr r / D every step's image gradient is a
    vector-Jacobian product with, so the steps are replayed from the start, each one's graph built,
    used once and freed.
    """

    @staticmethod
    def forward(ctx, images, syn_lr, start, target, dist, student, labels, plan, augment):
        lr = syn_lr.detach()
        theta, total = start, torch.zeros_like(start)
        with torch.enable_grad():
            for step in plan:
                idx = step.indices.to(images.device)
                theta = theta.detach().requires_grad_(True)
                grad = _student_gradient(student, theta, images.detach()[idx], labels[idx], step, augment,
                                         create_graph=False)
                total += grad
                theta = theta.detach() - lr * grad
        ctx.student, ctx.labels, ctx.plan, ctx.augment = student, labels, plan, augment
        ctx.save_for_backward(images, syn_lr, start, target, dist, total)
        return (start - lr * total - target).square().sum() / dist

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        images, syn_lr, start, target, dist, total = ctx.saved_tensors
        lr = syn_lr.detach()
        residual = start - lr * total - target
        grad_lr = -2 * grad_loss * torch.dot(residual, total) / dist
        v = -2 * grad_loss * lr * residual / dist
        grad_images = torch.zeros_like(images)
        theta = start
        for step in ctx.plan:
            idx = step.indices.to(images.device)
            with torch.enable_grad():
                theta = theta.detach().requires_grad_(True)
                x = images.detach()[idx].requires_grad_(True)
                grad = _student_gradient(ctx.student, theta, x, ctx.labels[idx], step, ctx.augment,
                                         create_graph=True)
                (vjp,) = torch.autograd.grad(grad, x, grad_outputs=v)
            grad_images.index_add_(0, idx, vjp)
            theta = theta.detach() - lr * grad.detach()
        return grad_images, grad_lr, None, None, None, None, None, None, None


def match_loss(student: FunctionalNet, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
               start: torch.Tensor, target: torch.Tensor, plan: Sequence[UnrollStep], *,
               augment: Augment | None = None, memory: str = "plain") -> torch.Tensor:
    """Eq. 2 after unrolling the student from `start` along `plan`; differentiable w.r.t. images and syn_lr.

    `start` and `target` are flat parameter vectors (constants here). All memory modes give the same
    value; "plain" and "constant" the same (exact) gradients, "tesla" the MCT code's first-order ones.
    "constant" and "tesla" cannot be differentiated twice.
    """
    if memory not in MEMORY_MODES:
        raise TrajstoreError(f"memory={memory!r}: expected one of {', '.join(MEMORY_MODES)}")
    if not plan:
        raise OutOfRangeError("the unroll plan is empty: syn_steps must be at least 1")
    for name, vec in (("start", start), ("target", target)):
        if vec.shape != (student.num_params,):
            raise InvalidTensorError(f"{name} parameters have shape {tuple(vec.shape)}, the student network "
                                     f"{student.num_params} parameters")
    start, target = start.detach(), target.detach()
    dist = (start - target).square().sum()
    if not torch.isfinite(dist):
        raise InvalidTensorError("the start or target parameters hold NaN or infinite values")
    if not dist > 0:
        raise TrajstoreError("the start and target parameters coincide, so Eq. 2 is undefined: "
                             "choose expert_epochs > 0 and max_start_epoch below the trajectory's end")
    if memory == "plain":
        theta = _unroll_plain(student, images, labels, syn_lr, start, plan, augment)
        return (theta - target).square().sum() / dist
    rule = _ConstantMemoryMatch if memory == "constant" else _FirstOrderMatch
    return rule.apply(images, syn_lr, start, target, dist, student, labels, tuple(plan), augment)


@dataclass(frozen=True)
class MatchConfig:
    """Hyper-parameters of one distillation run, named and defaulted as upstream MTT's distill.py."""

    syn_steps: int = 20            # N
    expert_epochs: float = 3       # M (real-valued for a .ctraj)
    max_start_epoch: float = 25
    batch_syn: int | None = None   # None: the whole synthetic set per step
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    discrete: bool = False
    memory: str = "plain"

    def __post_init__(self):
        if self.memory not in MEMORY_MODES:
            raise TrajstoreError(f"memory={self.memory!r}: expected one of {', '.join(MEMORY_MODES)}")
        if self.syn_steps < 1 or (self.batch_syn is not None and self.batch_syn < 1):
            raise OutOfRangeError(f"syn_steps={self.syn_steps} and batch_syn={self.batch_syn} must be at least 1")
        if not self.lr_img >= 0 or not self.lr_lr >= 0:
            raise OutOfRangeError(f"lr_img={self.lr_img} and lr_lr={self.lr_lr} must be >= 0")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepRecord:
    """What one distillation iteration did."""

    iteration: int
    loss: float
    expert: int
    start: float
    target: float
    syn_lr: float
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


class Matcher:
    """Runs distillation iterations: sample, unroll, Eq. 2, backward, SGD (momentum 0.5) on images and lr.

    All randomness (expert, start position, minibatches, augmentation seeds) comes from `rng`, so a run is
    reproducible from its seed and resumable from `state_dict()` (which holds the source's expert walk).
    The student's module is moved to the synthetic set's device and dtype and put in training mode, as
    upstream trains its students.
    """

    def __init__(self, source: TrajectorySource, synset: SyntheticSet, student: FunctionalNet,
                 config: MatchConfig, *, rng: np.random.Generator, augment: Augment | None = None,
                 parallel=None):
        self.parallel = parallel  # distill.distributed.ShardedSteps: data-parallel over each step's images
        self.source = source
        self.synset = synset
        self.student = student
        self.config = config
        self.rng = rng
        self.augment = augment
        self.iteration = 0
        self.device, self.dtype = synset.images.device, synset.images.dtype
        student.net.to(device=self.device, dtype=self.dtype).train()
        self.optimizer_img = torch.optim.SGD([synset.images], lr=config.lr_img, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([synset.syn_lr], lr=config.lr_lr, momentum=0.5)

    def step(self) -> StepRecord:
        """One distillation iteration. Raises TrajstoreError, leaving the set untouched, if the loss diverged."""
        began = time.perf_counter()
        cfg = self.config
        start, target, info = self.source.sample(self.rng, cfg.max_start_epoch, cfg.expert_epochs,
                                                 discrete=cfg.discrete, device=self.device, dtype=self.dtype)
        plan = plan_unroll(self.rng, len(self.synset), cfg.batch_syn or len(self.synset), cfg.syn_steps)
        if self.parallel is not None:
            plan = self.parallel.localize(plan)
        loss = match_loss(self.student, self.synset.images, self.synset.labels, self.synset.syn_lr, start, target,
                          plan, augment=self.augment, memory=cfg.memory)
        value = loss.item()
        if not np.isfinite(value):
            raise TrajstoreError(f"distillation diverged at iteration {self.iteration}: the matching loss is "
                                 f"{value} (expert {info.expert}, start {info.start:g}); lower lr_img or lr_lr")
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        # Asking for the images' and the lr's gradients alone (not loss.backward()) spares the
        # Hessian-vector product into the expert's start point that backward() would compute and drop.
        trained = (self.synset.images, self.synset.syn_lr)
        for p, g in zip(trained, torch.autograd.grad(loss, trained, allow_unused=True)):
            p.grad = g
        if self.parallel is not None:
            self.parallel.reduce_gradients(self.synset.images, self.synset.syn_lr)
        self.optimizer_img.step()
        self.optimizer_lr.step()
        syn_lr = self.synset.syn_lr.item()
        record = StepRecord(self.iteration, value, info.expert, info.start, info.target, syn_lr,
                            time.perf_counter() - began)
        self.iteration += 1
        return record

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: set, optimizer momenta, rng state, iteration."""
        return {
            "iteration": self.iteration,
            "images": self.synset.images.detach().cpu().clone(),
            "syn_lr": self.synset.syn_lr.detach().cpu().clone(),
            "optimizer_img": self.optimizer_img.state_dict(),
            "optimizer_lr": self.optimizer_lr.state_dict(),
            "rng": self.rng.bit_generator.state,
            "walk": self.source.walk.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        images = state["images"]
        if images.shape != self.synset.images.shape:
            raise InvalidTensorError(f"saved images have shape {tuple(images.shape)}, this run "
                                     f"{tuple(self.synset.images.shape)}")
        with torch.no_grad():
            self.synset.images.copy_(images)
            self.synset.syn_lr.copy_(state["syn_lr"])
        self.optimizer_img.load_state_dict(state["optimizer_img"])
        self.optimizer_lr.load_state_dict(state["optimizer_lr"])
        try:
            self.rng.bit_generator.state = state["rng"]
        except (TypeError, ValueError) as exc:
            raise TrajstoreError(f"saved random state does not fit this run's generator: {exc}") from None
        self.source.walk.load_state_dict(state["walk"])
        self.iteration = int(state["iteration"])

