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
@click.option("--models", help="Cross-architecture table: these networks, comma-separated, e.g. "
              "ConvNet,ResNet18,VGG11,AlexNet (instead of --model).")
@click.option("--report", type=click.Path(), help="Where the --models table goes: REPORT.json, .md and .png "
              "[beside SYNSET: <SYNSET>_crossarch; for --random: ./random_ipc<N>_crossarch].")
@click.option("--dsa/--no-dsa", default=True, show_default=True)
@click.option("--together/--one-by-one", default=None, help="Train the networks at once as one stacked network "
              "(same protocol and draws) or one after another [stacked on a GPU; on the CPU side by side, "
              "one network per core].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", help="cuda, cpu, ... (default: CUDA when present, else the CPU).")
@click.option("--grid", type=click.Path(), help="Also save the evaluated images as a PNG grid here.")
@click.option("--force", is_flag=True, help="Replace an existing --grid PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_command(ctx, synset, random_baseline, ipc, dataset, zca, lr, data_path, num_nets, epochs, model, models,
                     report, dsa, together, seed, device, grid, force, quiet):
    """Train fresh networks on SYNSET (the family's protocol) and print mean +- std test accuracy.

    SYNSET is a trajstore set (.safetensors) or upstream's images_best.pt (with labels_best.pt and
    lr_best.pt beside it; name its --dataset and --zca, and --lr when there is no lr_best.pt)."""
    from trajstore.distill.evaluate import evaluate_file, evaluate_random, evaluate_upstream

    if models is not None and model is not None:
        raise click.UsageError("give --model (one network) or --models (a table), not both")
    common = dict(data_path=data_path, num_nets=num_nets, epochs=epochs, dsa=dsa, seed=seed, device=device,
                  progress=not quiet, overwrite=force, together=together)
    if random_baseline:
        if synset is not None or ipc is None:
            raise click.UsageError("--random takes --ipc and no SYNSET")
        what = f"random {ipc} images per class of {dataset}"

        def run(net, grid):
            return evaluate_random(dataset, ipc=ipc, zca=zca, lr=lr, model=net or "ConvNet", grid=grid, **common)
    else:
        if synset is None:
            raise click.UsageError("give a SYNSET file, or --random --ipc N for the baseline")
        what = synset
        if synset.endswith(".pt"):
            given_lr = lr if ctx.get_parameter_source("lr") is click.core.ParameterSource.COMMANDLINE else None

            def run(net, grid):
                return evaluate_upstream(synset, dataset=dataset, zca=zca, lr=given_lr, model=net or "ConvNet",
                                         grid=grid, **common)
        else:
            def run(net, grid):
                return evaluate_file(synset, model=net, grid=grid, **common)
    if models is not None:
        from pathlib import Path

        from trajstore.distill.crossarch import check_report, cross_architecture, parse_models, write_report

        names = parse_models(models)
        prefix = report or (f"random_ipc{ipc}_crossarch" if random_baseline
                            else str(Path(synset).with_suffix("")) + "_crossarch")
        check_report(prefix, force)
        table = cross_architecture({what: lambda net: run(net, grid if net == names[0] else None)}, names,
                                   settings={"num_nets": num_nets, "epochs": epochs, "dsa": dsa, "seed": seed},
                                   log=click.echo)
        click.echo(str(table))
        for path in write_report(table, prefix, overwrite=force):
            click.echo(f"wrote {path}")
        return
    result = run(model, grid)
    click.echo(f"{what}: test accuracy {result}")
    click.echo("per network: " + ", ".join(f"{100 * a:.2f}" for a in result.accuracies))
