"""One module per subcommand; importing this package registers them all on the group."""

from importlib import import_module

COMMANDS = ("experts", "evaluate", "convert", "inspect", "verify", "export", "pack", "distill", "quickstart")

for _name in COMMANDS:
    import_module(f"{__name__}.{_name}")
