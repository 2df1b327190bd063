"""Padding and data-layout helpers for the convolution extensions beyond MegEngine.

Private, in the spirit of :mod:`volconv.engine._args`: ``F.conv3d``,
``F.conv_transpose3d`` and the modules normalise their keyword-only extensions
here, so that the engine only ever sees NCDHW arrays and ``(low, high)`` *zero*
padding per axis.

- ``padding="same" | "valid"``: :func:`resolve_pads` turns them into
  ``(low, high)`` pads (odd totals put the extra element on the high side, as
  PyTorch and TensorFlow do).
- ``padding_mode``: ``"zeros"`` goes to the engine as asymmetric zero padding;
  the other modes pad a copy of the input explicitly with :func:`pad` (NumPy's
  ``reflect`` / ``edge`` / ``wrap``) and :func:`pad_backward`, the exact adjoint
  of :func:`pad`, folds the padded region's gradient back onto its sources.
- ``format="NDHWC"``: :func:`to_ncdhw` / :func:`from_ncdhw` are the only place
  that converts layouts.
"""

from __future__ import annotations

import numpy as np

from ..engine._args import Pads, Triple, dilated_extent, triple
from ..engine._layout import transpose_channels

__all__ = [
    "FORMATS",
    "PADDING_MODES",
    "check_format",
    "check_padding_mode",
    "check_pad_fits",
    "from_ncdhw",
    "ncdhw_shape",
    "normalize_padding",
    "pad",
    "pad_backward",
    "resolve_pads",
    "to_ncdhw",
]

#: PyTorch's ``padding_mode`` names and the ``np.pad`` mode that implements each.
#: Name traps: PyTorch/NumPy ``reflect`` (edge not repeated) is SciPy's ``mirror``;
#: ``replicate`` is NumPy ``edge`` / SciPy ``nearest``; ``circular`` is ``wrap``.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
FORMATS = ("NCDHW", "NDHWC")
_AXES = "DHW"


# ---- argument checks ---------------------------------------------------------------------------
def check_padding_mode(value, op: str = "conv3d") -> str:
    """``value`` if it is one of :data:`PADDING_MODES`, else a ``ValueError``.

    >>> check_padding_mode("reflect")
    'reflect'
    """
    if not isinstance(value, str) or value not in PADDING_MODES:
        names = ", ".join(repr(m) for m in PADDING_MODES)
        raise ValueError(f"{op}: padding_mode must be one of {names}, got {value!r}")
    return value


def check_format(value, op: str = "conv3d") -> str:
    """``"NCDHW"`` or ``"NDHWC"``, else a ``ValueError``."""
    if not isinstance(value, str) or value not in FORMATS:
        raise ValueError(f"{op}: format must be 'NCDHW' or 'NDHWC', got {value!r}")
    return value


def normalize_padding(value, stride: Triple, op: str = "conv3d") -> Triple | str:
    """A padding argument as a 3-tuple of ints, or ``"same"`` / ``"valid"`` (any case).

    ``"same"`` needs stride 1 on every axis (as in PyTorch).

    >>> normalize_padding(1, (1, 1, 1))
    (1, 1, 1)
    >>> normalize_padding("SAME", (1, 1, 1))
    'same'
    """
    if isinstance(value, str):
        name = value.lower()
        if name not in ("same", "valid"):
            # TypeError, as for any other non-integer padding
            raise TypeError(
                f"padding must be an int, a sequence of 3 ints, 'same' or 'valid', got {value!r}"
            )
        if name == "same" and tuple(stride) != (1, 1, 1):
            raise ValueError(
                f"{op}: padding='same' is not supported for strided convolutions (stride="
                f"{tuple(stride)}); 'same' is only defined for stride 1, use explicit padding"
            )
        return name
    return triple(value, "padding", 0)


def resolve_pads(
    padding, kernel: Triple, stride: Triple, dilation: Triple, op: str = "conv3d"
) -> Pads:
    """``(low, high)`` zero padding per spatial axis for a padding argument.

    ``"same"`` pads ``d*(k-1)`` in total per axis, ``total // 2`` low and the rest
    (one more when the total is odd) high, so that the output size equals the input
    size at stride 1. ``"valid"`` is no padding; ints pad both sides.

    >>> resolve_pads("same", (3, 4, 2), (1, 1, 1), (1, 1, 3))
    ((1, 1), (1, 2), (1, 2))
    >>> resolve_pads(2, (3, 3, 3), (2, 2, 2), (1, 1, 1))
    ((2, 2), (2, 2), (2, 2))
    """
    padding = normalize_padding(padding, stride, op)
    if padding == "valid":
        return ((0, 0), (0, 0), (0, 0))
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation, strict=True):
            total = dilated_extent(k, d) - 1
            pads.append((total // 2, total - total // 2))
        return tuple(pads)  # type: ignore[return-value]
    return tuple((p, p) for p in padding)  # type: ignore[return-value]


def check_pad_fits(spatial: tuple[int, ...], pads: Pads, mode: str) -> None:
    """Raise a ``ValueError`` when ``mode`` cannot pad an axis by that much.

    ``reflect`` needs ``padding < size`` on both sides (one reflection, edge not
    repeated, as in PyTorch); ``replicate`` and ``circular`` need a non-empty
    axis. ``circular`` allows padding larger than the axis (it repeats
    periodically; PyTorch refuses this).
    """
    if mode == "zeros":
        return
    for axis, (size, (lo, hi)) in enumerate(zip(spatial, pads, strict=True)):
        if lo == hi == 0:
            continue
        if mode == "reflect" and max(lo, hi) >= size:
            raise ValueError(
                f"padding_mode='reflect' needs padding smaller than the input size on every "
                f"axis: spatial axis {axis} ({_AXES[axis]}) has size {size} but padding "
                f"({lo}, {hi}) (low, high)"
            )
        if size == 0:
            raise ValueError(
                f"padding_mode={mode!r} cannot pad the empty spatial axis {axis} "
                f"({_AXES[axis]}, size 0) by ({lo}, {hi})"
            )


# ---- explicit padding and its adjoint ------------------------------------------------------
def _source_index(size: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """``idx`` with ``pad(x)[i] == x[idx[i]]`` along one axis (non-zero modes)."""
    i = np.arange(-lo, size + hi)
    if mode == "replicate":
        return np.clip(i, 0, size - 1)
    if mode == "circular":
        return np.mod(i, size)
    # reflect about the first and last sample, which are not repeated (|pad| < size)
    i = np.abs(i)
    return np.where(i > size - 1, 2 * (size - 1) - i, i)


def pad(x: np.ndarray, pads: Pads, mode: str) -> np.ndarray:
    """Pad the three spatial axes of an NCDHW array (a new array) with a padding mode.

    >>> pad(np.arange(3.0).reshape(1, 1, 1, 1, 3), ((0, 0), (0, 0), (2, 1)), "reflect")
    array([[[[[2., 1., 0., 1., 2., 1.]]]]])
    """
    widths = ((0, 0), (0, 0), *pads)
    if mode == "zeros":
        return np.pad(x, widths)
    return np.pad(x, widths, mode=PADDING_MODES[mode])


def pad_backward(g: np.ndarray, pads: Pads, mode: str) -> np.ndarray:
    """The adjoint of :func:`pad`: the gradient of the unpadded array from the padded one's.

    Every padded sample is a copy of one source sample, so its gradient is added
    onto that source (for ``zeros`` the padding is simply dropped). Exact:
    ``<pad(x), g> == <x, pad_backward(g)>``.

    >>> g = np.ones((1, 1, 1, 1, 6))
    >>> pad_backward(g, ((0, 0), (0, 0), (2, 1)), "reflect")[0, 0, 0, 0]
    array([1., 3., 2.])
    """
    for axis, (lo, hi) in enumerate(pads, start=2):
        if lo == hi == 0:
            continue
        size = g.shape[axis] - lo - hi
        gm = np.moveaxis(g, axis, 0)
        out = gm[lo : lo + size].copy()
        if mode != "zeros":
            index = _source_index(size, lo, hi, mode)
            # pads are small: one slice add per padded position
            for j in (*range(lo), *range(lo + size, lo + size + hi)):
                out[index[j]] += gm[j]
        g = np.moveaxis(out, 0, axis)
    return np.ascontiguousarray(g)


# ---- data layout ------------------------------------------------------------------------------
# The engine computes in NCDHW. NDHWC ("channels-last") input and output are transposed
# to and from NCDHW here, and only here (a blocked transpose on the engine's threads:
# engine/_layout.py), except where the engine computes channels-last itself
# (``engine.channels_last``: 1x1x1, depth-only, depthwise and Winograd's layers, and the
# first layers and stems of the in-plane unfolding, which ``conv3d`` hands over
# untransposed).
def ncdhw_shape(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    """The NCDHW shape of an array of ``shape`` in layout ``fmt``."""
    if fmt == "NDHWC":
        return (shape[0], shape[4], *shape[1:4])
    return tuple(shape)


def to_ncdhw(a: np.ndarray, fmt: str, dtype=None) -> np.ndarray:
    """A C-contiguous NCDHW array (of ``dtype``) from ``a`` in layout ``fmt``."""
    if fmt == "NDHWC":
        return transpose_channels(a, to_last=False, dtype=dtype)
    return np.ascontiguousarray(a, dtype=dtype)


def from_ncdhw(a: np.ndarray, fmt: str, dtype=None) -> np.ndarray:
    """``a`` (NCDHW) in layout ``fmt``, C-contiguous, as ``dtype``."""
    if fmt == "NDHWC":
        return transpose_channels(a, to_last=True, dtype=dtype)
    return a if dtype is None else a.astype(dtype, copy=False)
