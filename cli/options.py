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
