"""trajstore: convexified expert trajectories (.ctraj) for trajectory-matching dataset distillation."""

__version__ = "0.1.0"

from .beta import anchor_epochs_with, beta_from_norms
from .errors import (ChecksumError, DegenerateTrajectoryError, ExistsError, FormatError, InvalidTensorError,
                     OutOfRangeError, TrajstoreError, UnsafeFileError, VersionError)
from .layers import Layer, layer_table
from .layout import FORMAT_NAME, FORMAT_VERSION
from .reader import CTraj, Expert, open
from .writer import ExpertWriter, Writer, create

__all__ = [
    "open", "create", "CTraj", "Expert", "Writer", "ExpertWriter", "Layer", "layer_table",
    "beta_from_norms", "anchor_epochs_with", "FORMAT_NAME", "FORMAT_VERSION",
    "TrajstoreError", "FormatError", "ChecksumError", "VersionError", "ExistsError", "InvalidTensorError",
    "OutOfRangeError", "UnsafeFileError", "DegenerateTrajectoryError",
]
