"""Property tests (hypothesis) over the whole conv3d argument space.

Every drawn problem has batch 0-2, 1-6 input and output channels with a group count
dividing both, spatial sizes 1-9, kernels 1-4, strides 1-3, padding 0-3 and dilation 1-3
per axis (independently), bias on or off, float32 or float64. On each:

(a) every algorithm the chooser may pick for the geometry agrees with the float64 direct
    reference within ``factor * eps * sqrt(K) * max(|x| (*) |w| + |b|)``;
(b) gradients (of conv3d and conv_transpose3d) agree with central finite differences;
(c) conv_transpose3d is the adjoint of conv3d: ``<conv3d(x, w), y> == <x, conv_transpose3d(y,
    w)>`` with the same weight array, ``output_padding`` making the sizes meet;
(d) ``format="NDHWC"`` gives exactly the transposed NCDHW result and gradients.

The CI profile is small and derandomised (the whole file runs in well under a minute). For a
release run, ``VOLCONV_HYPOTHESIS_PROFILE=release python -m pytest tests/test_properties.py``
draws 25x more examples (10,250; about 2-3 minutes) with a fresh random seed each run.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import volconv
import volconv as mge
import volconv.functional as F
from volconv import engine
from volconv.autodiff import GradManager
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference

PROFILE = os.environ.get("VOLCONV_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "release"):
    raise ValueError(f"VOLCONV_HYPOTHESIS_PROFILE must be 'ci' or 'release', got {PROFILE!r}")
_SCALE = 25 if PROFILE == "release" else 1
_COMMON = dict(
    deadline=None,
    derandomize=PROFILE == "ci",
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _settings(examples: int):
    return settings(max_examples=examples * _SCALE, **_COMMON)


#: Tolerance factors beyond the default 4 (``tests/cases.py::tolerance``), per algorithm.
#: Winograd F(4, 3) transforms have entries up to 8 (A^T) and 5 (B^T), which amplify
#: the rounding of each product by up to ~an order of magnitude per 3-D transform pair
#: (see the error bounds in ``volconv/engine/winograd.py``). Measured worst over 400 random
#: 3x3x3 layers (C up to 128): 5.9x the default bound, so 32 leaves a 5x margin.
TOLERANCE_FACTOR = {"winograd": 32.0}


# ---- strategies ---------------------------------------------------------------------------------
def _triple(lo: int, hi: int):
    return st.tuples(*[st.integers(lo, hi)] * 3)


@st.composite
def problems(draw):
    """A valid conv3d problem: shapes, arguments, dtype and a seed for the data."""
    G = draw(st.integers(1, 6))
    Cg = draw(st.integers(1, 6 // G))
    Og = draw(st.integers(1, 6 // G))
    N = draw(st.integers(0, 2))
    kernel = draw(_triple(1, 4))
    stride = draw(_triple(1, 3))
    padding = draw(_triple(0, 3))
    dilation = draw(_triple(1, 3))
    spatial = []
    for k, p, d in zip(kernel, padding, dilation, strict=True):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # the dilated kernel fits the padded input
        assume(smallest <= 9)
        spatial.append(draw(st.integers(smallest, 9)))
    return dict(
        N=N,
        C=G * Cg,
        O=G * Og,
        G=G,
        spatial=tuple(spatial),
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _weight_shape(p) -> tuple[int, ...]:
    """MegEngine's conv3d weight shape: 5-D dense, 6-D grouped."""
    G = p["G"]
    if G == 1:
        return (p["O"], p["C"], *p["kernel"])
    return (G, p["O"] // G, p["C"] // G, *p["kernel"])


def _geometry(p):
    w6 = (p["G"], p["O"] // p["G"], p["C"] // p["G"], *p["kernel"])
    pads = tuple((q, q) for q in p["padding"])
    return conv_geometry(
        (p["N"], p["C"], *p["spatial"]), w6, p["stride"], pads, p["dilation"], p["G"]
    )


def _arrays(p):
    """float64 x, w, b (None without bias) from the problem's seed."""
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((p["N"], p["C"], *p["spatial"]))
    w = rng.standard_normal(_weight_shape(p))
    b = rng.standard_normal((1, p["O"], 1, 1, 1)) if p["bias"] else None
    return x, w, b


def _kwargs(p) -> dict:
    return dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["G"])


def _reference(p, x, w, b):
    geom = _geometry(p)
    y = conv3d_reference(x, np.asarray(w, np.float64).reshape(geom.w_shape), geom)
    return y if b is None else y + b


def _output_padding(p) -> tuple[int, ...]:
    """What conv_transpose3d needs to map conv3d's output size back to the input size."""
    out = []
    for n, k, s, q, d in zip(
        p["spatial"], p["kernel"], p["stride"], p["padding"], p["dilation"], strict=True
    ):
        out.append((n + 2 * q - d * (k - 1) - 1) % s)
    return tuple(out)


def _candidates(geom) -> list[str]:
    """Every registered algorithm that may compute this geometry."""
    return [name for name in engine.algorithms() if engine._supports(name, geom)]


@contextlib.contextmanager
def forced(name: str | None):
    saved = volconv.config.algorithm
    volconv.config.algorithm = name
    try:
        yield
    finally:
        volconv.config.algorithm = saved


def _grads(fn, operands, dy, **kwargs):
    """Output and gradients of ``<fn(*operands), dy>`` through the tape."""
    params = [None if a is None else mge.Parameter(a) for a in operands]
    attached = [t for t in params if t is not None]
    gm = GradManager().attach(attached)
    with gm:
        y = fn(*params, **kwargs)
        gm.backward(y, mge.tensor(dy))
    return y.numpy(), [t.grad.numpy() for t in attached]


# ---- (a) every algorithm agrees with the reference ----------------------------------------------
@_settings(150)
@given(p=problems())
def test_every_algorithm_matches_the_reference(p):
    geom = _geometry(p)
    dtype = p["dtype"]
    x, w, b = _arrays(p)
    x, w = x.astype(dtype), w.astype(dtype)
    b = None if b is None else b.astype(dtype)
    ref = _reference(p, x, w, b)
    abs_ref = _reference(p, np.abs(x), np.abs(w), None if b is None else np.abs(b))
    scale = float(abs_ref.max()) if abs_ref.size else 0.0
    base = float(np.finfo(dtype).eps) * np.sqrt(max(1, geom.reduction)) * max(scale, 1e-30)
    names = _candidates(geom)
    assert "im2col" in names  # the general algorithm takes every geometry
    for name in names:
        with forced(name):
            y = F.conv3d(x, w, b, **_kwargs(p))
        assert y.dtype == dtype and y.shape == ref.shape, name
        atol = TOLERANCE_FACTOR.get(name, 4.0) * base
        np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=atol, err_msg=name)
    # and whatever the chooser picks by itself
    np.testing.assert_allclose(F.conv3d(x, w, b, **_kwargs(p)).numpy(), ref, rtol=0, atol=64 * base)


# ---- (b) gradients agree with finite differences ------------------------------------------------
def _directional_check(loss, operands, grads, rng, what):
    """``<grad_i, v> == (L(a_i + h v) - L(a_i - h v)) / 2h`` for each operand (float64).

    The convolutions are bilinear, so the central difference is exact up to rounding.
    """
    for i, g in enumerate(grads):
        v = rng.standard_normal(operands[i].shape)
        if v.size == 0:
            assert g.size == 0
            continue
        h = 1e-3
        plus, minus = list(operands), list(operands)
        plus[i] = operands[i] + h * v
        minus[i] = operands[i] - h * v
        fd = (loss(*plus) - loss(*minus)) / (2 * h)
        got = float((g * v).sum())
        scale = float(np.abs(g).sum() * np.abs(v).max()) + abs(fd) + 1e-12
        assert abs(got - fd) <= 1e-9 * scale, (what, i, got, fd)


@_settings(100)
@given(p=problems(), transpose=st.booleans(), data=st.data())
def test_gradients_match_finite_differences(p, transpose, data):
    geom = _geometry(p)
    name = data.draw(st.sampled_from(_candidates(geom)), label="algorithm")
    x, w, b = _arrays(p)
    rng = np.random.default_rng(p["seed"] + 1)
    if not transpose:
        dy = rng.standard_normal(geom.out_shape)

        def loss(xx, ww, bb=None):
            return float((_reference(p, xx, ww, bb) * dy).sum())

        operands = [x, w] + ([] if b is None else [b])
        with forced(name):
            _, grads = _grads(F.conv3d, [x, w, b], dy, **_kwargs(p))
    else:
        # conv_transpose3d maps conv3d's output back to its input: dL/dy via the adjoint
        op = _output_padding(p)
        bt = None if b is None else rng.standard_normal((1, p["C"], 1, 1, 1))
        y_in = rng.standard_normal(geom.out_shape)
        dx = rng.standard_normal(geom.in_shape)

        def loss(yy, ww, bb=None):
            # <convT(yy, ww) + bb, dx> = <yy, conv3d(dx, ww)> + <bb, sum dx>
            value = float((_reference(p, dx, ww, None) * yy).sum())
            if bb is not None:
                value += float((bb * dx.sum(axis=(0, 2, 3, 4), keepdims=True)).sum())
            return value

        operands = [y_in, w] + ([] if bt is None else [bt])
        with forced(name):
            _, grads = _grads(
                F.conv_transpose3d, [y_in, w, bt], dx, output_padding=op, **_kwargs(p)
            )
    assert [g.shape for g in grads] == [a.shape for a in operands]
    _directional_check(loss, operands, grads, rng, (name, transpose))


# ---- (c) conv_transpose3d is the adjoint of conv3d ----------------------------------------------
@_settings(100)
@given(p=problems(), data=st.data())
def test_conv_transpose3d_is_the_adjoint_of_conv3d(p, data):
    geom = _geometry(p)
    name = data.draw(st.sampled_from(_candidates(geom)), label="algorithm")
    x, w, _ = _arrays(p)
    y = np.random.default_rng(p["seed"] + 2).standard_normal(geom.out_shape)
    with forced(name):
        cx = F.conv3d(x, w, **_kwargs(p)).numpy()
        # the same array: conv3d's (O, C, k) weight is conv_transpose3d's (Cin=O, Cout=C, k)
        ty = F.conv_transpose3d(y, w, output_padding=_output_padding(p), **_kwargs(p)).numpy()
    assert ty.shape == x.shape
    lhs, rhs = float((cx * y).sum()), float((x * ty).sum())
    # both sides sum the same products x_i w_j y_k in different orders
    scale = float((_reference(p, np.abs(x), np.abs(w), None) * np.abs(y)).sum())
    assert abs(lhs - rhs) <= 1e-11 * scale + 1e-300, (name, lhs, rhs, scale)


# ---- (d) NDHWC agrees with NCDHW ---------------------------------------------------------------
_HAS_FORMAT = "format" in inspect.signature(F.conv3d).parameters


def _cl(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1))


@pytest.mark.skipif(not _HAS_FORMAT, reason="F.conv3d has no format= argument (NDHWC) yet")
@_settings(60)
@given(p=problems(), transpose=st.booleans(), data=st.data())
def test_ndhwc_agrees_with_ncdhw(p, transpose, data):
    geom = _geometry(p)
    name = data.draw(st.sampled_from(_candidates(geom)), label="algorithm")
    dtype = p["dtype"]
    x, w, b = (None if a is None else a.astype(dtype) for a in _arrays(p))
    rng = np.random.default_rng(p["seed"] + 3)
    if transpose:
        fn, kwargs = F.conv_transpose3d, dict(output_padding=_output_padding(p), **_kwargs(p))
        b = None if b is None else rng.standard_normal((1, p["C"], 1, 1, 1)).astype(dtype)
        inp, dy = rng.standard_normal(geom.out_shape), rng.standard_normal(geom.in_shape)
    else:
        fn, kwargs = F.conv3d, _kwargs(p)
        inp, dy = x, rng.standard_normal(geom.out_shape)
    inp, dy = inp.astype(dtype), dy.astype(dtype)
    with forced(name):
        # conv3d's NDHWC layers that the engine computes as they lie (engine.channels_last)
        native = not transpose and engine.channels_last(geom, np.dtype(dtype))
        y, grads = _grads(fn, [inp, w, b], dy, **kwargs)
        y_cl, grads_cl = _grads(fn, [_cl(inp), w, b], _cl(dy), format="NDHWC", **kwargs)
    rest = zip(grads_cl[1:], grads[1:], strict=True)
    pairs = [(y_cl, _cl(y)), (grads_cl[0], _cl(grads[0])), *rest]
    if not native:  # one computation between two transposes: bitwise the same
        for got, want in pairs:
            np.testing.assert_array_equal(got, want)
        return
    # NDHWC kernels of their own sum in other orders: equal within rounding (the longest
    # sum is the weight gradient's, over every output position)
    K = max(geom.reduction, geom.N * int(np.prod(geom.spatial_out)), 1)
    eps = float(np.finfo(dtype).eps)
    for got, want in pairs:
        scale = float(np.abs(want).max(initial=0.0))
        np.testing.assert_allclose(got, want, rtol=0, atol=16 * eps * np.sqrt(K) * scale + 1e-30)


# ---- (e) Winograd's gradients on the geometries it now takes -----------------------------------
@st.composite
def winograd_problems(draw):
    """Dense stride-1 problems Winograd supports: 1 or 3 taps per axis (at least one 3),
    dilation 1-3, asymmetric pads (negative ones crop, as in transposed geometries)."""
    kernel = draw(st.tuples(*[st.sampled_from([1, 3])] * 3))
    assume(3 in kernel)
    dilation = draw(_triple(1, 3))
    pads, spatial = [], []
    for k, d in zip(kernel, dilation, strict=True):
        lo, hi = draw(st.integers(-1, 3)), draw(st.integers(-1, 3))
        smallest = max(1, d * (k - 1) + 1 - lo - hi, -lo + 1, -hi + 1)
        assume(smallest <= 12)
        spatial.append(draw(st.integers(smallest, 12)))
        pads.append((lo, hi))
    return dict(
        x_shape=(draw(st.integers(1, 2)), draw(st.integers(1, 20)), *spatial),
        O=draw(st.integers(1, 20)),
        kernel=kernel,
        pads=tuple(pads),
        dilation=dilation,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.skipif(not engine.winograd.numba_available(), reason="Winograd needs numba")
@_settings(60)
@given(p=winograd_problems())
def test_winograd_forward_and_gradients_match_im2col(p):
    """Forward, input gradient (forward on the transposed geometry) and weight gradient
    of Winograd (forced, float32) against float64 im2col, within the Winograd bounds of
    ``tests/test_winograd.py`` (forward/dx 12, dw 8 times eps*sqrt(K)*scale)."""
    C, O = p["x_shape"][1], p["O"]
    try:
        geom = conv_geometry(p["x_shape"], (1, O, C, *p["kernel"]), (1, 1, 1), p["pads"],
                             p["dilation"], 1)  # fmt: skip
    except ValueError:
        assume(False)
    assume(min(geom.spatial_out) > 0)
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal(geom.in_shape)
    w = rng.standard_normal(geom.w_shape)
    dy = rng.standard_normal(geom.out_shape)
    x32, w32, dy32 = (a.astype(np.float32) for a in (x, w, dy))
    eps = float(np.finfo(np.float32).eps)
    with forced("im2col"):
        y_ref = engine.conv3d_forward(x, w, geom)
        dx_ref = engine.conv3d_backward_input(dy, w, geom)
        dw_ref = engine.conv3d_backward_weight(x, dy, geom)
        y_abs = engine.conv3d_forward(np.abs(x), np.abs(w), geom)
        dx_abs = engine.conv3d_backward_input(np.abs(dy), np.abs(w), geom)
        dw_abs = engine.conv3d_backward_weight(np.abs(x), np.abs(dy), geom)
    winograd = engine.winograd
    y = winograd.forward(x32, w32, geom)
    adjoint = engine.transposed_geometry(geom)
    dx = winograd.forward(dy32, engine.flip_weight(w32), adjoint)
    dw = winograd.backward_weight(x32, dy32, geom)
    positions = geom.N * int(np.prod(geom.spatial_out))
    for got, ref, scale, K, c in (
        (y, y_ref, y_abs, geom.reduction, 12.0),
        (dx, dx_ref, dx_abs, adjoint.reduction, 12.0),
        (dw, dw_ref, dw_abs, positions, 8.0),
    ):
        bound = c * eps * np.sqrt(max(1, K)) * max(float(scale.max(initial=0.0)), 1e-30)
        assert float(np.abs(got - ref).max(initial=0.0)) <= bound
