"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..tensor import Parameter
from .optimizer import Optimizer, assign, compute_dtype, grad_array

__all__ = ["SGD"]


class SGD(Optimizer):
    r"""Stochastic gradient descent, with MegEngine's update rule.

    For every parameter ``p`` with a gradient ``g`` (all in ``p``'s dtype; float16 in
    float32)::

        g = g + weight_decay * p                # if weight_decay != 0
        v = momentum * v + g                    # if momentum != 0 (v starts at 0)
        g = g + momentum * v if nesterov else v
        p = p - lr * g

    so the first momentum step is exactly ``p - lr * g``.

    Parameters
    ----------
    params : iterable of Parameter or of dict
        Parameters, or parameter groups (dicts with ``"params"`` and optional ``lr``,
        ``momentum``, ``weight_decay``).
    lr : float
        Learning rate (>= 0).
    momentum : float
        Momentum factor (>= 0). Default 0.
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``). Default False.
    weight_decay : float
        L2 penalty added to the gradient (>= 0). Default 0.

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> from volconv.optimizer import SGD
    >>> w = mge.Parameter(np.array([1.0, 2.0], dtype=np.float32))
    >>> opt = SGD([w], lr=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     w.grad = mge.tensor(np.array([1.0, 1.0], dtype=np.float32))
    ...     opt.step().clear_grad()
    >>> w.numpy()  # 1 - 0.1*1 - 0.1*(0.9 + 1)
    array([0.71, 1.71], dtype=float32)
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Iterable[dict] | Parameter | dict,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and momentum <= 0.0:
            raise ValueError("Nesterov momentum requires a momentum > 0")
        self.nesterov = bool(nesterov)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _create_state(self, param_group: dict) -> None:
        if param_group["momentum"] != 0.0:
            for p in param_group["params"]:
                self._add_state(p, "momentum_buffer")

    def _updates(self, param_group: dict) -> None:
        for p in param_group["params"]:
            if p.grad is None:
                continue
            dt = compute_dtype(p.dtype)
            lr = dt.type(param_group["lr"])
            weight_decay = dt.type(param_group["weight_decay"])
            momentum = dt.type(param_group["momentum"])
            data = np.asarray(p._data, dtype=dt)
            grad = grad_array(p, dt)
            if param_group["weight_decay"] != 0.0:
                grad = grad + data * weight_decay
            if param_group["momentum"] != 0.0:
                v = self._get_state(p, "momentum_buffer")
                v = np.asarray(v, dtype=dt) * momentum + grad
                self._set_state(p, "momentum_buffer", v)
                grad = grad + v * momentum if self.nesterov else v
            assign(p, data - lr * grad)
