"""The :class:`Optimizer` base class with MegEngine's semantics.

An optimizer holds *parameter groups*: a list of dicts, each with a ``"params"``
list and its own hyper-parameters (missing ones come from the optimizer's
defaults). ``step()`` updates every parameter that has a gradient and returns the
optimizer, so the MegEngine idiom ``opt.step().clear_grad()`` works;
``clear_grad()`` sets every ``param.grad`` back to ``None``.

The update rules run in numpy on each parameter's array. A parameter keeps its
identity and dtype; its array is replaced by the updated one (so arrays handed out
earlier, e.g. by ``state_dict()``, never change under the caller). float16 and
bfloat16 parameters are updated in float32 and rounded once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..tensor import Parameter, Tensor

__all__ = ["Optimizer"]


class _RequiredParameter:
    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a parameter's update is computed in (float64 stays, others use float32)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class Optimizer:
    """Base class of all optimizers.

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict, or a single Parameter or dict
        The parameters to optimize, or parameter groups: dicts with a ``"params"`` entry
        and optional per-group hyper-parameters.
    defaults : dict
        Default hyper-parameters, used where a group does not set them.

    Notes
    -----
    Subclasses implement ``_create_state(group)`` (allocate per-parameter state) and
    ``_updates(group)`` (update the parameters of one group).

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> from volconv.optimizer import SGD
    >>> w = mge.Parameter(np.ones(2, dtype=np.float32))
    >>> b = mge.Parameter(np.zeros(1, dtype=np.float32))
    >>> opt = SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
    >>> [g["lr"] for g in opt.param_groups]
    [0.1, 0.5]
    >>> w.grad = mge.tensor(np.ones(2, dtype=np.float32))
    >>> opt.step().clear_grad()  # b has no gradient: skipped
    >>> w.numpy(), w.grad
    (array([0.9, 0.9], dtype=float32), None)
    """

    def __init__(self, params: Iterable | Parameter | dict, defaults: dict) -> None:
        self._state: dict[int, dict[str, Any]] = {}
        self._defaults = dict(defaults)
        self.param_groups: list[dict] = []

        if isinstance(params, (Tensor, dict)):
            params = [params]
        elif not isinstance(params, Iterable):
            raise TypeError(
                "params given to the optimizer must be a Parameter or a dict, or an iterable "
                f"of them; got {type(params).__name__}"
            )
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(g, dict) for g in groups):
            pass
        elif any(isinstance(g, dict) for g in groups):
            raise TypeError("params must be all Parameters or all parameter-group dicts")
        else:
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ---- parameter groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (a dict with ``"params"`` and optional hyper-parameters).

        Parameters
        ----------
        param_group : dict
            Missing hyper-parameters are filled in from the defaults.

        Examples
        --------
        >>> import numpy as np, volconv as mge
        >>> from volconv.optimizer import SGD
        >>> opt = SGD([mge.Parameter(np.zeros(1, np.float32))], lr=0.1)
        >>> opt.add_param_group({"params": mge.Parameter(np.zeros(1, np.float32)), "lr": 0.01})
        >>> len(opt.param_groups), opt.param_groups[1]["momentum"]
        (2, 0.0)
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a param group must have a 'params' entry")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, set):
            raise TypeError(
                "optimized parameters must be in an ordered collection (a list), not a set"
            )
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for p in group["params"]:
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"optimizer can only optimize Parameters, but got {type(p).__name__}"
                )
        for name, default in self._defaults.items():
            if default is required and name not in group:
                raise ValueError(f"parameter group didn't specify a value of required {name!r}")
            group.setdefault(name, default)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        new = [id(p) for p in group["params"]]
        if len(set(new)) != len(new) or not seen.isdisjoint(new):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)
        self._create_state(group)

    def _params(self) -> list[Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    # ---- per-parameter state ------------------------------------------------------------------
    def _add_state(self, param: Parameter, name: str, initializer=None) -> None:
        """Create state ``name`` of ``param`` (zeros like ``param`` unless ``initializer``)."""
        state = self._state.setdefault(id(param), {})
        if name in state:
            return
        if initializer is None:
            initializer = np.zeros(param.shape, dtype=compute_dtype(param.dtype))
        state[name] = np.array(initializer, copy=True)

    def _get_state(self, param: Parameter, name: str, initializer=None):
        if name not in self._state.get(id(param), {}):
            self._add_state(param, name, initializer)
        return self._state[id(param)][name]

    def _set_state(self, param: Parameter, name: str, value) -> None:
        self._state.setdefault(id(param), {})[name] = value

    def _create_state(self, param_group: dict) -> None:
        """Allocate the state a group's parameters need (override in subclasses)."""

    def _updates(self, param_group: dict) -> None:
        raise NotImplementedError

    # ---- the training-loop API ----------------------------------------------------------------
    def step(self) -> Optimizer:
        """Update every parameter that has a gradient; returns ``self``.

        Returns
        -------
        Optimizer
            ``self``, so that ``opt.step().clear_grad()`` works.
        """
        for group in self.param_groups:
            if isinstance(group["params"], set):
                raise TypeError(
                    "optimized parameters must be in an ordered collection (a list), not a set"
                )
            self._updates(group)
        return self

    def clear_grad(self) -> None:
        """Set ``.grad`` of every parameter to ``None``.

        Examples
        --------
        >>> import numpy as np, volconv as mge
        >>> from volconv.optimizer import SGD
        >>> w = mge.Parameter(np.ones(1, np.float32))
        >>> w.grad = mge.tensor(np.ones(1, np.float32))
        >>> SGD([w], lr=0.1).clear_grad()
        >>> w.grad is None
        True
        """
        for p in self._params():
            p.grad = None

    def zero_grad(self) -> None:
        """Alias of :meth:`clear_grad` (PyTorch's name); gradients become ``None``."""
        self.clear_grad()

    # ---- (de)serialisation --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state: hyper-parameters per group and per-parameter buffers.

        Parameters are referred to by their position over all groups (as in MegEngine);
        the buffers are numpy copies.

        Returns
        -------
        dict
            ``{"param_groups": [...], "state": {index: {name: value}}}``.

        Examples
        --------
        >>> import numpy as np, volconv as mge
        >>> from volconv.optimizer import SGD
        >>> opt = SGD([mge.Parameter(np.zeros(3, np.float32))], lr=0.1, momentum=0.9)
        >>> sd = opt.state_dict()
        >>> sd["param_groups"][0]["params"], sorted(sd["state"][0])
        ([0], ['momentum_buffer'])
        """
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = []
        for group in self.param_groups:
            g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            g["params"] = [index[id(p)] for p in group["params"]]
            groups.append(g)
        state = {
            index[pid]: {k: np.array(v, copy=True) for k, v in st.items()}
            for pid, st in self._state.items()
            if pid in index
        }
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict` (groups must have the same sizes and keys).

        Examples
        --------
        >>> import numpy as np, volconv as mge
        >>> from volconv.optimizer import SGD
        >>> w = mge.Parameter(np.zeros(2, np.float32))
        >>> a = SGD([w], lr=0.5, momentum=0.9)
        >>> b = SGD([mge.Parameter(np.zeros(2, np.float32))], lr=0.1, momentum=0.9)
        >>> b.load_state_dict(a.state_dict())
        >>> b.param_groups[0]["lr"]
        0.5
        """
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for new, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(new["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of the optimizer's group"
                )
            if set(new) != set(saved):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the keys "
                    "of the optimizer's group"
                )
        new_state: dict[int, dict[str, Any]] = {}
        for new, saved in zip(self.param_groups, saved_groups, strict=True):
            for p, idx in zip(new["params"], saved["params"], strict=True):
                if idx in state["state"]:
                    new_state[id(p)] = {
                        k: np.array(v._data if isinstance(v, Tensor) else v, copy=True)
                        for k, v in state["state"][idx].items()
                    }
            for key, value in saved.items():
                if key != "params":
                    new[key] = copy.deepcopy(value)
        self._state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def grad_array(param: Parameter, dtype: np.dtype) -> np.ndarray:
    """The gradient of ``param`` as a numpy array in ``dtype``."""
    g = param.grad
    return np.asarray(g._data if isinstance(g, Tensor) else g, dtype=dtype)


def assign(param: Parameter, value: np.ndarray) -> None:
    """Give ``param`` the freshly computed ``value``, keeping its dtype and shape."""
    param._data = np.ascontiguousarray(value, dtype=param.dtype).reshape(param.shape)
