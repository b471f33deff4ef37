"""Published hyper-parameters of trajectory-matching distillation, selectable by name.

A preset is one published run: its method, the matching settings of one (dataset, ipc) and where the
numbers come from. Names are `<method>-<dataset>-ipc<n>` ("mct-cifar10-ipc10", "mtt-cifar100-ipc1");
a name without the method ("cifar10-ipc10") means the row of the method the run uses (its --method,
else the kind of source). Asking for one method's preset with the other method is refused: the two
methods' published settings differ (M above all), and silently borrowing them would not reproduce
either paper. Anything given explicitly (a CLI flag, a keyword) overrides a preset's value
(`distill.run.DistillConfig.from_preset`).

Where the numbers come from (`trajstore distill --list-presets` prints every row with its source):
- MCT paper (Zhong et al.): Table 5 runs CIFAR-10 with N = 50 at M = 3..7 (best M = 5 for ipc 1,
  6 for ipc 10 and 50, the Table 1 accuracies), ZCA whitening and DSA for all datasets, inner anchors
  at epochs 6 and 25 (CIFAR-10), 15 and 30 (CIFAR-100, Tiny ImageNet). The paper gives no lr's and no
  max start epoch: those come from the MCT code.
- MCT code (Zhong0x29a/MCT): distill_compressed.py records its best runs (CIFAR-10 ipc 1: ZCA, M 5,
  N 50, max start 3, anchors 0/6/25/50, 48.48 %; ipc 10: ZCA, M 5, N 30, max start 4) and otherwise
  uses its defaults (lr_img 1000, lr_lr 1e-5, lr_teacher 0.01); run_command.md records its
  convexified runs without ZCA and its MTT baselines ("Original MTT") with the flags copied below
  (`--lr_init` there is the initial learned lr, our lr_teacher).
- MTT README (GeorgeCazenavette/mtt-distillation): the CIFAR-100 ipc 1 command.
- MTT paper (CVPR 2022) appendix table, as this project transcribed it before (not re-checked here):
  the remaining CIFAR-100 and Tiny ImageNet rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trajstore.errors import TrajstoreError

METHODS = ("mct", "mtt")


@dataclass(frozen=True)
class Preset:
    """One published run. batch_syn None: the whole set per student step. anchors: the inner anchor
    epochs the MCT experts were convexified with (informative; a .ctraj records its own)."""

    method: str
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
    anchors: tuple[int, ...] = ()
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-{self.dataset}-ipc{self.ipc}" + (f"-{self.variant}" if self.variant else "")

    def settings(self) -> dict:
        """The DistillConfig fields this preset fixes (method included)."""
        fields = asdict(self)
        for key in ("source", "anchors", "variant"):
            del fields[key]
        return fields

    def describe(self) -> str:
        zca = "ZCA" if self.zca else "no ZCA"
        batch = f", batch_syn {self.batch_syn}" if self.batch_syn else ""
        anchors = f", anchors {list(self.anchors)}" if self.anchors else ""
        return (f"{self.name}: {self.method.upper()} {self.dataset} ipc {self.ipc}, {self.model}, N={self.syn_steps} "
                f"M={self.expert_epochs:g} max_start={self.max_start_epoch:g} lr_img={self.lr_img:g} "
                f"lr_lr={self.lr_lr:g} lr_teacher={self.lr_teacher:g}, {zca}{batch}{anchors}\n    source: {self.source}")


_PAPER = "MCT paper, Table 5 (N = 50; best M per ipc; Table 1 accuracy {acc})"
_CODE_BEST = "MCT code, distill_compressed.py 'Best performing Hyper-parameters' ({acc}); other lr's: its defaults"
_CODE_RUN = "MCT code, run_command.md, distill_convexified.py command (no ZCA)"
_CODE_MTT = "MCT code, run_command.md, 'Original MTT' CIFAR-10 command (the MCT paper's MTT baseline runs)"
_MTT_README = "MTT README (GeorgeCazenavette/mtt-distillation), the CIFAR-100 ipc 1 distill.py command"
_MTT_TABLE = "MTT paper (CVPR 2022) appendix hyper-parameter table, as transcribed earlier in this project"
_C10 = (6, 25)
_C100 = (15, 30)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # MCT, CIFAR-10. The paper fixes N, M, ZCA and the anchors; max_start and lr's come from the code:
    # its ipc 1 and ipc 10 best runs (max start 3 and 4), its defaults for the lr's.
    Preset("mct", "cifar10", 1, "ConvNet", 50, 5, 3, 1e3, 1e-5, 1e-2, None, True,
           _CODE_BEST.format(acc="48.48 %") + "; agrees with " + _PAPER.format(acc="48.5"), _C10),
    Preset("mct", "cifar10", 10, "ConvNet", 50, 6, 4, 1e3, 1e-5, 1e-2, None, True,
           _PAPER.format(acc="66.0") + "; max start 4 and lr's from the code's ipc 10 row and defaults", _C10),
    Preset("mct", "cifar10", 50, "ConvNet", 50, 6, 40, 1e3, 1e-5, 1e-3, None, True,
           _PAPER.format(acc="72.3") + "; max start 40 and lr_teacher 1e-3 from the code's ipc 50 command", _C10),
    # MCT, CIFAR-10 as the code's run_command.md runs it (no ZCA).
    Preset("mct", "cifar10", 1, "ConvNet", 60, 6, 4, 1e3, 1e-7, 1e-2, None, False, _CODE_RUN, _C10, "nozca"),
    Preset("mct", "cifar10", 10, "ConvNet", 30, 15, 8, 1e3, 1e-5, 1e-2, None, False, _CODE_RUN, _C10, "nozca"),
    Preset("mct", "cifar10", 50, "ConvNet", 30, 2, 40, 1e3, 1e-5, 1e-3, None, False, _CODE_RUN, _C10, "nozca"),
    # MTT, CIFAR-10: the MCT authors' MTT baselines with ZCA (MTT trains its CIFAR experts with ZCA).
    Preset("mtt", "cifar10", 1, "ConvNet", 50, 2, 2, 1e2, 1e-7, 1e-2, None, True, _CODE_MTT),
    Preset("mtt", "cifar10", 10, "ConvNet", 30, 2, 20, 1e5, 1e-4, 1e-2, None, True, _CODE_MTT),
    Preset("mtt", "cifar10", 50, "ConvNet", 30, 2, 20, 1e2, 1e-5, 1e-3, None, True, _CODE_MTT),
    # MTT, CIFAR-100: the README's command (ipc 1) and the paper's table.
    Preset("mtt", "cifar100", 1, "ConvNet", 20, 3, 20, 1e3, 1e-5, 1e-2, None, True, _MTT_README),
    Preset("mtt", "cifar100", 10, "ConvNet", 20, 2, 20, 1e3, 1e-5, 1e-2, None, False, _MTT_TABLE),
    Preset("mtt", "cifar100", 50, "ConvNet", 80, 2, 40, 1e3, 1e-5, 1e-2, 125, True, _MTT_TABLE),
    # MTT, Tiny ImageNet (64x64, depth-4 ConvNet): the paper's table.
    Preset("mtt", "tinyimagenet", 1, "ConvNetD4", 10, 2, 10, 1e4, 1e-4, 1e-2, None, False, _MTT_TABLE),
    Preset("mtt", "tinyimagenet", 10, "ConvNetD4", 20, 2, 40, 1e4, 1e-4, 1e-2, 200, False, _MTT_TABLE),
    Preset("mtt", "tinyimagenet", 50, "ConvNetD4", 20, 2, 40, 1e4, 1e-4, 1e-2, 300, False, _MTT_TABLE),
)}


def get_preset(name: str, method: str | None = None) -> Preset:
    """The preset called `name` (case-insensitive) for a run of `method`.

    A full name ("mct-cifar10-ipc10") must agree with `method` when one is given; a short name
    ("cifar10-ipc10") needs `method` and picks that method's row.
    """
    key = name.strip().lower()
    if method is not None and method not in METHODS:
        raise TrajstoreError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    prefix = key.split("-", 1)[0]
    if prefix not in METHODS:
        if method is None:
            raise TrajstoreError(f"preset {name!r} does not name its method: use mct-{key} or mtt-{key}")
        key = f"{method}-{key}"
    preset = PRESETS.get(key)
    if preset is None:
        raise TrajstoreError(f"unknown preset {name!r}" + (f" for {method.upper()}" if method else "")
                             + f"; known: {', '.join(PRESETS)}")
    if method is not None and preset.method != method:
        other = PRESETS.get(f"{method}-{key.split('-', 1)[1]}")
        hint = f"use {other.name}" if other else f"no {method.upper()} preset exists for {preset.dataset} ipc {preset.ipc}"
        raise TrajstoreError(f"preset {preset.name} is {preset.method.upper()}'s published setting, but this run "
                             f"uses {method.upper()}: {hint}, or drop --method")
    return preset


def listing() -> str:
    """Every preset with its method, settings and source, one block each (`trajstore distill --list-presets`)."""
    return "\n".join(p.describe() for p in PRESETS.values())
