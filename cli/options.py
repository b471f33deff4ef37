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


# trajstore.format.beta.SMOOTHINGS, spelled out here so that `--help` does not import numpy (a test
# checks that both lists agree).
SMOOTHING_CHOICES = ("none", "binomial", "neighbour-mean")
SMOOTHING_HELP = ("Smooth the stored inner and end anchors as the MCT code does (docs/format.md 4.1): binomial "
                  "(convexify.py: 0.5 theta(e) + 0.25 each neighbour, betas from the smoothed path) or "
                  "neighbour-mean (the compressed store MCT distills from: mean of the two neighbours, betas from "
                  "the raw path).")
