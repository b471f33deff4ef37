"""`trajstore` command group. Each subcommand lives in its own module and only parses and prints."""

from __future__ import annotations

import click

from trajstore import TrajstoreError, __version__


class Group(click.Group):
    """Turns trajstore errors into one clear line and exit status 1 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrajstoreError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # permissions, a full disk, ...: the file and the reason, not a traceback
            from trajstore.errors import from_os_error

            raise click.ClickException(str(from_os_error(exc))) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trajstore")
def cli():
    """Store, convert and use expert training trajectories for dataset distillation."""


def main():
    cli(prog_name="trajstore")


# Subcommands register themselves on `cli` when imported.
from trajstore.cli import commands  # noqa: E402,F401
