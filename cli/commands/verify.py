"""`trajstore verify`: re-check structure and every checksum; exit status 0 only when sound."""

from __future__ import annotations

import click

from trajstore.cli.main import cli


@cli.command("verify")
@click.argument("path", type=click.Path(exists=True))
def verify_command(path):
    """Check a .ctraj or archive against its checksums, or read every trajectory of a legacy buffer."""
    from trajstore.tools.inspect import verify

    result = verify(path)
    click.echo(f"OK: {result['path']} ({result['kind']}, {result['num_experts']} experts)")
