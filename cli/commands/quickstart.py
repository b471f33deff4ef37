"""`trajstore quickstart`: experts, storage, MCT vs MTT vs random on the embedded digits data."""

from __future__ import annotations

import click

from trajstore.cli.main import cli


@cli.command("quickstart")
@click.option("--out", type=click.Path(), help="Output folder [./trajstore-quickstart].")
@click.option("--scale", type=click.Choice(["full", "smoke"]), default="full", show_default=True,
              help="smoke: a seconds-long run of the same steps (its accuracies mean nothing).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help="cuda, cpu, ... [CUDA when present].")
@click.option("--force", is_flag=True, help="Run again over a finished quickstart in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quickstart_command(out, scale, seed, device, force, quiet):
    """Train experts on digits, compare .ctraj and legacy storage, distill with MCT and MTT, and print
    the comparison with the random real subset. Run it again to continue an interrupted quickstart."""
    from trajstore.distill.quickstart import run_quickstart

    run_quickstart(out, scale=scale, seed=seed, device=device, force=force, progress=not quiet, log=click.echo)
