"""`trajstore experts`: train expert trajectories straight into a .ctraj."""

from __future__ import annotations

import dataclasses

import click

from trajstore.cli.main import cli
from trajstore.cli.options import (EXPERTS_ALIASES, SMOOTHING_CHOICES, SMOOTHING_HELP, UpstreamCommand, epoch_list,
                                   no_log, nproc_option, storage_option, upstream_expert_dir)
from trajstore.distill.defaults import EXPERTS

# The defaults are train_experts' own (decided in distill.defaults, which imports no torch): an option
# left out is not passed on, and --help shows the value train_experts will use.
DEFAULTS = dataclasses.asdict(EXPERTS)


def default(name: str, flag: str | None = None) -> str:
    """The --help note of the default of train_experts' `name` (a flag pair: the flag that is the default)."""
    value = DEFAULTS[name]
    return f"[default: {(f'--{flag}' if value else f'--no-{flag}') if flag else value}]"


@cli.command("experts", cls=UpstreamCommand, upstream=EXPERTS_ALIASES)
@click.argument("out", type=click.Path())
@click.option("--dataset", help="digits, cifar10, cifar100, tinyimagenet, imagefolder or folder:<path>. "
              + default("dataset"))
@click.option("--data-path", type=click.Path(), help="Where the dataset's files are (not needed for digits).")
@click.option("--model", help="ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, MLP, LeNet, AlexNet, VGG11, ResNet18, "
              "ResNet18BN_AP, ... " + default("model"))
@click.option("--num-experts", type=click.IntRange(min=1), help=default("num_experts"))
@click.option("--epochs", type=click.IntRange(min=1), help=default("epochs"))
@click.option("--lr", type=float, help="SGD learning rate. " + default("lr"))
@click.option("--batch-size", type=click.IntRange(min=1), help=default("batch_size"))
@click.option("--momentum", type=float, help="SGD momentum. " + default("momentum"))
@click.option("--weight-decay", type=float, help="SGD weight decay (L2). " + default("weight_decay"))
@click.option("--dsa-strategy", help="DSA operations. " + default("dsa_strategy"))
@click.option("--waypoints", callback=epoch_list, help="Inner anchor epochs, e.g. 6,25 (default: none).")
@click.option("--smoothing", type=click.Choice(SMOOTHING_CHOICES),
              help=SMOOTHING_HELP + " [default: none]")
@click.option("--zca/--no-zca", default=None, help="ZCA-whiten the data (kornia, eps 0.1). " + default("zca", "zca"))
@click.option("--dsa/--no-dsa", default=None, help="Differentiable siamese augmentation. " + default("dsa", "dsa"))
@click.option("--legacy-dir", type=click.Path(), help="Also write the runs as an MTT buffer (replay_buffer_{n}.pt).")
@click.option("--buffer-path", hidden=True, help="Upstream's --buffer_path: --legacy-dir becomes "
              "{buffer_path}/{dataset}[_NO_ZCA]/{model}, as upstream's buffer.py writes it.")
@click.option("--batch-experts", type=click.IntRange(min=1),
              help="Train this many experts at once: stacked on a GPU, side by side on the CPU's cores (each its "
                   "own seed, data order and DSA draws: the same experts as one by one). "
                   + default("batch_experts"))
@click.option("--seed", type=int, help=default("seed"))
@click.option("--device", help="cuda, cuda:1, cpu, ... (default: CUDA when present, else the CPU).")
@nproc_option
@click.option("--plot", type=click.Path(), help="Also draw every expert's test accuracy per epoch to this PNG.")
@click.option("--force", is_flag=True, help="Replace an existing --plot PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
@storage_option
def experts_command(out, buffer_path, nproc, plot, force, quiet, storage_options, **settings):
    """Train experts and write them to the .ctraj OUT (a path, or a URL such as s3://bucket/experts.ctraj);
    run it again to continue an interrupted job. Several jobs may write one OUT at once: each trains
    the experts no other job has claimed. --legacy-dir and --plot are local paths.

    buffer.py's spellings work too (--train_epochs, --lr_teacher, --mom, --l2, --dsa False, --buffer_path, ...)."""
    from trajstore.distill.distributed import launch
    from trajstore.distill.experts import plot_accuracy, train_experts

    if settings["smoothing"] == "none":  # spelled out: the same as not given (train_experts: no smoothing)
        settings["smoothing"] = None
    given = {name: value for name, value in settings.items() if value is not None}
    if buffer_path is not None:
        if "legacy_dir" in given:
            raise click.UsageError("give --legacy-dir or --buffer_path, not both")
        chosen = {**DEFAULTS, **given}
        given["legacy_dir"] = upstream_expert_dir(buffer_path, chosen["dataset"], chosen["zca"], chosen["model"])
    given.update(progress=not quiet, log=no_log if quiet else click.echo)
    if storage_options:
        given["storage_options"] = storage_options
    path = launch(train_experts, nproc, (out,), given, device=settings["device"])
    if path is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    click.echo(f"wrote {path}")
    if plot:
        click.echo(f"wrote {plot_accuracy(path, plot, overwrite=force, storage_options=storage_options)}")
