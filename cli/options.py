"""Option parsing shared by several subcommands."""

from __future__ import annotations

import click


def epoch_list(ctx, param, value: str | None) -> tuple[int, ...]:
    """click callback: "6,25" -> (6, 25); empty -> ()."""
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like 6,25, got {value!r}") from None


nproc_option = click.option(
    "--nproc", type=click.IntRange(min=1),
    help="Run on this many local processes on torch.distributed (one GPU each with CUDA, gloo on the "
         "CPU) [1]. Under torchrun leave it out: torchrun sets the processes.")


def no_log(_message: str) -> None:
    """The log of a --quiet run: a named function, so spawned processes (--nproc) can receive it."""
