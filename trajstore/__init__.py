"""trajstore: convexified expert trajectories (.ctraj) for trajectory-matching dataset distillation.

The public names below are imported on first use (PEP 562), so `import trajstore` and the
`trajstore --help` that goes through it stay fast: torch, zarr and safetensors load only when a
function that needs them is called. The errors are plain Python and import eagerly.
"""

from __future__ import annotations

from importlib import import_module

from .errors import (ChecksumError, DegenerateTrajectoryError, ExistsError, FormatError, InvalidTensorError,
                     IndexTypeError, OutOfRangeError, StorageError, TrajstoreError, UnsafeFileError,
                     VersionError)

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "open": ".format.reader", "CTraj": ".format.reader", "Expert": ".format.reader",
    "create": ".format.writer", "Writer": ".format.writer", "ExpertWriter": ".format.writer",
    "Layer": ".format.layers", "layer_table": ".format.layers",
    "beta_from_norms": ".format.beta", "anchor_epochs_with": ".format.beta",
    "FORMAT_NAME": ".format.layout", "FORMAT_VERSION": ".format.layout",
}

__all__ = [
    "open", "create", "CTraj", "Expert", "Writer", "ExpertWriter", "Layer", "layer_table",
    "beta_from_norms", "anchor_epochs_with", "FORMAT_NAME", "FORMAT_VERSION",
    "TrajstoreError", "FormatError", "ChecksumError", "VersionError", "ExistsError", "InvalidTensorError",
    "OutOfRangeError", "IndexTypeError", "UnsafeFileError", "DegenerateTrajectoryError", "StorageError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trajstore' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
