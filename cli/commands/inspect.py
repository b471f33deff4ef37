"""`trajstore inspect`: what a .ctraj, an archive or a legacy buffer holds."""

from __future__ import annotations

import json

import click

from trajstore.cli.main import cli
from trajstore.cli.options import SOURCE, storage_option


def _human(s: dict) -> str:
    lines = [f"{s['path']} ({s['kind']})",
             f"  experts    {s['num_experts']}",
             f"  timesteps  {s['num_timesteps']} (K = {s['num_timesteps'] - 1})",
             f"  anchors    {s['anchors']}" + (f", smoothing {s['smoothing']}" if s.get("smoothing") else ""),
             f"  params     {s['num_params']:,}"]
    if s.get("architecture"):
        lines.append(f"  arch       {s['architecture'].get('name', s['architecture'])}")
    width = max(len(layer["name"]) for layer in s["layers"])
    lines.append("  layers")
    for layer in s["layers"]:
        shape = "x".join(str(d) for d in layer["shape"]) or "scalar"
        lines.append(f"    {layer['name']:<{width}}  {shape:<16} {layer['count']:>12,}  {layer['dtype']}")
    ratio = f" = {100 * s['ratio']:.2f}%" if s["ratio"] is not None else ""
    lines.append(f"  bytes      {s['bytes']:,} on disk{ratio} of {s['legacy_bytes']:,} as MTT .pt files")
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("path", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", type=click.Path(), help="Draw the per-layer beta curves of a .ctraj to this PNG.")
@click.option("--force", is_flag=True, help="Replace an existing --plot PNG.")
@storage_option
def inspect_command(path, as_json, plot, force, storage_options):
    """Experts, timesteps, anchors, layer table and bytes on disk against the equivalent MTT buffer."""
    import trajstore
    from trajstore.tools.inspect import check_plottable, plot_betas, summary

    if plot:
        check_plottable(path, storage_options)  # refuse before printing, not after
    s = summary(path, storage_options)
    click.echo(json.dumps(s, indent=2) if as_json else _human(s))
    if plot:
        written = plot_betas(trajstore.open(path, storage_options=storage_options), plot, overwrite=force)
        if not as_json:
            click.echo(f"wrote {written}")
