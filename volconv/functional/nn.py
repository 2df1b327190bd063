"""Neural-network functions: the 3D convolutions, activations and losses.

``conv3d`` and ``conv_transpose3d`` normalise and check their arguments, resolve
dtypes, and hand one validated geometry to :mod:`volconv.engine`; their gradients
are the engine's two backward functions. Nothing here loops over data.
"""

from __future__ import annotations

import numpy as np

from .. import engine
from ..autodiff import needs_grad, record
from ..engine._args import (
    conv_geometry,
    positive_int,
    transpose_out_size,
    triple,
)
from ..engine._args import (
    conv_mode as _check_conv_mode,
)
from ..engine._lock import ENGINE_LOCK
from ..engine._memory import check_allocation
from ..tensor import Tensor
from . import _padding

__all__ = [
    "conv3d",
    "conv_transpose3d",
    "cross_entropy",
    "linear",
    "log_softmax",
    "relu",
    "softmax",
]


# ---- dtype and operand helpers --------------------------------------------------------------
def _as_tensor(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple, np.generic)):
        return Tensor._wrap(np.asarray(value))
    if name == "bias" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return Tensor._wrap(np.asarray(value, dtype=np.float32))
    raise TypeError(f"{name} must be a Tensor or numpy array, got {type(value).__name__}")


def _float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The floating dtype an operand takes part in the arithmetic as."""
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise TypeError(
            f"{name} has dtype {dtype}: extended precision is not supported (it would be "
            "computed in float64 at most); convert to float64"
        )
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return dtype
    if dtype.kind in "iu":
        return np.dtype(np.float32)
    raise TypeError(
        f"{name} has dtype {dtype}, which 3D convolution does not support "
        "(use a floating dtype; integer inputs need a floating operand)"
    )


def resolve_dtypes(*operands: tuple[str, np.dtype | None]) -> tuple[np.dtype, np.dtype]:
    """(output dtype, compute dtype) for convolution operands.

    float64 only when every operand is float64; float16/bfloat16 compute in float32
    and round once at the end; integers promote to float32, but not all-integer.
    """
    present = [(n, d) for n, d in operands if d is not None]
    if all(d.kind in "iub" for _, d in present):
        names = " and ".join(f"{n} ({d})" for n, d in present)
        raise TypeError(f"conv3d needs a floating operand; got {names}")
    floats = [_float_dtype(d, n) for n, d in present]
    if all(d == floats[0] for d in floats):
        out = floats[0]
    else:
        out = np.result_type(*[np.float32 if d.name == "bfloat16" else d for d in floats])
    compute = np.dtype(np.float64) if out == np.float64 else np.dtype(np.float32)
    return np.dtype(out), compute


def _compute_array(t: Tensor, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(t._data, dtype=dtype)


def _grouped_weight(w: Tensor, groups: int, name: str, in_ch_axis_name: str) -> tuple[int, ...]:
    """Check a MegEngine weight shape and return its grouped 6-D form."""
    if groups == 1:
        if w.ndim == 6 and w.shape[0] == 1:
            return w.shape
        if w.ndim != 5:
            raise ValueError(
                f"{name} must be 5-D (out, in, kd, kh, kw) when groups=1, got shape {w.shape}"
            )
        return (1, *w.shape)
    if w.ndim != 6:
        raise ValueError(
            f"{name} must be 6-D (groups, {in_ch_axis_name}, kd, kh, kw) when groups={groups}, "
            f"got shape {w.shape}"
        )
    if w.shape[0] != groups:
        raise ValueError(f"groups={groups} but {name} has {w.shape[0]} groups (shape {w.shape})")
    return w.shape


def _check_input(x: Tensor, name: str, fmt: str = "NCDHW") -> None:
    if x.ndim != 5:
        axes = ", ".join(fmt)
        raise ValueError(f"{name} must be 5-D ({axes}), got {x.ndim}-D shape {x.shape}")
    spatial = [i for i, axis in enumerate(fmt) if axis in "DHW"]
    for i in spatial:
        if x.shape[i] == 0:
            raise ValueError(
                f"{name} has size 0 on spatial axis {fmt[i]} (shape {x.shape}): a convolution "
                "needs at least one sample per spatial axis"
            )


def _bias_shape(b: Tensor, channels: int) -> tuple[int, ...]:
    """The ``(1, O, 1, 1, 1)``-style shape a per-channel bias broadcasts as, or a clear error.

    Accepted: a scalar or any size-1 array, ``(O,)``, ``(O, 1, 1, 1)`` and ``(1, O, 1, 1, 1)``.
    MegEngine adds any broadcastable bias, which silently adds a length-W vector along W.
    """
    shape = tuple(b.shape)
    if int(np.prod(shape)) == 1 and len(shape) <= 5:
        return (1, 1, 1, 1, 1)
    if shape in ((channels,), (channels, 1, 1, 1), (1, channels, 1, 1, 1)):
        return (1, channels, 1, 1, 1)
    raise ValueError(
        f"bias must hold one value per output channel ({channels}): shape "
        f"(1, {channels}, 1, 1, 1), ({channels},) or a scalar, got shape {shape}"
    )


def _bias_vector(b: Tensor | None, channels: int, dtype) -> np.ndarray | None:
    """The bias as ``(channels,)`` in the compute dtype (a single value repeated)."""
    if b is None:
        return None
    per_channel = np.asarray(b._data, dtype=dtype).reshape(_bias_shape(b, channels))
    return np.broadcast_to(per_channel, (1, channels, 1, 1, 1)).reshape(channels)


def _finish(y: np.ndarray, b: Tensor | None, out_dtype: np.dtype, channels: int):
    """Add the bias in the compute dtype and round once to the output dtype."""
    if b is not None:
        engine.add_channel_bias(y, _bias_vector(b, channels, y.dtype))
    return y.astype(out_dtype, copy=False)


def _bias_grad(g: np.ndarray, b: Tensor, channels_last: bool = False) -> np.ndarray:
    if channels_last:  # (N, D, H, W, O): the channels are the rows' columns
        sums = g.reshape(-1, g.shape[-1]).sum(axis=0, dtype=g.dtype)
    else:
        sums = engine.channel_sums(g)
    if b.size == 1:  # one value broadcast over every channel: its gradient sums them all
        sums = sums.sum(dtype=sums.dtype)
    return np.reshape(sums, b.shape).astype(b.dtype)


# Gradient order: the backward passes compute the weight gradient before the input
# gradient. An algorithm that runs on the engine's own threads (Winograd, FFT, im2col's
# split GEMMs) right after a multithreaded BLAS call shares a core with OpenBLAS's idle
# threads, which spin for ~0.1 s before they sleep; the BLAS-heavy input gradients (the
# in-plane unfolding's col2im, the pointwise GEMMs) lose nothing by going second.
# Measured on strided_down_s2: dw 96-113 ms right after dx against 73-85 alone; dx after
# dw 84-105, alone 88-101.


# ---- convolutions ---------------------------------------------------------------------------
def conv3d(
    inp,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    conv_mode: str = "cross_correlation",
    *,
    padding_mode: str = "zeros",
    format: str = "NCDHW",
) -> Tensor:
    """3D convolution (cross-correlation) over an ``(N, C, D, H, W)`` input.

    Parameters
    ----------
    inp : Tensor or ndarray
        Input of shape ``(N, C, D, H, W)`` (``(N, D, H, W, C)`` with ``format="NDHWC"``).
    weight : Tensor or ndarray
        ``(O, C, kd, kh, kw)``; with ``groups > 1``, ``(G, O/G, C/G, kd, kh, kw)``.
        The same for either ``format``.
    bias : Tensor or ndarray, optional
        One value per output channel, usually ``(1, O, 1, 1, 1)``.
    stride, dilation : int or tuple of 3 ints
        Stride (>= 1) and dilation (>= 1) per axis.
    padding : int, tuple of 3 ints, "same" or "valid"
        Padding (>= 0) on both sides of each axis. Extension: ``"valid"`` is no
        padding; ``"same"`` (stride 1 only) pads ``dilation*(kernel-1)`` in total per
        axis so that the output is as large as the input, the odd extra element on the
        high side (as PyTorch and TensorFlow do). Either string in any case.
    groups : int
        Number of channel groups.
    conv_mode : str
        Only ``"cross_correlation"``.
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, keyword-only
        Extension (PyTorch's names and meaning): what the padding holds. ``"reflect"``
        mirrors without repeating the edge sample (``d c b | a b c d | c b a``) and
        needs padding smaller than the input on every axis; ``"replicate"`` repeats
        the edge sample; ``"circular"`` wraps around periodically. Non-zero modes
        pad a copy of the input.
    format : {"NCDHW", "NDHWC"}, keyword-only
        Extension: layout of ``inp`` and of the result. ``"NDHWC"`` is channels-last.

    Returns
    -------
    Tensor
        ``(N, O, Do, Ho, Wo)`` with ``Do = (D + pad_low + pad_high - d*(k-1) - 1) // s + 1``
        (``(N, Do, Ho, Wo, O)`` with ``format="NDHWC"``). float16 and bfloat16
        operands compute in float32 and round once to their own dtype.

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> import volconv.functional as F
    >>> x = mge.tensor(np.ones((2, 2, 4, 4, 4), dtype=np.float32))
    >>> w = mge.tensor(np.ones((3, 2, 2, 2, 2), dtype=np.float32))
    >>> y = F.conv3d(x, w, stride=2)
    >>> y.shape, float(y.numpy()[0, 0, 0, 0, 0])
    ((2, 3, 2, 2, 2), 16.0)

    The extensions: ``"same"`` output size with an even kernel, replicated edges,
    channels-last data.

    >>> F.conv3d(x, w, padding="same").shape
    (2, 3, 4, 4, 4)
    >>> float(F.conv3d(x, w, padding=1, padding_mode="replicate").numpy().min())
    16.0
    >>> x_cl = mge.tensor(np.ones((2, 4, 4, 4, 2), dtype=np.float32))
    >>> F.conv3d(x_cl, w, padding="same", format="NDHWC").shape
    (2, 4, 4, 4, 3)
    """
    x = _as_tensor(inp, "inp")
    w = _as_tensor(weight, "weight")
    b = None if bias is None else _as_tensor(bias, "bias")
    stride = triple(stride, "stride", 1)
    dilation = triple(dilation, "dilation", 1)
    groups = positive_int(groups, "groups")
    _check_conv_mode(conv_mode)
    mode = _padding.check_padding_mode(padding_mode, "conv3d")
    fmt = _padding.check_format(format, "conv3d")
    _check_input(x, "inp", fmt)
    w6 = _grouped_weight(w, groups, "weight", "out_channels/groups, in_channels/groups")
    pads = _padding.resolve_pads(padding, w6[3:], stride, dilation, "conv3d")
    out_dtype, cdt = resolve_dtypes(
        ("inp", x.dtype), ("weight", w.dtype), ("bias", None if b is None else b.dtype)
    )
    in_shape = _padding.ncdhw_shape(x.shape, fmt)
    geom = conv_geometry(in_shape, w6, stride, pads, dilation, groups)
    if mode != "zeros":
        # pad explicitly, then convolve without padding: the engine only pads with zeros
        _padding.check_pad_fits(geom.spatial_in, pads, mode)
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(geom.spatial_in, pads, strict=True))
        check_allocation((*in_shape[:2], *padded), cdt, f"conv3d {mode}-padded input")
        no_pads = ((0, 0), (0, 0), (0, 0))
        geom = conv_geometry((*in_shape[:2], *padded), w6, stride, no_pads, dilation, groups)
    if b is not None:
        _bias_shape(b, geom.O)
    check_allocation(geom.out_shape, cdt, "conv3d output")
    wc = _compute_array(w, cdt).reshape(w6)
    # NDHWC layers that the engine computes as they are (engine.channels_last: 1x1x1 and
    # depth-only GEMMs, depthwise loops, Winograd's transforms, the unfolding's GEMMs on
    # the stems) go to it with no transpose here; the others are computed in NCDHW.
    native = fmt == "NDHWC" and mode == "zeros" and engine.channels_last(geom, cdt)
    layout = "NCDHW" if native else fmt  # what to_ncdhw / from_ncdhw convert: nothing
    forward = engine.ndhwc_forward if native else engine.conv3d_forward
    weight_grad = engine.ndhwc_backward_weight if native else engine.conv3d_backward_weight
    input_grad = engine.ndhwc_backward_input if native else engine.conv3d_backward_input
    xc = _padding.to_ncdhw(x._data, layout, cdt)
    if mode != "zeros":
        xc = _padding.pad(xc, pads, mode)
    with ENGINE_LOCK:  # one convolution at a time: see volconv/engine/_lock.py
        # the bias is added in the compute dtype (by the algorithm as it writes y)
        y = forward(xc, wc, geom, bias=_bias_vector(b, geom.O, cdt))
    y = y.astype(out_dtype, copy=False)  # rounded once to the output dtype
    y = Tensor._wrap(_padding.from_ncdhw(y, layout))

    # The input gradient is skipped when nothing upstream needs it (a network's data).
    want_dx, want_dw = needs_grad(x), needs_grad(w)

    def backward(g):
        gc = _padding.to_ncdhw(g, layout, cdt)
        dx = dw = None
        with ENGINE_LOCK:
            # dw first: see "Gradient order" above conv3d
            if want_dw:
                dw = weight_grad(xc, gc, geom)
            if want_dx:
                dx = input_grad(gc, wc, geom)
        if dx is not None:
            if mode != "zeros":
                dx = _padding.pad_backward(dx, pads, mode)
            dx = _padding.from_ncdhw(dx, layout, x.dtype)
        if dw is not None:
            dw = dw.reshape(w.shape).astype(w.dtype)
        return (dx, dw) if b is None else (dx, dw, _bias_grad(gc, b, channels_last=native))

    record(y, (x, w) if b is None else (x, w, b), backward)
    return y


def conv_transpose3d(
    inp,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    format: str = "NCDHW",
) -> Tensor:
    """Transposed 3D convolution: the gradient of :func:`conv3d` with respect to its input.

    Parameters
    ----------
    inp : Tensor or ndarray
        ``(N, Cin, D, H, W)`` (``(N, D, H, W, Cin)`` with ``format="NDHWC"``).
    weight : Tensor or ndarray
        ``(Cin, Cout, kd, kh, kw)``; with ``groups > 1``, ``(G, Cin/G, Cout/G, kd, kh, kw)``.
    bias : Tensor or ndarray, optional
        One value per output channel, usually ``(1, Cout, 1, 1, 1)``.
    stride, dilation : int or tuple of 3 ints
    padding : int, tuple of 3 ints, "same" or "valid"
        Removed from both sides of each output axis. Extension: ``"valid"`` is 0;
        ``"same"`` (stride 1 only) removes what ``conv3d(padding="same")`` adds, so the
        output is as large as the input and this is that convolution's adjoint.
    output_padding : int or tuple of 3 ints
        Extra size on the high side of each axis, ``0 <= output_padding < stride``.
    groups : int
    padding_mode : {"zeros"}, keyword-only
        Only ``"zeros"`` (as in PyTorch); anything else is a ``ValueError``.
    format : {"NCDHW", "NDHWC"}, keyword-only
        Extension: layout of ``inp`` and of the result; the weight keeps its layout.

    Returns
    -------
    Tensor
        ``(N, Cout, Do, Ho, Wo)`` with ``Do = (D-1)*s - 2p + d*(k-1) + 1 + output_padding``.

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> import volconv.functional as F
    >>> x = mge.tensor(np.ones((1, 2, 3, 3, 3), dtype=np.float32))
    >>> w = mge.tensor(np.ones((2, 4, 2, 2, 2), dtype=np.float32))
    >>> F.conv_transpose3d(x, w, stride=2, output_padding=1).shape
    (1, 4, 7, 7, 7)
    >>> F.conv_transpose3d(x, w, padding="same").shape
    (1, 4, 3, 3, 3)
    >>> x_cl = mge.tensor(np.ones((1, 3, 3, 3, 2), dtype=np.float32))
    >>> F.conv_transpose3d(x_cl, w, stride=2, format="NDHWC").shape
    (1, 6, 6, 6, 4)
    """
    x = _as_tensor(inp, "inp")
    w = _as_tensor(weight, "weight")
    b = None if bias is None else _as_tensor(bias, "bias")
    stride = triple(stride, "stride", 1)
    dilation = triple(dilation, "dilation", 1)
    output_padding = triple(output_padding, "output_padding", 0)
    groups = positive_int(groups, "groups")
    if padding_mode != "zeros":
        _padding.check_padding_mode(padding_mode, "conv_transpose3d")
        raise ValueError(
            f"conv_transpose3d supports only padding_mode='zeros' (as PyTorch's "
            f"ConvTranspose3d), got {padding_mode!r}"
        )
    fmt = _padding.check_format(format, "conv_transpose3d")
    _check_input(x, "inp", fmt)
    # In forward-convolution terms the transposed weight (G, Cin/G, Cout/G, k) is already
    # the grouped weight (G, Og, Cg, k) of the conv3d whose input gradient we compute.
    w6 = _grouped_weight(w, groups, "weight", "in_channels/groups, out_channels/groups")
    pads = _padding.resolve_pads(padding, w6[3:], stride, dilation, "conv_transpose3d")
    for axis in range(3):
        if output_padding[axis] >= stride[axis]:
            raise ValueError(
                f"output_padding must be smaller than stride on every axis, got "
                f"output_padding={output_padding} with stride={stride}"
            )
    out_dtype, cdt = resolve_dtypes(
        ("inp", x.dtype), ("weight", w.dtype), ("bias", None if b is None else b.dtype)
    )
    in_shape = _padding.ncdhw_shape(x.shape, fmt)
    G, cin_g, cout_g = w6[:3]
    if G * cin_g != in_shape[1]:
        raise ValueError(
            f"channel mismatch: inp has {in_shape[1]} channels but the weight expects "
            f"{G * cin_g} (groups={G} x {cin_g} per group)"
        )
    out_spatial = []
    for axis in range(3):
        lo, hi = pads[axis]
        size = transpose_out_size(
            in_shape[2 + axis], w6[3 + axis], stride[axis], lo, hi, dilation[axis],
            output_padding[axis],
        )  # fmt: skip
        if size < 1:
            shown = lo if lo == hi else (lo, hi)
            raise ValueError(
                f"conv_transpose3d output would be empty on spatial axis {axis}: input "
                f"{in_shape[2 + axis]}, stride {stride[axis]}, padding {shown}, "
                f"kernel {w6[3 + axis]}, dilation {dilation[axis]} give size {size}"
            )
        out_spatial.append(size)
    out_shape = (in_shape[0], G * cout_g, *out_spatial)
    geom = conv_geometry(out_shape, w6, stride, pads, dilation, groups)
    assert geom.spatial_out == in_shape[2:], (geom.spatial_out, in_shape)
    if b is not None:
        _bias_shape(b, geom.C)
    check_allocation(out_shape, cdt, "conv_transpose3d output")
    xc = _padding.to_ncdhw(x._data, fmt, cdt)
    wc = _compute_array(w, cdt).reshape(w6)
    with ENGINE_LOCK:  # one convolution at a time: see volconv/engine/_lock.py
        y = engine.conv3d_backward_input(xc, wc, geom)
    y = Tensor._wrap(_padding.from_ncdhw(_finish(y, b, out_dtype, geom.C), fmt))

    want_dx, want_dw = needs_grad(x), needs_grad(w)

    def backward(g):
        gc = _padding.to_ncdhw(g, fmt, cdt)
        dx = dw = None
        with ENGINE_LOCK:
            # dw first: see "Gradient order" above conv3d
            if want_dw:
                dw = engine.conv3d_backward_weight(gc, xc, geom)
            if want_dx:
                dx = engine.conv3d_forward(gc, wc, geom)
        if dx is not None:
            dx = _padding.from_ncdhw(dx, fmt, x.dtype)
        if dw is not None:
            dw = dw.reshape(w.shape).astype(w.dtype)
        return (dx, dw) if b is None else (dx, dw, _bias_grad(gc, b))

    record(y, (x, w) if b is None else (x, w, b), backward)
    return y


# ---- activations, linear layers, losses ----------------------------------------------------
def relu(x) -> Tensor:
    """Rectified linear unit, ``max(x, 0)``.

    >>> import volconv as mge, volconv.functional as F
    >>> F.relu(mge.tensor([-1.0, 2.0])).numpy()
    array([0., 2.], dtype=float32)
    """
    x = _as_tensor(x, "x")
    data = x._data
    out = Tensor._wrap(np.maximum(data, 0).astype(data.dtype, copy=False))
    record(out, (x,), lambda g: (g * (data > 0),))
    return out


def linear(inp, weight, bias=None) -> Tensor:
    """``inp @ weight.T + bias`` (MegEngine's ``F.nn.linear``).

    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> F.linear(mge.tensor(np.ones((2, 3))), mge.tensor(np.ones((4, 3)))).shape
    (2, 4)
    """
    from .math import matmul

    out = matmul(_as_tensor(inp, "inp"), _as_tensor(weight, "weight").transpose(1, 0))
    return out if bias is None else out + _as_tensor(bias, "bias")


def log_softmax(inp, axis: int = 1) -> Tensor:
    """``log(softmax(inp))`` computed stably.

    >>> import volconv as mge, volconv.functional as F
    >>> F.log_softmax(mge.tensor([[0.0, 0.0]])).numpy().round(4)
    array([[-0.6931, -0.6931]], dtype=float32)
    """
    x = _as_tensor(inp, "inp")
    shifted = x._data - x._data.max(axis=axis, keepdims=True)
    out_data = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    out = Tensor._wrap(out_data)
    soft = np.exp(out_data)
    record(out, (x,), lambda g: (g - soft * g.sum(axis=axis, keepdims=True),))
    return out


def softmax(inp, axis: int = 1) -> Tensor:
    """Softmax along ``axis``.

    >>> import volconv as mge, volconv.functional as F
    >>> F.softmax(mge.tensor([[0.0, 0.0]])).numpy()
    array([[0.5, 0.5]], dtype=float32)
    """
    from .math import exp

    return exp(log_softmax(inp, axis))


def cross_entropy(
    pred,
    label,
    axis: int = 1,
    with_logits: bool = True,
    label_smooth: float = 0,
    reduction: str = "mean",
) -> Tensor:
    """Cross entropy between ``pred`` (logits, or probabilities) and integer labels.

    Parameters
    ----------
    pred : Tensor
        ``(N, K)`` scores along ``axis``.
    label : Tensor or ndarray
        ``(N,)`` integer class indices.
    axis : int
    with_logits : bool
        ``pred`` holds logits (True) or probabilities (False).
    label_smooth : float
    reduction : {"mean", "sum", "none"}

    Examples
    --------
    >>> import numpy as np, volconv as mge, volconv.functional as F
    >>> loss = F.nn.cross_entropy(mge.tensor([[0.0, 0.0]]), mge.tensor([1]))
    >>> round(float(loss.numpy()), 4)
    0.6931
    """
    from .math import log

    p = _as_tensor(pred, "pred")
    labels = np.asarray(label._data if isinstance(label, Tensor) else label).astype(np.int64)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    num_classes = p.shape[axis]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    logp = log_softmax(p, axis) if with_logits else log(p)
    onehot = np.moveaxis(np.eye(num_classes, dtype=p.dtype)[labels], -1, axis)
    if label_smooth:
        onehot = onehot * (1 - label_smooth) + label_smooth / num_classes
    losses = -(logp * Tensor._wrap(onehot)).sum(axis=axis)
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()
