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


def _storage_options(ctx, param, value) -> dict:
    from trajstore import TrajstoreError
    from trajstore.stores.location import parse_storage_options

    try:
        return parse_storage_options(value)
    except TrajstoreError as exc:
        raise click.BadParameter(str(exc)) from None


# For every argument that may be a URL (s3://, gs://, hf://, memory://, https://, file://): options for
# its fsspec filesystem, as `storage_options=` in Python. Credentials usually come from the backend's
# own environment variables or config files (AWS_PROFILE, AWS_ENDPOINT_URL, ...) instead.
storage_option = click.option(
    "--storage-option", "-S", "storage_options", multiple=True, callback=_storage_options, metavar="KEY=VALUE",
    help="Option for the fsspec filesystem of a URL argument, e.g. endpoint_url=http://127.0.0.1:9000 or "
         "profile=lab; repeat for several (values are JSON where they parse, dotted keys nest).")


class Source(click.ParamType):
    """An existing local path, or a URL that the command opens through fsspec (checked when opened)."""

    name = "path-or-url"

    def convert(self, value, param, ctx):
        from trajstore.stores.location import locate

        location = locate(value)
        if location.path is not None:  # a local path, or a file:// URL naming one
            click.Path(exists=True).convert(str(location.path), param, ctx)
        return value


SOURCE = Source()
