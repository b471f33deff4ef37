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


# -- upstream spellings ---------------------------------------------------------------------------------
# MTT-family scripts take argparse options spelled `--syn_steps`, `--Iteration`, `--dsa True`, ... A
# command built with `cls=UpstreamCommand, upstream={...}` rewrites each such spelling into its own option
# before parsing, so the alias is parsed, checked and defaulted exactly like the option it names (defaults
# stay where the option's function decides them) and stays out of --help.

# upstream `--dsa True` / `--dsa False` (argparse strings) -> trajstore's `--dsa` / `--no-dsa` flags
DSA_STRINGS = {"True": "--dsa", "False": "--no-dsa"}

# distill.py (MTT and its descendants) -> `trajstore distill`
DISTILL_ALIASES: dict[str, str | dict[str, str]] = {
    "--syn_steps": "--syn-steps", "--expert_epochs": "--expert-epochs", "--max_start_epoch": "--max-start-epoch",
    "--lr_img": "--lr-img", "--lr_lr": "--lr-lr", "--lr_teacher": "--lr-teacher", "--batch_syn": "--batch-syn",
    "--Iteration": "--iterations", "--eval_it": "--eval-every", "--num_eval": "--eval-nets",
    "--epoch_eval_train": "--eval-epochs", "--pix_init": "--init", "--dsa": DSA_STRINGS,
    "--dsa_strategy": "--dsa-strategy", "--max_experts": "--max-experts", "--max_files": "--max-files",
    "--buffer_path": "--buffer-path", "--data_path": "--data-path",
}

# buffer.py (MTT's expert training) -> `trajstore experts`
EXPERTS_ALIASES: dict[str, str | dict[str, str]] = {
    "--train_epochs": "--epochs", "--lr_teacher": "--lr", "--batch_train": "--batch-size",
    "--num_experts": "--num-experts", "--l2": "--weight-decay", "--mom": "--momentum", "--dsa": DSA_STRINGS,
    "--dsa_strategy": "--dsa-strategy",
    "--buffer_path": "--buffer-path", "--data_path": "--data-path",
}


def translate(args: list[str], aliases: dict[str, str | dict[str, str]]) -> list[str]:
    """Rewrite upstream spellings (`--name value` or `--name=value`) in `args` into trajstore options."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out.extend(args[i - 1:])
            break
        name, eq, value = arg.partition("=")
        target = aliases.get(name)
        if isinstance(target, dict):  # an upstream string option that is a flag pair here
            if not eq and i < len(args) and args[i] in target:
                value, eq = args[i], "="
                i += 1
            if eq:
                if value not in target:
                    raise click.BadParameter(f"{name} takes {' or '.join(target)} (upstream's spelling), "
                                             f"got {value!r}", param_hint=name)
                out.append(target[value])
                continue
            target = None  # a bare `--dsa`: already trajstore's own flag
        if target is None:
            out.append(arg)
        else:
            out.append(f"{target}={value}" if eq else target)
    return out


class UpstreamCommand(click.Command):
    """A command that also accepts the MTT-family spellings in `upstream` (alias -> option, or for a flag
    pair {upstream value -> flag})."""

    def __init__(self, *args, upstream: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.upstream = upstream or {}

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, translate(list(args), self.upstream))


def upstream_expert_dir(buffer_path: str, dataset: str, zca: bool, model: str) -> str:
    """The model directory upstream's buffer.py writes and distill.py reads (docs/legacy-formats.md §1):
    `{buffer_path}/{dataset}[_NO_ZCA]/{model}`, `_NO_ZCA` for CIFAR10 and CIFAR100 without ZCA."""
    import os

    directory = os.path.join(buffer_path, dataset)
    if dataset in ("CIFAR10", "CIFAR100") and not zca:
        directory += "_NO_ZCA"
    return os.path.join(directory, model)


# trajstore.format.beta.SMOOTHINGS, spelled out here so that `--help` does not import numpy (a test
# checks that both lists agree).
SMOOTHING_CHOICES = ("none", "binomial", "neighbour-mean")
SMOOTHING_HELP = ("Smooth the stored inner and end anchors as the MCT code does (docs/format.md 4.1): binomial "
                  "(convexify.py: 0.5 theta(e) + 0.25 each neighbour, betas from the smoothed path) or "
                  "neighbour-mean (the compressed store MCT distills from: mean of the two neighbours, betas from "
                  "the raw path).")


nproc_option = click.option(
    "--nproc", type=click.IntRange(min=1),
    help="Run on this many local processes on torch.distributed (one GPU each with CUDA, gloo on the "
         "CPU) [1]. Under torchrun leave it out: torchrun sets the processes.")


def no_log(_message: str) -> None:
    """The log of a --quiet run: a named function, so spawned processes (--nproc) can receive it."""
