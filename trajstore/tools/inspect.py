"""`summary`, `verify` and `plot_betas`: what a .ctraj, a packed archive or a legacy buffer holds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from ..progress import progress_bar
from ..stores import atomic
from ..stores.location import locate
from .convert import open_source
from ..errors import ExistsError, TrajstoreError
from ..format.layers import Layer
from ..legacy.sizes import mtt_buffer_nbytes
from ..format.reader import CTraj
from ..format.reader import open as open_ctraj

MTT_DTYPE = torch.float32  # what MTT buffers (and export_mtt) hold, whatever the store's dtype


def kind_of(path: str | os.PathLike, storage_options: dict | None = None) -> str:
    """"ctraj", "archive" or "legacy" (anything else is left to the legacy reader to refuse); the
    decision is trajstore.stores.location's, for paths and URLs alike."""
    kind = locate(path, storage_options).kind
    return "legacy" if kind == "missing" else kind


def mtt_nbytes(layers, num_timesteps: int, num_experts: int, per_file: int = 10) -> int:
    """Exact bytes of the MTT buffer files (`replay_buffer_{n}.pt`, `per_file` float32 trajectories each)
    that hold `num_experts` trajectories of `num_timesteps` timesteps of these layers (Layers or shapes).

    Computed by laying out torch's zip format around the records torch's own pickler writes, so it
    matches `torch.save` of this torch version to the byte (see trajstore.legacy.sizes).
    """
    shapes = [layer.shape if isinstance(layer, Layer) else tuple(layer) for layer in layers]
    if num_experts < 0 or per_file < 1:
        raise TrajstoreError(f"cannot size {num_experts} experts at {per_file} per file")
    return mtt_buffer_nbytes(shapes, [MTT_DTYPE] * len(shapes), num_timesteps, num_experts, per_file)


def _layer_rows(layers) -> list[dict]:
    return [{"name": layer.name, "shape": list(layer.shape), "count": layer.numel, "dtype": layer.dtype}
            for layer in layers]


def _real_legacy_bytes(held) -> int | None:
    """The real size of the MTT-format files these experts are or came from, where they exist: a buffer of
    full `*replay_buffer_{n}.pt` files itself, or the source files a .ctraj records it was converted from
    (so `inspect` and `convert` report the same bytes); None where only a computed size is possible."""
    if isinstance(held, CTraj):
        prov = held.provenance or {}
        files = prov.get("sources")
        if not str(prov.get("source_kind", "")).endswith("replay_buffer") or not isinstance(files, list):
            return None
        sizes = [f.get("bytes") for f in files if isinstance(f, dict)]
        ok = sizes and len(sizes) == len(files) and all(isinstance(b, int) and b > 0 for b in sizes)
        return sum(sizes) if ok else None
    if str(getattr(held, "kind", "")).endswith("replay_buffer"):
        return held.nbytes
    return None


def summary(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """One JSON-ready dict: num_experts, num_timesteps, anchors, layers [{name, shape, count, dtype}],
    bytes (on disk), legacy_bytes (the same experts as MTT .pt files: the real files' sizes where they
    exist, else `mtt_nbytes`; legacy_bytes_measured says which), ratio, and what the store records about
    architecture and training."""
    location = locate(path, storage_options)
    kind = kind_of(location)
    if kind == "ctraj":
        held = open_ctraj(location)
        out = {"kind": kind, "anchors": list(held.anchor_epochs), "smoothing": held.smoothing}
    else:
        held = open_source(location)  # a legacy buffer stores every epoch (MCT's waypoint stores: waypoints)
        out = {"kind": kind if kind == "archive" else f"legacy {held.kind}", "files": len(held.files),
               "anchors": list(held.anchor_epochs or range(held.num_timesteps))}
    out.update({"path": str(path), "num_experts": held.num_experts, "num_timesteps": held.num_timesteps,
                "num_params": held.num_params, "layers": _layer_rows(held.layers), "bytes": held.nbytes,
                "architecture": held.architecture, "training": held.training})
    real = _real_legacy_bytes(held)
    out["legacy_bytes"] = real if real is not None else mtt_nbytes(held.layers, out["num_timesteps"],
                                                                    out["num_experts"])
    out["legacy_bytes_measured"] = real is not None
    out["ratio"] = out["bytes"] / out["legacy_bytes"] if out["legacy_bytes"] else None
    return out


def verify(path: str | os.PathLike, *, progress: bool = False, storage_options: dict | None = None) -> dict:
    """Re-check structure and every checksum (a .ctraj or an archive) or every trajectory (a legacy
    buffer), expert by expert with a progress bar; raises the first problem as a trajstore error, else
    returns what was checked: {"ok": True, kind, path, num_experts, seconds}."""
    began = time.perf_counter()
    location = locate(path, storage_options)
    kind = kind_of(location)
    if kind == "ctraj":
        store = open_ctraj(location)
        for expert in progress_bar(store, total=store.num_experts, desc="verify", unit="expert", disable=not progress):
            expert.verify()  # what CTraj.verify does, one expert at a time
        count, extra = store.num_experts, {"unlisted": store.unlisted_ids}
    else:
        source = open_source(location)
        check = getattr(source, "check", None)  # an archive also compares each expert with its sha256
        steps = progress_bar(source.iter_trajectories(), total=source.num_experts, desc="verify", unit="expert",
                             disable=not progress)
        for i, trajectory in enumerate(steps):
            if check is not None:
                check(i, trajectory)
        count, kind, extra = source.num_experts, kind if kind == "archive" else f"legacy {source.kind}", {}
    return {"ok": True, "kind": kind, "path": str(path), "num_experts": count,
            "seconds": round(time.perf_counter() - began, 3), **extra}


def check_plottable(path: str | os.PathLike, storage_options: dict | None = None) -> None:
    """Refuse, before anything is printed or drawn, to plot betas of what is not a .ctraj."""
    kind = kind_of(path, storage_options)
    if kind != "ctraj":
        raise TrajstoreError(f"--plot draws the beta schedules of a .ctraj, but this is a {kind} buffer: convert "
                             f"it first (`trajstore convert {path} OUT.ctraj`) and plot that", path)


def plot_betas(ctraj, png: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Draw each layer's beta schedule (mean over experts, band from min to max) against the epoch.

    Each piece between anchors runs from 0 to 1; a straight diagonal would be uniform progress.
    `ctraj` is a path or an open store; an existing PNG is replaced only with `overwrite`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(ctraj, CTraj):
        check_plottable(ctraj)
    store = ctraj if isinstance(ctraj, CTraj) else open_ctraj(ctraj)
    betas = np.stack([e.beta for e in store])  # (E, K+1, L)
    epochs = store.anchor_epochs
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = plt.get_cmap("tab20")
    for piece, (a, b) in enumerate(zip(epochs, epochs[1:])):
        x = np.arange(a, b + 1)
        values = betas[:, a : b + 1].copy()
        values[:, -1] = 1.0  # the end of a piece is 1 by definition (stored as the next piece's 0)
        for l, layer in enumerate(store.layers):
            color = colors(l % 20)
            ax.fill_between(x, values[:, :, l].min(0), values[:, :, l].max(0), color=color, alpha=0.12, lw=0)
            ax.plot(x, values[:, :, l].mean(0), color=color, lw=1.2,
                    label=layer.name if piece == 0 and l < 20 else None)
        ax.plot([a, b], [0, 1], color="black", ls=":", lw=0.8, label="uniform" if piece == 0 else None)
    for e in epochs[1:-1]:
        ax.axvline(e, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch (timestep)")
    ax.set_ylabel("beta (position within the piece)")
    experts = f"{store.num_experts} expert{'s' if store.num_experts != 1 else ''}"
    ax.set_title(f"{Path(store.path).name}: per-layer beta, {experts}, anchors {list(epochs)}")
    ax.set_xlim(0, epochs[-1])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    png = Path(png)
    if png.exists() and not overwrite:
        plt.close(fig)
        raise ExistsError("already exists (pass overwrite=True / --force to replace it)", png)
    tmp = atomic.temp_sibling(png)
    try:
        fig.savefig(tmp, format="png")
        atomic.publish_file(tmp, png, overwrite=overwrite)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png
