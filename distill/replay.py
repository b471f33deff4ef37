"""Replaying a run: the settings of its config.json, with explicit flags on top."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from trajstore.errors import FormatError, TrajstoreError

from .run import CONFIG, DistillConfig


def replayed_config(config_path: str | os.PathLike, source: str | os.PathLike | None = None,
                    preset: str | None = None, *, storage_options: dict | None = None,
                    **overrides) -> DistillConfig:
    """The DistillConfig of the run whose config.json is `config_path` (the file or the run folder).

    Precedence, lowest first: the preset the run named (or `preset`), the run's settings, then every
    non-None override; `source` replaces the run's source when given. `storage_options` reach a source
    at a URL when a preset's method must be read from it (they are never saved in config.json).
    """
    path = Path(config_path)
    if path.is_dir():
        path = path / CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"cannot read the run's settings ({exc.strerror or exc}); expected the config.json "
                          "of a distillation run or its folder", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"not a JSON run config ({exc})", path) from None
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    if not isinstance(doc, dict) or not doc.get("source"):
        raise FormatError("not the config.json of a distillation run (no source)", path)
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise FormatError(f"unknown settings {unknown}: not a config.json this trajstore version wrote", path)
    saved_source, saved_preset = doc.pop("source"), doc.pop("preset", None)
    try:
        return DistillConfig.from_preset(source or saved_source, preset or saved_preset,
                                         storage_options=storage_options, **{**doc, **{k: v for k, v in overrides.items() if v is not None}})
    except TrajstoreError as exc:
        raise TrajstoreError(f"{exc} (settings from {path})") from None
    except (TypeError, ValueError) as exc:  # a hand-edited value of the wrong type
        raise FormatError(f"a setting has the wrong type ({exc})", path) from None
