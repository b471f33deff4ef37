"""`trajstore distill`: MCT on a .ctraj, or classic MTT on a legacy buffer / packed archive."""

from __future__ import annotations

import click

from trajstore.cli.main import cli
from trajstore.cli.options import (DISTILL_ALIASES, UpstreamCommand, no_log, nproc_option, storage_option,
                                   upstream_expert_dir)


def _im_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        sides = [int(v) for v in value.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise click.BadParameter(f"expected a size like 32 or 32x32, got {value!r}")
    return (sides[0], sides[-1])


def _list_presets(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        from trajstore.distill.presets import listing

        click.echo(listing())
        ctx.exit()


@cli.command("distill", cls=UpstreamCommand, upstream=DISTILL_ALIASES)
@click.argument("source", required=False, type=click.Path())
@click.option("--config", "config_path", type=click.Path(),
              help="Replay the settings of a run (its config.json or folder); flags given explicitly override them.")
@click.option("--method", type=click.Choice(["mct", "mtt"]),
              help="mct (a .ctraj) or mtt (a legacy buffer or packed archive); default: by what SOURCE is.")
@click.option("--preset", help="A published run's settings, e.g. mct-cifar10-ipc10 or mtt-cifar100-ipc1 (without "
              "the method: the run's own); flags given explicitly override it. See --list-presets.")
@click.option("--list-presets", is_flag=True, is_eager=True, expose_value=False, callback=_list_presets,
              help="Print every preset with its method, settings and source, and exit.")
@click.option("--ipc", type=click.IntRange(min=1), help="Synthetic images per class [1].")
@click.option("--syn-steps", type=click.IntRange(min=1), help="N: student steps per iteration [20].")
@click.option("--expert-epochs", type=float, help="M: how far ahead the target lies; real-valued for MCT [3].")
@click.option("--max-start-epoch", type=float, help="Starts are drawn from [0, this] [25].")
@click.option("--batch-syn", type=click.IntRange(min=1), help="Synthetic images per student step [all].")
@click.option("--lr-img", type=float, help="Learning rate of the images [1000].")
@click.option("--lr-lr", type=float, help="Learning rate of the learned step size [1e-5].")
@click.option("--lr-teacher", type=float, help="Initial learned step size [the experts' lr, else 0.01].")
@click.option("--iterations", type=click.IntRange(min=1), help="Distillation iterations [5000].")
@click.option("--eval-every", type=click.IntRange(min=0), help="Evaluate every this many iterations; 0: only "
              "at the end [100].")
@click.option("--eval-nets", type=click.IntRange(min=1), help="Networks trained per evaluation [5].")
@click.option("--eval-epochs", type=click.IntRange(min=0), help="Epochs each evaluation network trains [1000].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Iterations between checkpoints [100].")
@click.option("--init", type=click.Choice(["real", "noise"]), help="Start from real images of each class "
              "or from noise [real].")
@click.option("--discrete", is_flag=True, default=None, help="Integer start epochs (the paper's ablation).")
@click.option("--memory", type=click.Choice(["plain", "constant", "tesla"]), help="How image gradients are "
              "computed. plain: exact, through the whole unroll (MTT); constant: exact, recomputing each student "
              "step backwards (activation memory flat in N); tesla: the MCT code's first-order rule (TESLA's: "
              "student weights as constants, not the exact gradient; memory flat in N) [plain].")
@click.option("--zca/--no-zca", default=None, help="ZCA-whiten the data [as the experts were trained].")
@click.option("--dsa/--no-dsa", default=None, help="Differentiable siamese augmentation of the synthetic images "
              "during matching and evaluation [on].")
@click.option("--dsa-strategy", help="DSA operations, e.g. color_crop_cutout_flip_scale_rotate (upstream's default).")
@click.option("--max-experts", type=click.IntRange(min=1), help="Use only the first this many experts of each file "
              "(a .ctraj: of each group of 10) [all].")
@click.option("--max-files", type=click.IntRange(min=1), help="Use only the first this many files (groups of 10) "
              "of experts [all].")
@click.option("--buffer-path", hidden=True, help="Upstream's --buffer_path: with no SOURCE, read "
              "{buffer_path}/{dataset}[_NO_ZCA]/{model} as upstream does.")
@click.option("--logger", type=click.Choice(["tensorboard", "wandb"]), help="Also log metrics to TensorBoard or "
              "to wandb (offline unless WANDB_MODE says otherwise); the package must be installed.")
@click.option("--dataset", help="Dataset [recorded in SOURCE]: digits, cifar10, cifar100, tinyimagenet, ...")
@click.option("--data-path", type=click.Path(), help="Where the dataset's files are (not needed for digits).")
@click.option("--model", help="Network [recorded in SOURCE, else ConvNet].")
@click.option("--device", help="cuda, cpu, ... [CUDA when present].")
@click.option("--seed", type=int, help="Seed of every random choice [0].")
@nproc_option
@click.option("--out", type=click.Path(), help="Output folder, a local path [<SOURCE name>-<method>-ipc<ipc>].")
@click.option("--force", is_flag=True, help="Replace a finished (or unfinished) run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-evaluation lines.")
@storage_option
def distill_command(source, config_path, buffer_path, logger, preset, out, force, quiet, nproc, storage_options,
                    **settings):
    """Distill a synthetic set from the experts in SOURCE (a path, or a URL such as
    s3://bucket/experts.ctraj); run it again to resume an interrupted run. The run folder (--out) is local.

    MTT-family spellings work too (--syn_steps, --Iteration, --dsa False, --buffer_path, ...): see
    docs/integrations.md."""
    from trajstore.distill.distributed import launch
    from trajstore.distill.run import DistillConfig, default_out_dir, distill

    if source is None and buffer_path is not None:
        source = upstream_expert_dir(buffer_path, settings["dataset"] or "CIFAR10", bool(settings["zca"]),
                                     settings["model"] or "ConvNet")
    if config_path is not None:
        from trajstore.distill.replay import replayed_config

        config = replayed_config(config_path, source, preset, storage_options=storage_options, **settings)
    elif source is None:
        raise click.UsageError("give SOURCE (a .ctraj, legacy buffer or archive), --buffer_path, or --config")
    else:
        config = DistillConfig.from_preset(source, preset, storage_options=storage_options, **settings)
    out = out or default_out_dir(config, storage_options)
    options = dict(overwrite=force, progress=not quiet, log=no_log if quiet else click.echo, logger=logger)
    if storage_options:
        options["storage_options"] = storage_options
    result = launch(distill, nproc, (config, out), options, device=config.device)
    if result is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    click.echo(f"final set: {result.final_path} (test accuracy {result.final})")
    click.echo(f"best set:  {result.best_path} (test accuracy {result.best}, iteration {result.best_iteration})")
