"""`trajstore verify`: re-check structure and every checksum; exit status 0 only when sound."""

from __future__ import annotations

import json

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SOURCE, storage_option


@cli.command("verify")
@click.argument("path", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object ({\"ok\": true/false, ...}) "
              "instead of a line; the exit status is the same.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def verify_command(path, as_json, quiet, storage_options):
    """Check a .ctraj or archive against its checksums, or read every trajectory of a legacy buffer."""
    from trajstore import TrajstoreError
    from trajstore.tools.inspect import verify

    try:
        result = verify(path, progress=not quiet, storage_options=storage_options)
    except TrajstoreError as exc:
        if not as_json:
            raise
        click.echo(json.dumps({"ok": False, "path": str(path), "error": str(exc), "error_type": type(exc).__name__}))
        raise SystemExit(1) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"OK: {result['path']} ({result['kind']}, {result['num_experts']} experts)")
        if result.get("unlisted"):  # published by an append that has not closed (or was interrupted)
            click.echo(f"note: {len(result['unlisted'])} expert(s) published but not yet listed ({result['unlisted'][:5]}): "
                       "an append in progress, or interrupted (append to it again and close to list them)")
