"""Published hyper-parameters of trajectory-matching distillation, selectable by name ("cifar10-ipc10").

A preset fixes the matching settings of one (dataset, ipc) row of a paper's table; anything given
explicitly (a CLI flag, a keyword) overrides it (see `distill.run.DistillConfig.from_preset`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trajstore.errors import TrajstoreError


@dataclass(frozen=True)
class Preset:
    """One row of a published hyper-parameter table. batch_syn None: the whole set per student step."""

    dataset: str
    ipc: int
    model: str
    syn_steps: int
    expert_epochs: float
    max_start_epoch: float
    lr_img: float
    lr_lr: float
    lr_teacher: float
    batch_syn: int | None
    zca: bool
    source: str

    @property
    def name(self) -> str:
        return f"{self.dataset}-ipc{self.ipc}"

    def settings(self) -> dict:
        """The DistillConfig fields this preset fixes."""
        fields = asdict(self)
        del fields["source"]
        return fields


_MCT = "MCT (Zhong et al.): reference legacy-buffers.md section 5; lr_teacher and zca from MCT's run commands"
_MTT = "MTT (Cazenavette et al., CVPR 2022), appendix hyper-parameter table"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # CIFAR-10: MCT's own settings (N, M, max_start_epoch, lr_img, lr_lr from the reference, section 5);
    # its run commands (official MCT code, run_command.md) distill without ZCA, lr_teacher 1e-2/1e-2/1e-3.
    Preset("cifar10", 1, "ConvNet", 60, 6, 4, 1e3, 1e-7, 1e-2, None, False, _MCT),
    Preset("cifar10", 10, "ConvNet", 30, 15, 8, 1e3, 1e-5, 1e-2, None, False, _MCT),
    Preset("cifar10", 50, "ConvNet", 30, 2, 40, 1e3, 1e-5, 1e-3, None, False, _MCT),
    # CIFAR-100: MTT's table (syn_steps, expert_epochs, max_start_epoch, batch_syn, ZCA, lr pixels,
    # lr step size, lr teacher); the ipc 1 row is also the example command of MTT's README.
    Preset("cifar100", 1, "ConvNet", 20, 3, 20, 1e3, 1e-5, 1e-2, None, True, _MTT),
    Preset("cifar100", 10, "ConvNet", 20, 2, 20, 1e3, 1e-5, 1e-2, None, False, _MTT),
    Preset("cifar100", 50, "ConvNet", 80, 2, 40, 1e3, 1e-5, 1e-2, 125, True, _MTT),
    # Tiny ImageNet (64x64, depth-4 ConvNet): MTT's table.
    Preset("tinyimagenet", 1, "ConvNetD4", 10, 2, 10, 1e4, 1e-4, 1e-2, None, False, _MTT),
    Preset("tinyimagenet", 10, "ConvNetD4", 20, 2, 40, 1e4, 1e-4, 1e-2, 200, False, _MTT),
    Preset("tinyimagenet", 50, "ConvNetD4", 20, 2, 40, 1e4, 1e-4, 1e-2, 300, False, _MTT),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name` (case-insensitive), e.g. "cifar10-ipc10" or "tinyimagenet-ipc50"."""
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise TrajstoreError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return preset
