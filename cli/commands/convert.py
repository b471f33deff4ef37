"""`trajstore convert`: a legacy buffer or packed archive -> a .ctraj."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SMOOTHING_CHOICES, SMOOTHING_HELP, SOURCE, epoch_list, storage_option


@cli.command("convert")
@click.argument("src", type=SOURCE)
@click.argument("out", type=click.Path())
@click.option("--waypoints", callback=epoch_list, help="Inner anchor epochs, e.g. 6,25 (default: start and end only).")
@click.option("--smoothing", type=click.Choice(SMOOTHING_CHOICES), default="none", show_default=True,
              help=SMOOTHING_HELP)
@click.option("--single-file", is_flag=True, help="Write the single-file (zip) form.")
@click.option("--model", "--arch", "arch", help="Network naming the tensors: ConvNet, ConvNetD4, ResNet18, VGG11, ... "
              "(default: recognised from the shapes; name it where several networks fit).")
@click.option("--kind", help="Which buffer of a directory holding several, e.g. convexified_replay_buffer.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def convert_command(src, out, waypoints, smoothing, single_file, arch, kind, force, quiet, storage_options):
    """Convexify every expert of the legacy buffer (file, model directory or buffer root) or archive SRC
    into OUT (a path, or a URL such as s3://bucket/experts.ctraj)."""
    from trajstore.tools.convert import convert

    report = convert(src, out, waypoints=waypoints, smoothing=None if smoothing == "none" else smoothing, single_file=single_file,
                     overwrite=force, architecture=arch, progress=not quiet, kind=kind,
                     storage_options=storage_options)
    click.echo(str(report))
