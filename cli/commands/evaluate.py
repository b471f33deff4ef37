"""`trajstore evaluate`: test accuracy of a distilled set, or of the random real-subset baseline."""

from __future__ import annotations

import click

from trajstore.cli.main import cli


@cli.command("evaluate")
@click.argument("synset", required=False, type=click.Path())
@click.pass_context
@click.option("--random", "random_baseline", is_flag=True,
              help="Evaluate a random real subset of --ipc images per class instead of SYNSET.")
@click.option("--ipc", type=click.IntRange(min=1), help="Images per class of the --random subset.")
@click.option("--dataset", default="digits", show_default=True,
              help="Dataset of the --random baseline or of an upstream .pt set.")
@click.option("--zca/--no-zca", default=False, show_default=True,
              help="ZCA space for the --random baseline or an upstream .pt set.")
@click.option("--lr", default=0.01, show_default=True, type=float, help="Learning rate of the --random baseline "
              "(a distilled set uses its learned lr; given explicitly, it replaces an upstream lr_best.pt).")
@click.option("--data-path", type=click.Path(), help="Where the dataset's files are (not needed for digits).")
@click.option("--num-nets", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--epochs", type=click.IntRange(min=0), help="Training epochs per network (default 1000, as upstream).")
@click.option("--model", help="Network to train (default: the set's, else ConvNet).")
@click.option("--dsa/--no-dsa", default=True, show_default=True)
@click.option("--together/--one-by-one", default=None, help="Train the networks at once as one stacked network "
              "(same protocol and draws) or one after another [together on a GPU, one by one on the CPU].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help="cuda, cpu, ... (default: CUDA when present, else the CPU).")
@click.option("--grid", type=click.Path(), help="Also save the evaluated images as a PNG grid here.")
@click.option("--force", is_flag=True, help="Replace an existing --grid PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(ctx, synset, random_baseline, ipc, dataset, zca, lr, data_path, num_nets, epochs, model, dsa,
                     together, seed, device, grid, force, quiet):
    """Train fresh networks on SYNSET (the family's protocol) and print mean +- std test accuracy.

    SYNSET is a trajstore set (.safetensors) or upstream's images_best.pt (with labels_best.pt and
    lr_best.pt beside it; name its --dataset and --zca, and --lr when there is no lr_best.pt)."""
    from trajstore.distill.evaluate import evaluate_file, evaluate_random, evaluate_upstream

    common = dict(data_path=data_path, num_nets=num_nets, epochs=epochs, dsa=dsa, seed=seed, device=device,
                  progress=not quiet, grid=grid, overwrite=force, together=together)
    if random_baseline:
        if synset is not None or ipc is None:
            raise click.UsageError("--random takes --ipc and no SYNSET")
        result = evaluate_random(dataset, ipc=ipc, zca=zca, lr=lr, model=model or "ConvNet", **common)
        what = f"random {ipc} images per class of {dataset}"
    else:
        if synset is None:
            raise click.UsageError("give a SYNSET file, or --random --ipc N for the baseline")
        if synset.endswith(".pt"):
            given_lr = lr if ctx.get_parameter_source("lr") is click.core.ParameterSource.COMMANDLINE else None
            result = evaluate_upstream(synset, dataset=dataset, zca=zca, lr=given_lr, model=model or "ConvNet",
                                       **common)
        else:
            result = evaluate_file(synset, model=model, **common)
        what = synset
    click.echo(f"{what}: test accuracy {result}")
    click.echo("per network: " + ", ".join(f"{100 * a:.2f}" for a in result.accuracies))
