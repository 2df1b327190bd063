"""A readable autograd tape with MegEngine's ``GradManager`` semantics.

Every differentiable operation that runs while a ``GradManager`` is recording,
and that has at least one input needing a gradient, stores a :class:`Node` on
its output: the input tensors and a closure mapping the output's gradient to
theirs (micrograd's ``_backward``). ``GradManager.backward`` walks those nodes in
reverse topological order and *adds* the results into ``.grad`` of the attached
tensors, so gradients accumulate over repeated backward passes until an
optimizer's ``clear_grad()`` resets them to ``None``.

>>> import numpy as np, volconv as mge
>>> from volconv.autodiff import GradManager
>>> w = mge.Parameter(np.array([2.0, 3.0], dtype=np.float32))
>>> gm = GradManager().attach([w])
>>> with gm:
...     loss = (w * w).sum()
...     gm.backward(loss)
>>> w.grad.numpy()
array([4., 6.], dtype=float32)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GradManager", "Node", "is_recording"]

_local = threading.local()


def _active() -> list[GradManager]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def is_recording() -> bool:
    """True inside a recording ``GradManager`` of this thread."""
    return bool(_active())


@dataclass
class Node:
    """How an output was made: its inputs and the vector-Jacobian product."""

    parents: tuple
    backward: Callable[[np.ndarray], Sequence[np.ndarray | None]]


def needs_grad(tensor) -> bool:
    return tensor._node is not None or tensor._attached > 0


def record(out, parents: Sequence, backward: Callable) -> None:
    """Attach a :class:`Node` to ``out`` if recording and any parent needs a gradient."""
    if is_recording() and any(needs_grad(p) for p in parents):
        out._node = Node(tuple(parents), backward)


class GradManager:
    """Records operations and computes gradients of attached tensors.

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> import volconv.functional as F
    >>> from volconv.autodiff import GradManager
    >>> x = mge.tensor(np.ones((1, 1, 3, 3, 3), dtype=np.float32))
    >>> w = mge.Parameter(np.ones((1, 1, 2, 2, 2), dtype=np.float32))
    >>> gm = GradManager().attach([w])
    >>> with gm:
    ...     gm.backward(F.conv3d(x, w).sum())
    >>> w.grad.shape
    (1, 1, 2, 2, 2)
    """

    def __init__(self) -> None:
        self._attached: list = []
        self._recording = False

    def attach(self, tensors: Iterable, callbacks=None) -> GradManager:
        """Register tensors whose gradients ``backward`` fills in; returns ``self``."""
        from .tensor import Tensor

        if isinstance(tensors, Tensor):
            tensors = [tensors]
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(f"GradManager.attach expects Tensors, got {type(t).__name__}")
            if not any(t is a for a in self._attached):
                self._attached.append(t)
                if self._recording:
                    t._attached += 1
        return self

    def attached_tensors(self) -> list:
        return list(self._attached)

    def record(self) -> None:
        """Start recording (what ``with gm:`` does on entry)."""
        if self._recording:
            return
        self._recording = True
        for t in self._attached:
            t._attached += 1
        _active().append(self)

    def release(self) -> None:
        """Stop recording and drop the tape (what ``with gm:`` does on exit)."""
        if not self._recording:
            return
        self._recording = False
        for t in self._attached:
            t._attached -= 1
        stack = _active()
        if self in stack:
            stack.remove(self)

    def __enter__(self) -> GradManager:
        self.record()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def backward(self, y=None, dy=None) -> None:
        """Accumulate ``d(y . dy)/dt`` into ``t.grad`` for every attached ``t``.

        ``dy`` defaults to ones (so a scalar loss gives its plain gradient).
        Recording stops afterwards, as in MegEngine.
        """
        from .tensor import Tensor

        if y is None:
            raise ValueError("GradManager.backward needs the tensor y to differentiate")
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        dys = list(dy) if isinstance(dy, (list, tuple)) else [dy] * len(ys)
        if len(dys) != len(ys):
            raise ValueError(f"backward got {len(ys)} tensors but {len(dys)} gradients")
        if not self._recording:
            raise RuntimeError("GradManager.backward must be called inside `with gm:`")
        grads: dict[int, np.ndarray] = {}
        keep: dict[int, Tensor] = {}
        for yi, dyi in zip(ys, dys, strict=True):
            if not isinstance(yi, Tensor):
                raise TypeError(f"backward expects Tensors, got {type(yi).__name__}")
            g = np.ones(yi.shape, yi.dtype) if dyi is None else np.asarray(_data(dyi))
            if g.shape != yi.shape:
                g = np.broadcast_to(g, yi.shape)
            grads[id(yi)] = grads.get(id(yi), 0) + g.astype(yi.dtype, copy=False)
            keep[id(yi)] = yi
        attached = {id(t) for t in self._attached}
        for t in reversed(_topological(ys)):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            if id(t) in attached:
                g_t = np.asarray(g, dtype=t.dtype).reshape(t.shape)
                t.grad = Tensor(g_t if t.grad is None else t.grad._data + g_t, dtype=t.dtype)
            if t._node is None:
                continue
            for parent, pg in zip(t._node.parents, t._node.backward(g), strict=True):
                if pg is None or not isinstance(parent, Tensor) or not needs_grad(parent):
                    continue
                prev = grads.get(id(parent))
                grads[id(parent)] = pg if prev is None else prev + pg
                keep[id(parent)] = parent
        for t in _topological(ys):
            t._node = None
        self.release()


def _data(value):
    return value._data if hasattr(value, "_data") else value


def _topological(roots: list) -> list:
    """Tensors reachable from ``roots`` through nodes, parents before children."""
    order, seen = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            t, done = stack.pop()
            if done:
                order.append(t)
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            stack.append((t, True))
            if t._node is not None:
                for p in t._node.parents:
                    if hasattr(p, "_node") and id(p) not in seen:
                        stack.append((p, False))
    return order
