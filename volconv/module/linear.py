"""``Linear``: ``y = x @ weight.T + bias`` (MegEngine's ``megengine.module.Linear``)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..functional.nn import linear
from ..tensor import Parameter, Tensor
from . import init
from .module import Module

__all__ = ["Linear"]

_COMPUTE_MODES = ("default", "float32")


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


class Linear(Module):
    """Fully connected layer: ``y = x @ weight.T + bias``.

    The weight ``(out_features, in_features)`` starts as
    ``Normal(0, sqrt(1 / in_features))`` and the bias ``(out_features,)`` as
    zeros, as in MegEngine 1.13 (``Linear.reset_parameters``).

    Parameters
    ----------
    in_features : int
        Size of each input sample (>= 1).
    out_features : int
        Size of each output sample (>= 0).
    bias : bool
        Learn an additive bias.
    compute_mode : {"default", "float32"}
        Accepted for MegEngine compatibility; volconv always accumulates in at
        least float32, so it has no effect.
    name : str, optional
        The module's name (keyword only).

    Examples
    --------
    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> m = M.Linear(in_features=3, out_features=1)
    >>> m(mge.tensor(np.arange(0, 6).astype("float32").reshape(2, 3))).shape
    (2, 1)
    >>> m
    Linear(in_features=3, out_features=1, bias=True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_mode: str = "default",
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if compute_mode not in _COMPUTE_MODES:
            raise ValueError(f"compute_mode must be one of {_COMPUTE_MODES}, got {compute_mode!r}")
        self.out_features = _count(out_features, "out_features", 0)
        self.in_features = _count(in_features, "in_features", 1)
        self.weight = Parameter(np.zeros((self.out_features, self.in_features), dtype=np.float32))
        self.bias = None
        if bias:
            self.bias = Parameter(np.zeros((self.out_features,), dtype=np.float32))
        self.compute_mode = compute_mode
        self.reset_parameters()

    def _get_fanin(self) -> int:
        return self.in_features

    def reset_parameters(self) -> None:
        """Draw the weight from ``Normal(0, sqrt(1 / in_features))`` and zero the bias."""
        init.normal_(self.weight, 0.0, math.sqrt(1 / self._get_fanin()))
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x) -> Tensor:
        """``x @ weight.T + bias`` for ``x`` of shape ``(..., in_features)``."""
        return linear(x, self.weight, self.bias)

    def _module_info_string(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
