"""Reductions, elementwise maths and shape operations with gradients."""

from __future__ import annotations

import numpy as np

from ..autodiff import record
from ..tensor import Tensor

__all__ = ["exp", "flatten", "log", "matmul", "mean", "reshape", "sum", "transpose"]


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor._wrap(np.asarray(x))


def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(a % ndim for a in axes)


def sum(inp, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - MegEngine's name
    """Sum over ``axis`` (all axes by default).

    >>> import volconv as mge, volconv.functional as F
    >>> F.sum(mge.tensor([[1.0, 2.0], [3.0, 4.0]]), axis=1).numpy()
    array([3., 7.], dtype=float32)
    """
    x = _t(inp)
    axes = _axes(axis, x.ndim)
    out = Tensor._wrap(np.asarray(x._data.sum(axis=axes, keepdims=keepdims)))
    shape = x.shape

    def backward(g):
        g = g if keepdims else np.expand_dims(g, axes)
        return (np.broadcast_to(g, shape).copy(),)

    record(out, (x,), backward)
    return out


def mean(inp, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` (all axes by default).

    >>> import volconv as mge, volconv.functional as F
    >>> float(F.mean(mge.tensor([1.0, 2.0, 3.0])).numpy())
    2.0
    """
    x = _t(inp)
    count = 1
    for a in _axes(axis, x.ndim):
        count *= x.shape[a]
    return sum(x, axis, keepdims) * (1.0 / max(count, 1))


def exp(inp) -> Tensor:
    """Elementwise ``e**x``.

    >>> import volconv as mge, volconv.functional as F
    >>> F.exp(mge.tensor([0.0])).numpy()
    array([1.], dtype=float32)
    """
    x = _t(inp)
    out = Tensor._wrap(np.exp(x._data))
    record(out, (x,), lambda g: (g * out._data,))
    return out


def log(inp) -> Tensor:
    """Elementwise natural logarithm.

    >>> import volconv as mge, volconv.functional as F
    >>> F.log(mge.tensor([1.0])).numpy()
    array([0.], dtype=float32)
    """
    x = _t(inp)
    data = x._data
    out = Tensor._wrap(np.log(data))
    record(out, (x,), lambda g: (g / data,))
    return out


def matmul(inp1, inp2) -> Tensor:
    """Matrix product of two 2-D (or batched) tensors.

    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> F.matmul(mge.tensor(np.eye(2)), mge.tensor(np.ones((2, 3)))).shape
    (2, 3)
    """
    a, b = _t(inp1), _t(inp2)
    A, B = a._data, b._data
    out = Tensor._wrap(np.matmul(A, B))

    def backward(g):
        ga = np.matmul(g, np.swapaxes(B, -1, -2))
        gb = np.matmul(np.swapaxes(A, -1, -2), g)
        from ..tensor import _unbroadcast

        return _unbroadcast(ga, A.shape), _unbroadcast(gb, B.shape)

    record(out, (a, b), backward)
    return out


def reshape(inp, target_shape) -> Tensor:
    """Reshape without changing the data.

    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> F.reshape(mge.tensor(np.zeros(6)), (2, 3)).shape
    (2, 3)
    """
    x = _t(inp)
    shape = x.shape
    out = Tensor._wrap(x._data.reshape(target_shape).copy())
    record(out, (x,), lambda g: (g.reshape(shape),))
    return out


def flatten(inp, start_axis: int = 0, end_axis: int = -1) -> Tensor:
    """Merge the axes ``start_axis..end_axis`` into one.

    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> F.flatten(mge.tensor(np.zeros((2, 3, 4))), 1).shape
    (2, 12)
    """
    x = _t(inp)
    end = end_axis % x.ndim if x.ndim else 0
    shape = x.shape[:start_axis] + (-1,) + x.shape[end + 1 :]
    return reshape(x, shape)


def transpose(inp, pattern=None) -> Tensor:
    """Permute the axes (reverse them when ``pattern`` is None).

    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> F.transpose(mge.tensor(np.zeros((2, 3))), (1, 0)).shape
    (3, 2)
    """
    x = _t(inp)
    perm = tuple(range(x.ndim))[::-1] if pattern is None else tuple(pattern)
    inverse = tuple(np.argsort(perm))
    out = Tensor._wrap(np.ascontiguousarray(x._data.transpose(perm)))
    record(out, (x,), lambda g: (g.transpose(inverse),))
    return out
