"""`trajstore pack` / `trajstore unpack`: the lossless archive of full legacy trajectories."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SOURCE, storage_option


@cli.command("pack")
@click.argument("src", type=SOURCE)
@click.argument("out", type=click.Path())
@click.option("--arch", help="Architecture naming the tensors (default: inferred).")
@click.option("--kind", help="Which buffer of a directory holding several.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def pack_command(src, out, arch, kind, force, quiet, storage_options):
    """Pack every trajectory of the legacy buffer SRC, losslessly, into the archive OUT.

    Either may be a URL (s3://bucket/buffers/CIFAR10/ConvNet, s3://bucket/full.zarr, ...): a buffer at
    a URL is downloaded to a temporary directory first. With --force the old archive stays whole and
    readable until the new one is complete (at a URL the new root, written last, switches readers)."""
    from trajstore.archive import pack

    click.echo(str(pack(src, out, overwrite=force, progress=not quiet, architecture=arch, kind=kind,
                         storage_options=storage_options)))


@cli.command("unpack")
@click.argument("archive", type=SOURCE)
@click.argument("out_dir", type=click.Path())
@click.option("--per-file", default=10, show_default=True, type=click.IntRange(min=1), help="Trajectories per file.")
@click.option("--as-source", is_flag=True, help="Restore the packed source's own file names and partition.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def unpack_command(archive, out_dir, per_file, as_source, force, quiet, storage_options):
    """Write the archive's trajectories back as bit-identical replay_buffer_{n}.pt files.

    Either may be a URL; at a URL each file appears whole, replay_buffer_0.pt last."""
    from pathlib import Path

    from trajstore.archive import unpack

    files = unpack(archive, out_dir, per_file=None if as_source else per_file, overwrite=force, progress=not quiet,
                   storage_options=storage_options)
    size = f": {sum(f.stat().st_size for f in files):,} bytes" if all(isinstance(f, Path) for f in files) else ""
    click.echo(f"wrote {len(files)} file(s) to {out_dir}{size}")
