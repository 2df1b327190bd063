"""Adam with bias correction, as in MegEngine."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..tensor import Parameter
from .optimizer import Optimizer, assign, compute_dtype, grad_array

__all__ = ["Adam"]


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) with MegEngine's update rule.

    For every parameter ``p`` with a gradient ``g``, with ``t`` counting this
    parameter's steps from 1 and ``m``, ``v`` starting at zero::

        g = g + weight_decay * p                       # L2 penalty, if weight_decay != 0
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

    Parameters
    ----------
    params : iterable of Parameter or of dict
        Parameters, or parameter groups (dicts with ``"params"`` and optional ``lr``,
        ``betas``, ``eps``, ``weight_decay``).
    lr : float
        Learning rate (>= 0).
    betas : tuple of 2 floats
        Decay rates of the running averages of the gradient and its square, each in
        ``[0, 1)``. Default ``(0.9, 0.999)``.
    eps : float
        Added to the denominator. Default ``1e-8``.
    weight_decay : float
        L2 penalty added to the gradient (>= 0). Default 0.

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> from volconv.optimizer import Adam
    >>> w = mge.Parameter(np.array([1.0, -1.0], dtype=np.float32))
    >>> opt = Adam([w], lr=0.1)
    >>> w.grad = mge.tensor(np.array([0.5, -2.0], dtype=np.float32))
    >>> opt.step().clear_grad()
    >>> w.numpy().round(4)  # the first step moves each entry by about lr * sign(g)
    array([ 0.9, -0.9], dtype=float32)
    """

    def __init__(
        self,
        params: Iterable[Parameter] | Iterable[dict] | Parameter | dict,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if eps < 0.0:
            raise ValueError(f"Invalid eps value: {eps}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
        super().__init__(params, defaults)

    def _create_state(self, param_group: dict) -> None:
        for p in param_group["params"]:
            self._add_state(p, "exp_avg")
            self._add_state(p, "exp_avg_sq")
            self._add_state(p, "step", initializer=0.0)

    def _updates(self, param_group: dict) -> None:
        for p in param_group["params"]:
            if p.grad is None:
                continue
            dt = compute_dtype(p.dtype)
            one = dt.type(1.0)
            lr = dt.type(param_group["lr"])
            eps = dt.type(param_group["eps"])
            beta1, beta2 = (dt.type(b) for b in param_group["betas"])
            data = np.asarray(p._data, dtype=dt)
            grad = grad_array(p, dt)
            if param_group["weight_decay"] != 0.0:
                grad = grad + data * dt.type(param_group["weight_decay"])
            step = float(self._get_state(p, "step", 0.0)) + 1.0
            m = np.asarray(self._get_state(p, "exp_avg"), dtype=dt) * beta1 + grad * (one - beta1)
            v = np.asarray(self._get_state(p, "exp_avg_sq"), dtype=dt) * beta2 + (one - beta2) * (
                grad * grad
            )
            self._set_state(p, "step", np.array(step))
            self._set_state(p, "exp_avg", m)
            self._set_state(p, "exp_avg_sq", v)
            t = dt.type(step)
            bias1 = one - beta1**t
            bias2 = one - beta2**t
            delta = (m / bias1) / (np.sqrt(v / bias2) + eps)
            assign(p, data - lr * delta)
