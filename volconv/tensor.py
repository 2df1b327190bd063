"""``Tensor`` and ``Parameter``: a numpy array that can take part in autodiff.

A Tensor owns a private copy of its data (creating one never aliases the
caller's array, so inputs are never mutated). Arithmetic records itself on the
autodiff tape when a :class:`~volconv.autodiff.GradManager` is recording.
"""

from __future__ import annotations

import numbers

import numpy as np

from .autodiff import record

__all__ = ["Parameter", "Tensor", "tensor"]


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched to reach it."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _default_dtype(data) -> np.dtype | None:
    """MegEngine's defaults for Python data: floats become float32, ints int32."""
    if isinstance(data, (np.ndarray, np.generic, Tensor)):
        return None
    probe = np.asarray(data)
    if probe.dtype == np.float64:
        return np.dtype(np.float32)
    if probe.dtype == np.int64:
        return np.dtype(np.int32)
    return None


class Tensor:
    """An n-dimensional array with an optional gradient.

    Parameters
    ----------
    data : array_like or Tensor
        Copied. Python floats default to float32 and Python ints to int32 (as in
        MegEngine); numpy arrays keep their dtype (float64 stays float64).
    dtype : dtype, optional
        Convert to this dtype.

    Examples
    --------
    >>> import volconv as mge
    >>> t = mge.tensor([1.0, 2.0])
    >>> t.dtype, t.shape
    (dtype('float32'), (2,))
    >>> (t * 2 + 1).numpy()
    array([3., 5.], dtype=float32)
    """

    __array_priority__ = 1000

    def __init__(self, data=None, dtype=None) -> None:
        if isinstance(data, Tensor):
            data = data._data
        if dtype is None:
            dtype = _default_dtype(data)
        arr = np.array(data, dtype=dtype, copy=True)
        if arr.dtype == object:
            raise TypeError("Tensor data must be numeric, got an object array")
        self._data = arr
        self.grad: Tensor | None = None
        self._node = None
        self._attached = 0

    @classmethod
    def _wrap(cls, arr: np.ndarray) -> Tensor:
        """A Tensor around ``arr`` without copying (for freshly computed results)."""
        t = Tensor.__new__(Tensor)
        t._data = arr
        t.grad = None
        t._node = None
        t._attached = 0
        return t

    # ---- array protocol -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def size(self) -> int:
        return self._data.size

    def numpy(self) -> np.ndarray:
        """A copy of the data as a numpy array."""
        return self._data.copy()

    def item(self):
        return self._data.item()

    def __array__(self, dtype=None, copy=None):
        arr = self._data if dtype is None else self._data.astype(dtype)
        return arr.copy() if copy else arr

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        body = np.array2string(self._data, separator=" ", prefix="Tensor(")
        return f"Tensor({body}, device=cpu0:0)"

    def __float__(self) -> float:
        return float(self._data)

    def __int__(self) -> int:
        return int(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __hash__(self) -> int:
        return id(self)

    # ---- differentiable operations ----------------------------------------------------------
    def _binary(self, other, fn, grad_fn):
        a = self._data
        o = other if isinstance(other, Tensor) else Tensor._wrap(np.asarray(_scalar(other, a)))
        b = o._data
        out = Tensor._wrap(np.asarray(fn(a, b)))

        def backward(g):
            ga, gb = grad_fn(g, a, b, out._data)
            return (
                None if ga is None else _unbroadcast(ga, a.shape),
                None if gb is None else _unbroadcast(gb, b.shape),
            )

        record(out, (self, o), backward)
        return out

    def __add__(self, other):
        return self._binary(other, np.add, lambda g, a, b, y: (g, g))

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        return self._binary(other, np.subtract, lambda g, a, b, y: (g, -g))

    def __rsub__(self, other):
        return (-self).__add__(other)

    def __mul__(self, other):
        return self._binary(other, np.multiply, lambda g, a, b, y: (g * b, g * a))

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        return self._binary(other, np.true_divide, lambda g, a, b, y: (g / b, -g * a / (b * b)))

    def __rtruediv__(self, other):
        return Tensor._wrap(np.asarray(_scalar(other, self._data))).__truediv__(self)

    def __pow__(self, other):
        def grad(g, a, b, y):
            ga = g * b * np.power(a, b - 1)
            gb = g * y * np.log(np.where(a > 0, a, 1)) if isinstance(other, Tensor) else None
            return ga, gb

        return self._binary(other, np.power, grad)

    def __neg__(self):
        out = Tensor._wrap(-self._data)
        record(out, (self,), lambda g: (-g,))
        return out

    def __matmul__(self, other):
        from .functional import matmul

        return matmul(self, other)

    def __getitem__(self, index):
        index = index._data if isinstance(index, Tensor) else index
        shape, dtype = self._data.shape, self._data.dtype
        out = Tensor._wrap(np.array(self._data[index]))

        def backward(g):
            full = np.zeros(shape, dtype=dtype)
            np.add.at(full, index, g)
            return (full,)

        record(out, (self,), backward)
        return out

    # comparisons: no gradient
    def __lt__(self, other):
        return Tensor._wrap(self._data < _data(other))

    def __le__(self, other):
        return Tensor._wrap(self._data <= _data(other))

    def __gt__(self, other):
        return Tensor._wrap(self._data > _data(other))

    def __ge__(self, other):
        return Tensor._wrap(self._data >= _data(other))

    def __eq__(self, other):  # type: ignore[override]
        return Tensor._wrap(self._data == _data(other))

    def __ne__(self, other):  # type: ignore[override]
        return Tensor._wrap(self._data != _data(other))

    # ---- methods that forward to the functional API ----------------------------------------
    def reshape(self, *shape):
        from .functional import reshape

        return reshape(self, shape[0] if len(shape) == 1 else shape)

    def flatten(self, start_axis: int = 0, end_axis: int = -1):
        from .functional import flatten

        return flatten(self, start_axis, end_axis)

    def transpose(self, *axes):
        from .functional import transpose

        return transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    @property
    def T(self):
        return self.transpose()

    def sum(self, axis=None, keepdims: bool = False):
        from .functional import sum as _sum

        return _sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        from .functional import mean

        return mean(self, axis, keepdims)

    def astype(self, dtype):
        src = self._data.dtype
        out = Tensor._wrap(self._data.astype(dtype))
        record(out, (self,), lambda g: (g.astype(src),))
        return out

    def detach(self) -> Tensor:
        return Tensor._wrap(self._data)

    def set_value(self, value) -> None:
        """Replace the data in place (keeps identity; used by optimizers and loading)."""
        self._data = np.array(_data(value), dtype=self._data.dtype, copy=True)


class Parameter(Tensor):
    """A Tensor that a :class:`~volconv.module.Module` owns as a trainable parameter."""

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[len("Tensor") :]


def _data(value):
    return value._data if isinstance(value, Tensor) else value


def _scalar(value, like: np.ndarray):
    """Python scalars take the tensor's dtype (``t * 2`` stays float32)."""
    if isinstance(value, numbers.Number) and like.dtype.kind in "fc":
        return np.asarray(value, dtype=like.dtype)
    return np.asarray(value)


def tensor(data, dtype=None) -> Tensor:
    """Create a :class:`Tensor` (a copy of ``data``).

    Parameters
    ----------
    data : array_like or Tensor
    dtype : dtype, optional

    Returns
    -------
    Tensor

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> mge.tensor(np.arange(4, dtype=np.float32)).shape
    (4,)
    """
    return Tensor(data, dtype=dtype)
