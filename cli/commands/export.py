"""`trajstore export`: a .ctraj -> an MTT buffer of its convexified trajectories."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SOURCE, storage_option


@cli.command("export")
@click.argument("path", type=SOURCE)
@click.argument("out_dir", type=click.Path())
@click.option("--per-file", default=10, show_default=True, type=click.IntRange(min=1), help="Trajectories per file.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def export_command(path, out_dir, per_file, force, quiet, storage_options):
    """Write replay_buffer_{n}.pt files that any MTT-family distill.py reads unchanged."""
    from trajstore.tools.export import export_mtt

    files = export_mtt(path, out_dir, per_file=per_file, overwrite=force, progress=not quiet,
                       storage_options=storage_options)
    total = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {len(files)} file(s) to {out_dir}: {total:,} bytes")
