"""ZCA whitening as the trajectory-matching family does it (kornia, eps 0.1), invertible for viewing.

The fitted state is three plain tensors, so it can travel inside a distilled-set file or a checkpoint
and a synthetic set can be un-whitened long after the training data are gone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from kornia.enhance import ZCAWhitening

from trajstore.errors import FormatError

EPS = 0.1
STATE_KEYS = ("mean_vector", "transform_matrix", "transform_inv")


class ZCA:
    """`kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)` with a plain-tensor state."""

    def __init__(self, eps: float = EPS):
        self.eps = eps
        self._module = ZCAWhitening(eps=eps, compute_inv=True)

    @property
    def fitted(self) -> bool:
        return self._module.fitted

    @property
    def num_features(self) -> int:
        """C * H * W of the images it was fitted on."""
        return self._module.mean_vector.shape[1]

    def fit(self, images: torch.Tensor) -> "ZCA":
        """Fit on a whole (N, C, H, W) training set, as upstream does."""
        self._module.fit(images.float())
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten a batch (any device; the transform follows the batch)."""
        self._module.to(x.device)
        return self._module(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the whitening (for looking at images)."""
        self._module.to(x.device)
        return self._module.inverse_transform(x)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fit as contiguous CPU float32 tensors, ready for safetensors."""
        if not self.fitted:
            raise ValueError("the ZCA transform has not been fitted")
        return {k: getattr(self._module, k).detach().to("cpu", torch.float32).contiguous() for k in STATE_KEYS}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], eps: float = EPS, where=None) -> "ZCA":
        """Rebuild a fitted transform from `state_dict()`'s tensors."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise FormatError(f"ZCA state lacks {missing}", where)
        d = state["transform_matrix"].shape
        if (len(d) != 2 or d[0] != d[1] or tuple(state["transform_inv"].shape) != tuple(d)
                or tuple(state["mean_vector"].shape) != (1, d[0])):
            raise FormatError("ZCA state has inconsistent shapes "
                              f"{[tuple(state[k].shape) for k in STATE_KEYS]}", where)
        zca = cls(eps)
        zca._module.load_state_dict({k: state[k] for k in STATE_KEYS})
        return zca
