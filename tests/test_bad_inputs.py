"""The bad-input catalogue: every odd argument gives the documented result or a clear exception.

Complements ``tests/test_conv_errors.py`` (the basic error table) and
``tests/test_module.py`` (constructor errors) with:

- the rest of MegEngine's bad-input list (``megengine-conv3d.md`` section 3), mostly the
  ``conv_transpose3d`` side and 6-/7-D weights;
- NaN and Inf: IEEE propagation, the same pattern for every algorithm as for the reference
  (taps that meet padding multiply zeros, so a NaN weight reaches every output it touches);
- empty batches, empty spatial axes and empty kernels;
- memory layouts (non-contiguous, negative strides, Fortran order, read-only, zero strides):
  results bitwise equal to the contiguous ones, and no input is ever written to;
- dtypes: the promotion table, and bool/complex/object/string operands refused;
- Python lists: accepted like ``np.asarray`` would read them (a ragged list is numpy's
  ``ValueError``);
- bias shapes;
- sizes that cannot fit in memory: a ``MemoryError`` before allocating (Python-int sizes,
  so nothing overflows), and absurd strides / paddings.

Cases that could take the process down (huge allocations, numba kernels fed odd sizes) run in
a subprocess with a capped address space and must end in a clean Python exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import volconv as mge
import volconv.functional as F
import volconv.module as M
from volconv import engine
from volconv.autodiff import GradManager
from volconv.engine._args import conv_geometry
from volconv.engine._memory import check_allocation
from volconv.engine.reference import conv3d_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = engine.algorithms()

X = np.ones((1, 4, 5, 5, 5), np.float32)
W = np.ones((2, 4, 3, 3, 3), np.float32)
WT = np.ones((4, 2, 3, 3, 3), np.float32)  # conv_transpose3d: (in=4, out=2, k...)


def conv(**kw):
    args = dict(inp=X, weight=W)
    args.update(kw)
    return F.conv3d(**args)


def convt(**kw):
    args = dict(inp=X, weight=WT)
    args.update(kw)
    return F.conv_transpose3d(**args)


# ---- MegEngine's section 3, the cases test_conv_errors.py does not have -------------------------
ERRORS = [
    # conv3d
    ("weight_7d", conv, dict(weight=W[None, None]), ValueError, r"weight must be 5-D.*groups=1"),
    (
        "weight_7d_groups2",
        conv,
        dict(weight=np.ones((2, 1, 1, 2, 3, 3, 3)), groups=2),
        ValueError,
        r"weight must be 6-D.*groups=2",
    ),
    (
        "grouped_channel_mismatch",  # 6-D weight with G * icpg != C
        conv,
        dict(weight=np.ones((2, 1, 3, 3, 3, 3), np.float32), groups=2),
        ValueError,
        r"inp has 4 channels but the weight expects 6 \(groups=2 x 3 per group\)",
    ),
    ("dilation_negative", conv, dict(dilation=-2), ValueError, r"dilation must be >= 1.*-2"),
    ("stride_nan", conv, dict(stride=float("nan")), TypeError, r"stride must contain integers"),
    ("padding_inf", conv, dict(padding=float("inf")), TypeError, r"padding must contain integ"),
    ("groups_float", conv, dict(groups=1.5), TypeError, r"groups must contain integers.*1.5"),
    ("groups_str", conv, dict(groups="2"), TypeError, r"groups must contain integers"),
    ("stride_array_2d", conv, dict(stride=np.ones((3, 1), int)), TypeError, r"stride"),
    ("int_x_int_bias", conv, dict(inp=X.astype(int), weight=W.astype(int)), TypeError, "int64"),
    ("complex_weight", conv, dict(weight=W.astype(complex)), TypeError, r"weight.*complex128"),
    ("object_weight", conv, dict(weight=W.astype(object)), TypeError, r"weight.*object"),
    ("bool_with_float", conv, dict(inp=X.astype(bool)), TypeError, r"inp has dtype bool"),
    ("bytes_input", conv, dict(inp=X.astype("S1")), TypeError, r"inp has dtype \|S1"),
    ("datetime_input", conv, dict(inp=X.astype("M8[s]")), TypeError, r"datetime64"),
    ("none_input", conv, dict(inp=None), TypeError, r"inp must be a Tensor or numpy array"),
    ("int_weight_scalar", conv, dict(weight=3), TypeError, r"weight must be a Tensor"),
    ("ragged_list", conv, dict(inp=[[1.0], [1.0, 2.0]]), ValueError, r"inhomogeneous"),
    # conv_transpose3d: MegEngine's "diff.ndim == 5", "filter.ndim == 5 || 6", ...
    ("t_input_4d", convt, dict(inp=X[0]), ValueError, r"inp must be 5-D.*4-D"),
    ("t_input_6d", convt, dict(inp=X[None]), ValueError, r"inp must be 5-D.*6-D"),
    ("t_weight_4d", convt, dict(weight=WT[0]), ValueError, r"weight must be 5-D"),
    ("t_weight_7d", convt, dict(weight=WT[None, None]), ValueError, r"weight must be 5-D"),
    ("t_weight_5d_groups2", convt, dict(groups=2), ValueError, r"weight must be 6-D.*groups=2"),
    (
        "t_weight_6d_groups1",
        convt,
        dict(weight=np.ones((2, 2, 1, 3, 3, 3), np.float32)),
        ValueError,
        r"weight must be 5-D.*groups=1",
    ),
    (
        "t_grouped_channel_mismatch",
        convt,
        dict(weight=np.ones((2, 3, 1, 3, 3, 3), np.float32), groups=2),
        ValueError,
        r"inp has 4 channels but the weight expects 6",
    ),
    (
        "t_groups_vs_weight",
        convt,
        dict(weight=np.ones((2, 2, 1, 3, 3, 3), np.float32), groups=4),
        ValueError,
        r"groups=4 but weight has 2 groups",
    ),
    ("t_padding_negative", convt, dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("t_stride_negative", convt, dict(stride=-1), ValueError, r"stride must be >= 1"),
    ("t_dilation0", convt, dict(dilation=0), ValueError, r"dilation must be >= 1"),
    ("t_dilation_negative", convt, dict(dilation=-1), ValueError, r"dilation must be >= 1"),
    ("t_groups0", convt, dict(groups=0), ValueError, r"groups must be a positive integer"),
    (
        "t_int_x_int",  # MegEngine defers this one (AsyncError at first use)
        convt,
        dict(inp=X.astype(np.int32), weight=WT.astype(np.int32)),
        TypeError,
        r"floating operand.*int32",
    ),
    ("t_complex_input", convt, dict(inp=X.astype(np.complex64)), TypeError, r"complex64"),
    ("t_bias_length", convt, dict(bias=np.ones(4)), ValueError, r"output channel \(2\)"),
    ("t_output_padding_len2", convt, dict(output_padding=(0, 0)), ValueError, r"3 elements"),
    (
        "t_output_padding_one_axis",
        convt,
        dict(stride=(2, 1, 2), output_padding=(1, 1, 0)),
        ValueError,
        r"output_padding.*\(1, 1, 0\).*stride=\(2, 1, 2\)",
    ),
]


@pytest.mark.parametrize("fn,kwargs,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_raises_clear_error(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)


MODULE_ERRORS = [
    (lambda: M.ConvTranspose3d(3, 4, 3, groups=2), ValueError, r"in_channels must be divisible"),
    (lambda: M.ConvTranspose3d(4, 6, 3, groups=4), ValueError, r"out_channels must be divisib"),
    (lambda: M.ConvTranspose3d(2, 4, 3, stride=0), ValueError, r"stride.*\(0, 0, 0\)"),
    (lambda: M.ConvTranspose3d(2, 4, 3, padding=-1), ValueError, r"padding.*\(-1, -1, -1\)"),
    (lambda: M.ConvTranspose3d(2, 4, 3, dilation=-1), ValueError, r"dilation"),
    (lambda: M.ConvTranspose3d(2, 4, (3, 0, 3)), ValueError, r"kernel_size.*>= 1"),
    (lambda: M.ConvTranspose3d(0, 4, 3), ValueError, r"in_channels must be >= 1, got 0"),
    (lambda: M.Conv3d(2, 4, -3), ValueError, r"kernel_size must be >= 1.*-3"),
    (lambda: M.Conv3d(2, 4, 1.5), TypeError, r"kernel_size must contain integers.*1.5"),
    (lambda: M.Conv3d(2, 4, 3, stride=-2), ValueError, r"stride.*\(-2, -2, -2\)"),
    (lambda: M.Conv3d(2, 4, 3, dilation=(1, 1, -1)), ValueError, r"dilation.*\(1, 1, -1\)"),
    (lambda: M.Conv3d(2, 4, 3, groups=1.5), TypeError, r"groups must contain integers"),
    (lambda: M.Conv3d(True, 4, 3), TypeError, r"in_channels must be an int.*bool"),
    (lambda: M.Conv3d("2", 4, 3), TypeError, r"in_channels must be an int.*str"),
    (lambda: M.Conv3d(2, None, 3), TypeError, r"out_channels must be an int.*None"),
    (lambda: M.Conv3d(2, 4, (3, 3, 3, 3)), ValueError, r"kernel_size must have 3 elements"),
    (lambda: M.Conv3d(2, 4, 3, padding=(1, 1)), ValueError, r"padding must have 3 elements"),
]


@pytest.mark.parametrize("make,exc,match", MODULE_ERRORS, ids=range(len(MODULE_ERRORS)))
def test_module_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_module_forward_errors_name_the_problem():
    m = M.Conv3d(4, 2, 3)
    with pytest.raises(ValueError, match=r"inp has 3 channels but the weight expects 4"):
        m(np.ones((1, 3, 5, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"inp must be 5-D"):
        m(np.ones((4, 5, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"kernel too large"):
        m(np.ones((1, 4, 2, 5, 5), np.float32))
    with pytest.raises(TypeError, match=r"complex"):
        m(np.ones((1, 4, 5, 5, 5), np.complex64))


# ---- NaN and Inf ------------------------------------------------------------------------------
#: Known deviations from IEEE propagation, (scenario, algorithm) -> reason. Reported in issue 6.
NONFINITE_BUGS: dict = {}


def _nonfinite_scenarios():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 6, 6, 6))
    w = rng.standard_normal((2, 2, 3, 3, 3))
    out = {}
    xn = x.copy()
    xn[0, 1, 2, 3, 4] = np.nan
    out["nan_input"] = (xn, w, dict(padding=1))
    xi = x.copy()
    xi[0, 0, 5, 5, 5] = np.inf
    xi[0, 1, 0, 0, 0] = -np.inf
    out["inf_input"] = (xi, np.abs(w), dict(padding=1))
    wi = w.copy()
    wi[1, 0, 1, 1, 1] = -np.inf
    out["neg_inf_weight"] = (np.abs(x) + 1, wi, dict(padding=1))
    # a NaN tap that meets only padding: taps on padding multiply zeros -> NaN
    wp = w.copy()
    wp[:, :, 0] = np.nan
    out["nan_weight_meets_only_depth_padding"] = (x[:, :, :1], wp, dict(padding=(1, 1, 1)))
    wq = w.copy()
    wq[:, :, :, :, 2] = np.nan
    out["nan_weight_meets_only_width_padding"] = (x[..., :1], wq, dict(padding=(1, 1, 1)))
    xd = np.repeat(x[:, :1], 2, axis=1)
    wd = w[:, :1].copy()
    wd[0, 0, 0, 0, 0] = np.nan
    out["nan_weight_depthwise"] = (xd, wd.reshape(2, 1, 1, 3, 3, 3), dict(padding=1, groups=2))
    return out


NONFINITE = _nonfinite_scenarios()


def _nonfinite_params():
    params = []
    for scenario, (x, w, kw) in NONFINITE.items():
        geom = _geom_of(x, w, kw)
        for name in ALGORITHMS:
            if not engine._supports(name, geom):
                continue
            marks = []
            if (scenario, name) in NONFINITE_BUGS:
                marks = [pytest.mark.xfail(reason=NONFINITE_BUGS[(scenario, name)], strict=True)]
            params.append(pytest.param(scenario, name, id=f"{scenario}-{name}", marks=marks))
    return params


def _t(kw, key, default):
    value = kw.get(key, default)
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def _geom_of(x, w, kw):
    """The geometry of ``F.conv3d(x, w, **kw)`` (integer arguments only)."""
    w6 = w.shape if w.ndim == 6 else (1, *w.shape)
    pads = tuple((q, q) for q in _t(kw, "padding", 0))
    return conv_geometry(
        x.shape, w6, _t(kw, "stride", 1), pads, _t(kw, "dilation", 1), kw.get("groups", 1)
    )


def _output_padding(x, w, kw):
    """What conv_transpose3d needs to map ``conv3d(x, w, **kw)``'s output back to x's size."""
    geom = _geom_of(x, w, kw)
    return tuple(
        (n + 2 * p - (d * (k - 1) + 1)) % s
        for n, p, d, k, s in zip(
            x.shape[2:],
            _t(kw, "padding", 0),
            geom.dilation,
            geom.kernel,
            geom.stride,
            strict=True,
        )
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("scenario,name", _nonfinite_params())
def test_nan_and_inf_propagate_like_the_reference(scenario, name, algorithm):
    x, w, kw = NONFINITE[scenario]
    geom = _geom_of(x, w, kw)
    with np.errstate(invalid="ignore"):
        ref = conv3d_reference(x, w.reshape(geom.w_shape), geom)
    algorithm(name)
    y = F.conv3d(x, w, **kw).numpy()
    assert not np.isfinite(ref).all()  # the scenario does reach some outputs
    if "meets_only" in scenario:
        # Documented (README): a weight tap that only ever meets zero padding may be
        # skipped (hwunfold skips depth padding, as MegEngine skips all padding), so its
        # NaN reaches a subset of the reference's NaN outputs -- never any other output.
        assert not (np.isnan(y) & ~np.isnan(ref)).any()
        finite = np.isfinite(ref)
        np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5)
        return
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-9, atol=1e-9)


def test_nan_in_the_input_reaches_the_gradients():
    x = mge.Parameter(np.ones((1, 1, 4, 4, 4)))
    w = mge.Parameter(np.ones((1, 1, 2, 2, 2)))
    x._data[0, 0, 1, 2, 1] = np.nan  # inside: every tap meets it once
    gm = GradManager().attach([x, w])
    with gm:
        gm.backward(F.conv3d(x, w).sum())
    assert np.isnan(w.grad.numpy()).all()
    assert np.isfinite(x.grad.numpy()).all()  # dx = W^T dy does not involve x


# ---- empty sizes ------------------------------------------------------------------------------
def test_empty_batch_forward_and_backward_everywhere():
    for fmt in ("NCDHW", "NDHWC"):
        shape = (0, 2, 4, 4, 4) if fmt == "NCDHW" else (0, 4, 4, 4, 2)
        m = M.Conv3d(2, 3, 3, padding=1, format=fmt)
        mt = M.ConvTranspose3d(3, 2, 3, stride=2, format=fmt)
        x = mge.Parameter(np.ones(shape, np.float32))
        gm = GradManager().attach([x, *m.parameters(), *mt.parameters()])
        with gm:
            y = mt(m(x))
            gm.backward(y.sum())
        assert y.shape[0] == 0 and x.grad.shape == shape
        assert not m.weight.grad.numpy().any() and not mt.weight.grad.numpy().any()
        assert not m.bias.grad.numpy().any()


ZERO_SPATIAL = [
    ("conv3d_D0", lambda: F.conv3d(np.ones((1, 2, 0, 4, 4)), np.ones((3, 2, 1, 1, 1)))),
    ("conv3d_W0_k3", lambda: F.conv3d(np.ones((1, 2, 4, 4, 0)), np.ones((3, 2, 3, 3, 3)))),
    (
        "conv3d_H0_padded",
        lambda: F.conv3d(np.ones((1, 2, 4, 0, 4)), np.ones((3, 2, 1, 1, 1)), padding=1),
    ),
    (
        "conv3d_D0_padded_depthwise",
        lambda: F.conv3d(np.ones((1, 2, 0, 4, 4)), np.ones((2, 1, 1, 1, 3, 3)), 1, 1, groups=2),
    ),
    ("conv_transpose3d_D0", lambda: F.conv_transpose3d(np.ones((1, 2, 0, 4, 4)), WT[:2])),
    (
        "conv3d_ndhwc_W0",
        lambda: F.conv3d(np.ones((1, 4, 4, 0, 2)), np.ones((3, 2, 1, 1, 1)), format="NDHWC"),
    ),
]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            make,
            id=name,
            marks=[],
        )
        for name, make in ZERO_SPATIAL
    ],
)
def test_empty_spatial_axis_is_a_value_error(make):
    with pytest.raises(ValueError, match=r"(size 0|empty)"):
        make()


def test_empty_kernel_is_a_value_error_for_every_algorithm():
    code = """
    results = {}
    for name in engine.algorithms():
        volconv.config.algorithm = name
        for label, call in [
            ("dense", lambda: F.conv3d(np.ones((1, 2, 4, 4, 4)), np.ones((2, 2, 3, 0, 3)))),
            ("grouped", lambda: F.conv3d(np.ones((1, 2, 4, 4, 4)), np.ones((2, 1, 1, 0, 3, 3)),
                                         groups=2)),
            ("transpose", lambda: F.conv_transpose3d(np.ones((1, 2, 4, 4, 4)),
                                                     np.ones((2, 2, 3, 0, 3)))),
        ]:
            results[f"{name}-{label}"] = outcome(call)
    report(results)
    """
    results = run_isolated(code)
    bad = {k: v for k, v in results.items() if v[0] != "ValueError" or "kernel" not in v[1]}
    assert not bad, bad


# ---- memory layouts and mutation ----------------------------------------------------------------
def _layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as ``a`` in layouts other than C-contiguous."""
    ro = a.copy()
    ro.flags.writeable = False
    neg = np.flip(a).copy()[(slice(None, None, -1),) * a.ndim]
    wide = np.repeat(a, 2, axis=-1)[..., ::2]
    out = {
        "fortran": np.asfortranarray(a),
        "negative_strides": neg,
        "every_other": wide,
        "read_only": ro,
        "permuted": np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(
            0, a.ndim - 1, *range(1, a.ndim - 1)
        ),
    }
    for name, v in out.items():
        assert np.array_equal(v, a), name
    return out


def _layout_case(name):
    """(x, w, b, kwargs) of a small layer that ``name`` supports."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 5, 6, 7))
    b = rng.standard_normal((1, 4, 1, 1, 1))
    candidates = [
        (rng.standard_normal((4, 4, 3, 3, 3)), dict(padding=1)),
        (rng.standard_normal((4, 1, 1, 3, 2, 3)), dict(stride=(2, 1, 2), groups=4)),
        (rng.standard_normal((4, 4, 3, 1, 3)), dict(stride=2, dilation=(1, 2, 1))),
        (rng.standard_normal((4, 4, 1, 1, 1)), dict(stride=(1, 2, 1))),
    ]
    for w, kw in candidates:
        if engine._supports(name, _geom_of(x, w, kw)):
            return x, w, b, kw
    pytest.skip(f"{name} supports none of the layout cases")


def _digest(*arrays) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


def _forward_backward(fn, operands, dy, **kw):
    """Output and gradients through the tape; the Parameters hold ``operands`` themselves."""
    params = []
    for a in operands:
        p = mge.Parameter(np.zeros(1))
        p._data = a  # keep the caller's array (layout, flags): no copy
        params.append(p)
    gm = GradManager().attach(params)
    with gm:
        y = fn(*params, **kw)
        gm.backward(y, dy)
    return [y.numpy()] + [t.grad.numpy() for t in params]


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_give_bitwise_the_contiguous_result(name, dtype, algorithm):
    algorithm(name)
    x, w, b, kw = _layout_case(name)
    x, w, b = (a.astype(dtype) for a in (x, w, b))
    y = F.conv3d(x, w, b, **kw).numpy()
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(dtype)
    ref = _forward_backward(F.conv3d, [x, w, b], dy, **kw)
    op = _output_padding(x, w, kw)
    ref_t = F.conv_transpose3d(dy, w, output_padding=op, **kw).numpy()
    xs, ws, bs, dys = _layouts(x), _layouts(w), _layouts(b), _layouts(dy)
    for label in xs:
        got = _forward_backward(F.conv3d, [xs[label], ws[label], bs[label]], dy, **kw)
        for g, r in zip(got, ref, strict=True):
            assert np.array_equal(g, r), label
        assert np.array_equal(F.conv3d(xs[label], w, **kw).numpy(), F.conv3d(x, w, **kw).numpy())
        got_t = F.conv_transpose3d(dys[label], ws[label], output_padding=op, **kw).numpy()
        assert np.array_equal(got_t, ref_t), label


def test_zero_stride_broadcast_inputs_equal_materialised_ones():
    x = np.lib.stride_tricks.as_strided(np.array([1.5]), (2, 3, 4, 5, 6), (0,) * 5)
    w = np.broadcast_to(np.arange(3.0).reshape(1, 3, 1, 1, 1), (2, 3, 2, 2, 2))
    np.testing.assert_array_equal(
        F.conv3d(x, w, padding=1).numpy(), F.conv3d(x.copy(), w.copy(), padding=1).numpy()
    )


@pytest.mark.parametrize("name", ALGORITHMS)
def test_inputs_are_never_written_to(name, algorithm):
    algorithm(name)
    x, w, b, kw = _layout_case(name)
    op = _output_padding(x, w, kw)
    dy = np.random.default_rng(4).standard_normal(F.conv3d(x, w, **kw).shape)
    bt = np.ones((1, x.shape[1], 1, 1, 1))
    for dtype in (np.float32, np.float64):
        arrays = [a.astype(dtype) for a in (x, w, b, dy, bt)]
        xx, ww, bb, gg, tb = arrays
        before = _digest(*arrays)
        # the Parameters and Tensors wrap these very arrays: the engine sees the user's memory
        _forward_backward(F.conv3d, [xx, ww, bb], gg, **kw)
        _forward_backward(F.conv_transpose3d, [gg, ww, tb], xx, output_padding=op, **kw)
        F.conv3d(mge.Tensor._wrap(xx), mge.Tensor._wrap(ww), mge.Tensor._wrap(bb), **kw)
        assert _digest(*arrays) == before, dtype


def test_module_forward_and_backward_leave_parameters_and_input_alone():
    for m in (M.Conv3d(4, 6, 3, padding=1, groups=2), M.ConvTranspose3d(4, 2, 2, stride=2)):
        x = np.random.default_rng(3).standard_normal((2, 4, 3, 4, 5)).astype(np.float32)
        state = {k: v.copy() for k, v in m.state_dict().items()}
        before = _digest(x)
        gm = GradManager().attach(m.parameters())
        with gm:
            gm.backward(m(x).sum())
        assert _digest(x) == before
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, state[k])


# ---- dtypes -----------------------------------------------------------------------------------
PROMOTION = [  # (inp, weight, bias) -> output dtype; the compute dtype is float64 iff output is
    ((np.float32, np.float32, None), np.float32),
    ((np.float64, np.float64, None), np.float64),
    ((np.float32, np.float64, None), np.float64),
    ((np.float64, np.float32, np.float32), np.float64),
    ((np.float32, np.float32, np.float64), np.float64),  # the bias takes part in promotion
    ((np.float16, np.float32, None), np.float32),
    ((np.float16, np.float16, None), np.float16),  # computed in float32, rounded once
    ((np.int64, np.float32, None), np.float32),  # integers take part as float32
    ((np.float32, np.int8, None), np.float32),
    ((np.uint8, np.float64, None), np.float64),
    ((np.int32, np.int32, np.float32), np.float32),  # integer data, float bias
    ((np.int16, np.float16, None), np.float32),
]


@pytest.mark.parametrize("dtypes,expected", PROMOTION, ids=[str(i) for i in range(len(PROMOTION))])
def test_dtype_promotion_table(dtypes, expected):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (1, 2, 4, 4, 4))  # small non-negative: exact in every dtype
    w = rng.integers(-3, 4, (3, 2, 2, 2, 2))
    b = rng.integers(0, 4, (1, 3, 1, 1, 1))
    dx, dw, db = dtypes
    y = F.conv3d(x.astype(dx), w.astype(dw), None if db is None else b.astype(db))
    assert y.dtype == expected
    ref = F.conv3d(x.astype(np.float64), w.astype(np.float64), None if db is None else b * 1.0)
    np.testing.assert_array_equal(y.numpy(), ref.numpy())  # small integers: exact in any dtype


def test_longdouble_is_refused_or_at_least_float64_accurate():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 4, 5, 5, 5)), rng.standard_normal((3, 4, 3, 3, 3))
    try:
        y = F.conv3d(x.astype(np.longdouble), w.astype(np.longdouble))
    except TypeError as exc:
        assert "longdouble" in str(exc) or "float128" in str(exc) or "float96" in str(exc)
        return
    np.testing.assert_allclose(y.numpy().astype(np.float64), F.conv3d(x, w).numpy(), atol=1e-12)


def test_python_lists_are_read_like_numpy_arrays():
    x = np.arange(54, dtype=np.float64).reshape(1, 2, 3, 3, 3) / 7
    w = np.ones((1, 2, 2, 2, 2))
    ref = F.conv3d(x, w, [0.5]).numpy()
    got = F.conv3d(x.tolist(), w.tolist(), [0.5])
    assert got.dtype == np.float64  # Python floats are float64, as in np.asarray
    np.testing.assert_array_equal(got.numpy(), ref)
    np.testing.assert_array_equal(F.conv3d(tuple(x.tolist()), w).numpy(), F.conv3d(x, w).numpy())
    ints = F.conv3d(np.arange(27).reshape(1, 1, 3, 3, 3).tolist(), np.ones((1, 1, 1, 1, 1)))
    assert ints.dtype == np.float64  # int list x float64 weight
    with pytest.raises(TypeError, match="floating operand"):
        F.conv3d([[[[[1]]]]], [[[[[1]]]]])


def test_masked_arrays_are_read_as_their_data():
    # documented: the mask is ignored (np.asarray), as every numpy ufunc-free consumer does
    mask = np.zeros((1, 1, 2, 2, 2), bool)
    mask[0, 0, 0] = True
    x = np.ma.masked_array(np.ones((1, 1, 2, 2, 2)), mask=mask)
    y = F.conv3d(x, np.ones((1, 1, 2, 2, 2)))
    assert float(y.numpy().ravel()[0]) == 8.0


# ---- bias ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 1), (2,), (2, 1, 1, 1), (1,), (1, 1, 1, 1, 1), ()])
def test_accepted_bias_shapes(shape):
    x = np.zeros((1, 4, 3, 3, 3), np.float32)
    bias = np.arange(1, 1 + int(np.prod(shape))).reshape(shape).astype(np.float32)
    y = F.conv3d(x, W, bias).numpy()
    per_channel = np.broadcast_to(bias.ravel(), (2,))
    for o in range(2):
        np.testing.assert_array_equal(y[0, o], per_channel[o])


@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 1), (2,), (1,), (1, 1, 1, 1, 1), ()])
def test_bias_gradient_has_the_bias_shape(shape):
    """Per channel: the sum of that channel's output gradient; a single value broadcast
    over the channels: the sum of all of them (this raised a reshape error before)."""
    x = mge.Parameter(np.ones((1, 4, 3, 3, 3), np.float32))
    b = mge.Parameter(np.ones(shape, np.float32))
    gm = GradManager().attach([b])
    with gm:
        y = F.conv3d(x, W, b)
        g = np.arange(y.size, dtype=np.float32).reshape(y.shape)
        gm.backward(y, g)
    expected = g.sum(axis=(0, 2, 3, 4))
    if b.size == 1:
        expected = expected.sum()
    assert b.grad.shape == shape
    np.testing.assert_allclose(b.grad.numpy(), np.reshape(expected, shape), rtol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 1, 1, 1), (2, 2, 1, 1, 1), (1, 1, 1, 1, 2), (1, 2), (2, 1), (0,), (1, 2, 1, 1, 1, 1)],
)
def test_bias_that_is_not_one_value_per_channel_is_refused(shape):
    # MegEngine broadcasts any bias: (1, 1, 1, 1, 2) would silently add a vector along W
    with pytest.raises(ValueError, match=r"bias must hold one value per output channel \(2\)"):
        F.conv3d(X, W, np.ones(shape, np.float32))


def test_transposed_bias_is_per_output_channel():
    y = F.conv_transpose3d(X, WT, np.array([1.0, 2.0], np.float32))
    assert y.shape[1] == 2
    with pytest.raises(ValueError, match=r"output channel \(2\).*\(4,\)"):
        F.conv_transpose3d(X, WT, np.ones(4, np.float32))  # the input's channel count
    with pytest.raises(TypeError, match=r"bias has dtype complex"):
        F.conv3d(X, W, np.ones(2, complex))


# ---- sizes that cannot fit in memory ------------------------------------------------------------
def _huge(shape, dtype=np.float32):
    """A zero-stride view of ``shape`` backed by one element: costs no memory."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def test_allocation_check_uses_exact_integers():
    # element counts that wrap int32 (2**31) and int64 (2**63): Python ints, never wrapped
    for shape in [(2**16, 2**16, 2), (2**21, 2**21, 2**21, 2), (2**40, 2**40, 2**40)]:
        with pytest.raises(MemoryError, match=r"needs .* GiB, more than this machine's"):
            check_allocation(shape, np.float32, "test array")
    elems = 2**21 * 2**21 * 2**21 * 2
    assert elems > np.iinfo(np.int64).max
    assert check_allocation((3, 5), np.float64, "small") == 120
    # TFLite's 32-bit im2col overflow case: 3,623,878,656 elements, exact
    geom = conv_geometry(
        (1, 4, 512, 256, 256), (1, 8, 4, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 1
    )
    assert geom.reduction * geom.spatial_out[0] * 256 * 256 == 3_623_878_656
    assert geom.flops() == 2 * 8 * 512 * 256 * 256 * 108


@pytest.mark.parametrize(
    "call,what",
    [
        (lambda: F.conv3d(_huge((2**10, 4, 2**11, 2**11, 2**11)), W), "conv3d output"),
        (  # an output whose element count overflows int64: (2**22 + 3)**3 * 2
            lambda: F.conv3d(X, W, padding=2**21),
            "conv3d output",
        ),
        (  # 2**56 input elements (numpy's limit is 2**63 bytes) and a 2**59-element output
            lambda: F.conv3d(_huge((2**20, 1, 2**12, 2**12, 2**12)), np.ones((8, 1, 1, 1, 1))),
            "conv3d output",
        ),
        (
            lambda: F.conv_transpose3d(_huge((1, 4, 2**12, 2**12, 2**12)), WT, stride=3),
            "conv_transpose3d output",
        ),
        (
            lambda: F.conv3d(X, W, padding=2**40),  # padding alone makes the output huge
            "conv3d output",
        ),
        (
            lambda: F.conv3d(
                _huge((1, 4, 2**12, 2**12, 2**10)), W, padding=1, padding_mode="reflect"
            ),
            "reflect-padded input",
        ),
        (lambda: M.Conv3d(4, 2, 3)(_huge((2**12, 4, 2**10, 2**10, 2**10))), "conv3d output"),
        (
            lambda: M.ConvTranspose3d(4, 2, 3, stride=2)(_huge((64, 4, 2**10, 2**10, 2**10))),
            "conv_transpose3d output",
        ),
    ],
    ids=["conv3d", "int64", "2**56", "transpose", "padding", "reflect", "module", "module_t"],
)
def test_outputs_that_cannot_fit_are_a_memory_error_before_allocating(call, what):
    with pytest.raises(MemoryError, match=f"{what} of shape .* needs .* GiB"):
        call()


# ---- subprocess cases: nothing may take the process down ---------------------------------------
_PRELUDE = """
import json, os, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
import volconv, volconv.functional as F, volconv.module as M
from volconv import engine

# warm up every algorithm (numba loads or compiles its kernels), then cap the address space
# so that a runaway allocation fails in this process instead of starving the machine
for _name in engine.algorithms():
    volconv.config.algorithm = _name
    F.conv3d(np.ones((1, 2, 3, 3, 3)), np.ones((2, 1, 1, 1, 1, 1)), groups=2)
    F.conv3d(np.ones((1, 2, 3, 3, 3)), np.ones((2, 2, 1, 1, 1)))
volconv.config.algorithm = None
with open("/proc/self/status") as _f:
    _vm = [int(l.split()[1]) * 1024 for l in _f if l.startswith("VmSize")][0]
_cap = _vm + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (_cap, _cap))

def outcome(call):
    try:
        result = call()
    except Exception as exc:
        return [type(exc).__name__, str(exc)[:300]]
    return ["ok", result.numpy().tolist() if hasattr(result, "numpy") else result]

def report(value):
    print("RESULT " + json.dumps(value), flush=True)
"""


def run_isolated(code: str, timeout: float = 120, headroom: int = 2 << 30):
    """Run ``code`` in a fresh interpreter with a capped address space; its report()."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux (/proc and RLIMIT_AS) to cap the subprocess's memory")
    source = _PRELUDE.format(root=ROOT, headroom=headroom) + textwrap.dedent(code)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, (
        f"the subprocess died (exit code {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_absurd_strides_give_the_one_window_result_or_a_value_error():
    code = """
    from volconv.autodiff import GradManager
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(1, 2, 2, 3, 3) + 1
    w = np.arange(2 * 2 * 8, dtype=np.float64).reshape(2, 2, 2, 2, 2) - 5
    results = {}
    for name in engine.algorithms():
        volconv.config.algorithm = name
        for stride in [2**31, (2**31, 2**31, 4), 2**40, 2**60, 2**62, 2**70]:
            def call(stride=stride):
                xt, wt = volconv.Parameter(x), volconv.Parameter(w)
                gm = GradManager().attach([xt, wt])
                with gm:
                    y = F.conv3d(xt, wt, stride=stride)
                    gm.backward(y.sum())
                return [y.numpy().tolist(), xt.grad.numpy().tolist(), wt.grad.numpy().tolist()]
            results[f"{name} {stride}"] = outcome(call)
    report(results)
    """
    results = run_isolated(code, timeout=240)
    x = np.arange(36.0).reshape(1, 2, 2, 3, 3) + 1
    w = np.arange(32.0).reshape(2, 2, 2, 2, 2) - 5
    window = x[:, :, :2, :2, :2]
    y = np.einsum("ncdhw,ocdhw->no", window, w).reshape(1, 2, 1, 1, 1)
    dx = np.zeros_like(x)
    dx[:, :, :2, :2, :2] = w.sum(axis=0)
    wrong = {}
    for key, (kind, value) in results.items():
        if kind == "ValueError" and "stride" in value:
            continue
        if kind != "ok":
            wrong[key] = (kind, value)
            continue
        got_y, got_dx, got_dw = (np.array(v) for v in value)
        if not (
            np.array_equal(got_y, y)
            and np.array_equal(got_dx, dx)
            and np.array_equal(got_dw, np.broadcast_to(window[0], w.shape))
        ):
            wrong[key] = ("wrong values", value)
    assert not wrong, wrong


def test_workspace_that_cannot_fit_is_a_clean_memory_error():
    # output 64 MiB, but each output plane of the unfolding algorithms needs 2**48 samples
    code = """
    x = np.ones((1, 1, 1, 2**12, 2**12), np.float32)
    w = np.ones((1, 1, 1, 2**11, 2**11), np.float32)
    results = {}
    for name in [None, "im2col", "hwunfold"]:
        if name in engine.algorithms() or name is None:
            volconv.config.algorithm = name
            results[str(name)] = outcome(lambda: F.conv3d(x, w, padding=(0, 2**10, 2**10)))
    report(results)
    """
    for name, (kind, message) in run_isolated(code, timeout=60).items():
        assert kind == "MemoryError", (name, kind, message)


def test_workspace_that_cannot_fit_is_refused_by_volconv_before_allocating():
    code = """
    x = np.ones((1, 1, 1, 2**12, 2**12), np.float32)
    w = np.ones((1, 1, 1, 2**11, 2**11), np.float32)
    report(outcome(lambda: F.conv3d(x, w, padding=(0, 2**10, 2**10))))
    """
    kind, message = run_isolated(code, timeout=60)
    assert kind == "MemoryError" and "more than this machine's" in message, message


@pytest.mark.parametrize("name", [None, "winograd", "fft"])
def test_huge_finite_values_take_an_exact_path(name, algorithm):
    """float32 data so large that its own sum overflows (the engine's finiteness check
    then fails) still convolves exactly where the result is finite: the FINITE_ONLY
    algorithms (whose transforms would overflow) hand it to the GEMM family."""
    rng = np.random.default_rng(7)
    x = (np.float32(3e36) * (1 + rng.random((1, 8, 6, 6, 6)))).astype(np.float32)
    w = (1e-3 * rng.standard_normal((8, 8, 3, 3, 3))).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.add.reduce(x, axis=None))  # the check's own sum overflows
    geom = _geom_of(x, w, dict(padding=1))
    ref = conv3d_reference(x.astype(np.float64), w.reshape(geom.w_shape).astype(np.float64), geom)
    assert np.isfinite(ref).all()
    if name is not None:
        algorithm(name)
    with np.errstate(over="ignore", invalid="ignore"):
        y = F.conv3d(x, w, padding=1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ---- settings: checked where they are assigned -----------------------------------------------
@pytest.mark.parametrize(
    "name, value, error, message",
    [
        ("workspace_bytes", -1, ValueError, "config.workspace_bytes must be >= 0 bytes, got -1"),
        ("workspace_bytes", "64MB", TypeError, "config.workspace_bytes must be an int"),
        ("workspace_bytes", 1.5e6, TypeError, "got 1500000.0 of type float"),
        ("workspace_bytes", True, TypeError, "got True of type bool"),
        ("workspace_bytes", None, TypeError, "got None of type NoneType"),
        ("algorithm", "nope", ValueError, "config.algorithm='nope' is not None or one of"),
        ("algorithm", 3, ValueError, "config.algorithm=3 is not None or one of"),
        ("deterministic", "yes", TypeError, "config.deterministic must be True or False"),
        ("autotune", 2, TypeError, "config.autotune must be True or False, got 2"),
    ],
)
def test_bad_settings_raise_where_assigned(name, value, error, message):
    """A bad setting raises at its assignment, naming it and the value, and leaves the
    setting as it was (no convolution runs with it)."""
    before = getattr(mge.config, name)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        setattr(mge.config, name, value)
    assert getattr(mge.config, name) == before


def test_settings_accept_numpy_scalars_as_python_values():
    saved = mge.config.workspace_bytes, mge.config.deterministic
    try:
        mge.config.workspace_bytes = np.int64(1 << 20)
        mge.config.deterministic = np.bool_(True)
        assert type(mge.config.workspace_bytes) is int and mge.config.workspace_bytes == 1 << 20
        assert mge.config.deterministic is True
    finally:
        mge.config.workspace_bytes, mge.config.deterministic = saved
