"""The defaults of expert training, decided here once.

`train_experts`' signature and `trajstore experts` (which shows them in --help and passes on only the
options given) both read them here. This module imports nothing heavy, so `trajstore experts --help`
stays fast and free of torch.

The values are the family's expert conventions (docs/legacy-formats.md §6: MTT's buffer.py), except the
dataset: the embedded digits set, which needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

# DC/DSA's default augmentation strategy; distillation and evaluation use it too (distill.augment)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class ExpertDefaults:
    """`train_experts`' keyword arguments and their defaults."""

    dataset: str = "digits"
    model: str = "ConvNet"
    num_experts: int = 100
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    zca: bool = False
    seed: int = 0
    batch_experts: int = 1  # experts trained at once (speed only: the same experts as one by one)


EXPERTS = ExpertDefaults()
