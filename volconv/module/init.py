"""In-place parameter initialisers (MegEngine's ``megengine.module.init``).

Every random initialiser draws from :mod:`volconv.random`'s global generator, so
``volconv.random.seed(s)`` makes it reproducible (numpy's global seed has no
effect, as in MegEngine). The tensor keeps its identity and dtype.

``calculate_fan_in_and_fan_out`` keeps MegEngine's formula, including its known
wrong answer for a dense 5-D Conv3d weight (it is read as a grouped Conv2d
weight). The layers do not use it: ``Conv3d``'s default initialisation computes
``fan_in = in_channels * kd * kh * kw`` itself.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import random
from ..tensor import Tensor

__all__ = [
    "calculate_correct_fan",
    "calculate_fan_in_and_fan_out",
    "calculate_gain",
    "fill_",
    "msra_normal_",
    "msra_uniform_",
    "normal_",
    "ones_",
    "uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]

_LINEAR_FNS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)


def _check_target(tensor) -> None:
    if not isinstance(tensor, (Tensor, np.ndarray)):
        raise TypeError(
            f"init functions fill a Tensor or numpy array in place, got {type(tensor).__name__}"
        )


def _assign(tensor, values: np.ndarray) -> None:
    """Overwrite ``tensor`` (a Tensor, or a writable ndarray) in place, keeping its dtype."""
    if isinstance(tensor, Tensor):
        tensor.set_value(values)
    else:
        tensor[...] = values


def fill_(tensor: Tensor, val: float) -> None:
    """Fill ``tensor`` with ``val``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros(3, dtype=np.float32))
    >>> M.init.fill_(t, 2.5); t.numpy()
    array([2.5, 2.5, 2.5], dtype=float32)
    """
    _check_target(tensor)
    _assign(tensor, np.full(tensor.shape, val, dtype=tensor.dtype))


def zeros_(tensor: Tensor) -> None:
    """Fill ``tensor`` with 0.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.ones(2, dtype=np.float32)); M.init.zeros_(t); t.numpy()
    array([0., 0.], dtype=float32)
    """
    fill_(tensor, 0)


def ones_(tensor: Tensor) -> None:
    """Fill ``tensor`` with 1.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros(2, dtype=np.float32)); M.init.ones_(t); t.numpy()
    array([1., 1.], dtype=float32)
    """
    fill_(tensor, 1)


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0) -> None:
    """Fill ``tensor`` with samples from ``Uniform(a, b)``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros(1000, dtype=np.float32)); M.init.uniform_(t, -1, 1)
    >>> bool(t.numpy().min() >= -1 and t.numpy().max() <= 1)
    True
    """
    _check_target(tensor)
    _assign(tensor, random.uniform(low=a, high=b, size=tensor.shape)._data)


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0) -> None:
    """Fill ``tensor`` with samples from ``Normal(mean, std**2)``.

    The draw equals ``volconv.random.normal(mean, std, tensor.shape)`` after the
    same ``volconv.random.seed``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros(10000, dtype=np.float32)); M.init.normal_(t, 0.0, 2.0)
    >>> round(float(t.numpy().std()), 1)
    2.0
    """
    _check_target(tensor)
    _assign(tensor, random.normal(mean=mean, std=std, size=tensor.shape)._data)


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Recommended gain for a nonlinearity.

    ``linear``/``conv*``/``sigmoid``: 1; ``tanh``: 5/3; ``relu``: sqrt(2);
    ``leaky_relu``: sqrt(2 / (1 + negative_slope**2)) with ``param`` the slope
    (default 0.01).

    >>> import volconv.module as M
    >>> round(M.init.calculate_gain("relu"), 4)
    1.4142
    """
    if nonlinearity in _LINEAR_FNS or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, numbers.Real) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope**2))
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight, with MegEngine's formula.

    2-D ``(out, in)``: ``(in, out)``. 3-D and 4-D ``(out, in, *k)``:
    ``(in * prod(k), out * prod(k))``. 5-D and 6-D weights are read as grouped
    ``(G, out/G, in/G, *k)``, giving per-group fans ``(in/G * prod(k), out/G * prod(k))``.

    Notes
    -----
    As in MegEngine, a **dense 5-D Conv3d weight** ``(O, I, kd, kh, kw)`` is also
    read as a grouped Conv2d weight, which is wrong: ``Conv3d(2, 3, (5, 7, 9))``
    gives ``(315, 126)`` instead of ``(630, 945)``. Kept for compatibility; the
    layers' default initialisation does not use this function.

    Examples
    --------
    >>> import volconv.module as M
    >>> M.init.calculate_fan_in_and_fan_out(M.Conv3d(2, 4, (5, 7, 9), groups=2).weight)
    (315, 630)
    >>> M.init.calculate_fan_in_and_fan_out(M.Linear(3, 5).weight)
    (3, 5)
    """
    shape = tuple(tensor.shape)
    if len(shape) < 2:
        raise ValueError(
            "fan_in and fan_out can not be computed for tensor with fewer than 2 dimensions, "
            f"got shape {shape}"
        )
    if len(shape) == 2:
        return shape[1], shape[0]
    if len(shape) >= 5:  # the groups axis is dropped (MegEngine's FIXME: wrong for dense conv3d)
        shape = shape[1:]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_correct_fan(tensor: Tensor, mode: str) -> int:
    """``fan_in`` or ``fan_out`` (``mode``, any case) of :func:`calculate_fan_in_and_fan_out`.

    >>> import volconv.module as M
    >>> M.init.calculate_correct_fan(M.Linear(3, 5).weight, "fan_out")
    5
    """
    mode = mode.lower()
    valid = ["fan_in", "fan_out"]
    if mode not in valid:
        raise ValueError(f"Mode {mode} not supported, please use one of {valid}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def xavier_uniform_(tensor: Tensor, gain: float = 1.0) -> None:
    """Glorot uniform: ``Uniform(-a, a)``, ``a = gain * sqrt(6 / (fan_in + fan_out))``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros((3, 5), dtype=np.float32)); M.init.xavier_uniform_(t)
    >>> bool(np.abs(t.numpy()).max() <= 1.0)
    True
    """
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    bound = math.sqrt(3.0) * std
    uniform_(tensor, -bound, bound)


def xavier_normal_(tensor: Tensor, gain: float = 1.0) -> None:
    """Glorot normal: ``Normal(0, std**2)``, ``std = gain * sqrt(2 / (fan_in + fan_out))``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros((300, 500), dtype=np.float32)); M.init.xavier_normal_(t)
    >>> round(float(t.numpy().std()), 3)
    0.05
    """
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    normal_(tensor, 0.0, std)


def msra_uniform_(
    tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> None:
    """He uniform: ``Uniform(-bound, bound)``, ``bound = sqrt(3) * gain / sqrt(fan)``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros((4, 6), dtype=np.float32)); M.init.msra_uniform_(t)
    >>> bool(np.abs(t.numpy()).max() <= 1.0)
    True
    """
    fan = calculate_correct_fan(tensor, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    uniform_(tensor, -bound, bound)


def msra_normal_(
    tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> None:
    """He normal: ``Normal(0, std**2)``, ``std = gain / sqrt(fan)``.

    >>> import numpy as np, volconv as mge, volconv.module as M
    >>> t = mge.Parameter(np.zeros((500, 200), dtype=np.float32))
    >>> M.init.msra_normal_(t, nonlinearity="relu")
    >>> round(float(t.numpy().std()), 2)
    0.1
    """
    fan = calculate_correct_fan(tensor, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    normal_(tensor, 0, std)
