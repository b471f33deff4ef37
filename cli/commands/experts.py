"""`trajstore experts`: train expert trajectories straight into a .ctraj."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import (EXPERTS_ALIASES, SMOOTHING_CHOICES, SMOOTHING_HELP, UpstreamCommand, epoch_list,
                                   no_log, nproc_option, upstream_expert_dir)


@cli.command("experts", cls=UpstreamCommand, upstream=EXPERTS_ALIASES)
@click.argument("out", type=click.Path())
@click.option("--dataset", default="digits", show_default=True,
              help="digits, cifar10, cifar100, tinyimagenet, imagefolder or folder:<path>.")
@click.option("--data-path", type=click.Path(), help="Where the dataset's files are (not needed for digits).")
@click.option("--model", default="ConvNet", show_default=True,
              help="Any upstream MTT network: ConvNet, ConvNetD4, ConvNetW256, ConvNetBN, MLP, LeNet, AlexNet, VGG11, "
              "VGG11BN, ResNet18, ResNet18BN, ResNet18_AP, ResNet18BN_AP, ...")
@click.option("--num-experts", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.01, show_default=True, type=float)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--momentum", default=0.0, show_default=True, type=float)
@click.option("--weight-decay", type=float, help="SGD weight decay (L2) of the experts [0, as upstream].")
@click.option("--dsa-strategy", help="DSA operations [color_crop_cutout_flip_scale_rotate, as upstream].")
@click.option("--waypoints", callback=epoch_list, help="Inner anchor epochs, e.g. 6,25 (default: none).")
@click.option("--smoothing", type=click.Choice(SMOOTHING_CHOICES), default="none", show_default=True,
              help=SMOOTHING_HELP)
@click.option("--zca/--no-zca", default=False, show_default=True, help="ZCA-whiten the data (kornia, eps 0.1).")
@click.option("--dsa/--no-dsa", default=True, show_default=True, help="Differentiable siamese augmentation.")
@click.option("--legacy-dir", type=click.Path(), help="Also write the runs as an MTT buffer (replay_buffer_{n}.pt).")
@click.option("--buffer-path", hidden=True, help="Upstream's --buffer_path: --legacy-dir becomes "
              "{buffer_path}/{dataset}[_NO_ZCA]/{model}, as upstream's buffer.py writes it.")
@click.option("--batch-experts", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this many experts at once as one stacked network (each its own seed, data order "
                   "and DSA draws: the same experts as one by one, faster where one network leaves the device idle).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help="cuda, cuda:1, cpu, ... (default: CUDA when present, else the CPU).")
@nproc_option
@click.option("--plot", type=click.Path(), help="Also draw every expert's test accuracy per epoch to this PNG.")
@click.option("--force", is_flag=True, help="Replace an existing --plot PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
def experts_command(out, dataset, data_path, model, num_experts, epochs, lr, batch_size, momentum, weight_decay,
                    dsa_strategy, waypoints, smoothing, zca, dsa, legacy_dir, buffer_path, batch_experts, seed, device,
                    nproc, plot, force, quiet):
    """Train experts and write them to the .ctraj OUT; run it again to continue an interrupted job.

    buffer.py's spellings work too (--train_epochs, --lr_teacher, --mom, --l2, --dsa False, --buffer_path, ...)."""
    from trajstore.distill.distributed import launch
    from trajstore.distill.experts import plot_accuracy, train_experts

    if buffer_path is not None:
        if legacy_dir is not None:
            raise click.UsageError("give --legacy-dir or --buffer_path, not both")
        legacy_dir = upstream_expert_dir(buffer_path, dataset, zca, model)
    optional = {k: v for k, v in (("weight_decay", weight_decay), ("dsa_strategy", dsa_strategy)) if v is not None}
    settings = dict(dataset=dataset, data_path=data_path, model=model, num_experts=num_experts, epochs=epochs,
                    lr=lr, batch_size=batch_size, momentum=momentum, dsa=dsa, zca=zca, **optional,
                    waypoints=waypoints, smoothing=None if smoothing == "none" else smoothing,
                    legacy_dir=legacy_dir, seed=seed, device=device, batch_experts=batch_experts,
                    progress=not quiet,
                    log=no_log if quiet else click.echo)
    path = launch(train_experts, nproc, (out,), settings, device=device)
    if path is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    click.echo(f"wrote {path}")
    if plot:
        click.echo(f"wrote {plot_accuracy(path, plot, overwrite=force)}")
