"""Activation layers."""

from __future__ import annotations

from ..functional.nn import relu
from ..tensor import Tensor
from .module import Module

__all__ = ["ReLU"]


class ReLU(Module):
    """Rectified linear unit, ``max(x, 0)``, as a layer.

    >>> import numpy as np, volconv.module as M
    >>> M.ReLU()(np.array([-1.0, 2.0], dtype=np.float32)).numpy()
    array([0., 2.], dtype=float32)
    >>> M.ReLU()
    ReLU()
    """

    def forward(self, x) -> Tensor:
        """``max(x, 0)`` elementwise."""
        return relu(x)
