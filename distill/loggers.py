"""Optional run loggers (`trajstore distill --logger tensorboard|wandb`), besides metrics.jsonl.

Each receives the records metrics.jsonl gets (see distill.run) and logs their numbers against the
iteration: `loss`, `syn_lr`, `start`, ... of each step as `step/<key>`, `mean`, `std` of each evaluation
as `eval/<key>`. Neither package is needed to install trajstore; asking for a missing one is one clear
error before the run starts. wandb runs offline unless WANDB_MODE says otherwise, so no account is needed.

A resumed run drops the records after its checkpoint from metrics.jsonl and computes those iterations
again; its logger starts afresh from the records metrics.jsonl kept (`history`), so the log holds each
iteration once, with metrics.jsonl's numbers.
"""

from __future__ import annotations

import numbers
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from trajstore.errors import TrajstoreError

LOGGERS = ("tensorboard", "wandb")
# the package each logger needs (import name, pip name)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def _scalars(record: dict) -> dict[str, float]:
    prefix = record.get("kind", "step")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "iteration") and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars into `<out>/tensorboard`, readable with `tensorboard --logdir <out>`."""

    def __init__(self, out_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # an interrupted run's event files may hold iterations its checkpoint dropped: start again from history
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["iteration"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A wandb run in `<out>/wandb` (offline by default: `wandb sync` uploads it later)."""

    def __init__(self, out_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project="trajstore", dir=str(out_dir), config=config, name=out_dir.name,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def require(kind: str | None) -> None:
    """Refuse an unknown logger or one whose package is missing (before any work is done)."""
    if kind is None:
        return
    if kind not in LOGGERS:
        raise TrajstoreError(f"logger {kind!r}: expected one of {', '.join(LOGGERS)}")
    module, package = _PACKAGES[kind]
    try:
        __import__(module)
    except ImportError:
        raise TrajstoreError(f"--logger {kind} needs the {package} package, which is not installed: "
                             f"pip install {package}  (or pip install \"trajstore[{kind}]\")") from None


def open_logger(kind: str | None, out_dir: str | os.PathLike, config: dict, history: Iterable[dict] = ()):
    """The logger `kind` writing under `out_dir`, already given the records in `history`, or None for none."""
    if kind is None:
        return None
    require(kind)
    sink = _CLASSES[kind](Path(out_dir), config)
    for record in history:
        sink.log(record)
    return sink
