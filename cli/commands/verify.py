"""`trajstore verify`: re-check structure and every checksum; exit status 0 only when sound."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SOURCE, storage_option


@cli.command("verify")
@click.argument("path", type=SOURCE)
@storage_option
def verify_command(path, storage_options):
    """Check a .ctraj or archive against its checksums, or read every trajectory of a legacy buffer."""
    from trajstore.tools.inspect import verify

    result = verify(path, storage_options)
    click.echo(f"OK: {result['path']} ({result['kind']}, {result['num_experts']} experts)")
