"""Forward conv3d / conv_transpose3d against the float64 direct reference, per algorithm."""

import numpy as np
import pytest
from cases import CASES, TRANSPOSE_CASES, reference_forward, reference_transpose, tolerance

import volconv as mge
import volconv.functional as F
from volconv import engine


def _algorithms_for(case):
    geom = case.geometry()
    return [name for name in engine.algorithms() if engine._supports(name, geom)]


PARAMS = [
    pytest.param(case, dtype, alg, id=f"{case.name}-{np.dtype(dtype).name}-{alg}")
    for case in CASES
    for dtype in case.dtypes
    for alg in _algorithms_for(case)
]


@pytest.mark.parametrize("case,dtype,alg", PARAMS)
def test_conv3d_matches_reference(case, dtype, alg, algorithm):
    algorithm(alg)
    x, w, b = case.arrays()
    y = F.conv3d(
        mge.tensor(x.astype(dtype)),
        mge.tensor(w.astype(dtype)),
        None if b is None else mge.tensor(b.astype(dtype)),
        **case.kwargs(),
    )
    ref = reference_forward(case, x, w, b)
    abs_ref = reference_forward(case, np.abs(x), np.abs(w), None if b is None else np.abs(b))
    assert y.dtype == dtype
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=tolerance(case, dtype, abs_ref))


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_transpose3d_matches_reference(case, dtype):
    x, w, b = case.arrays(transpose=True)
    y = F.conv_transpose3d(
        mge.tensor(x.astype(dtype)),
        mge.tensor(w.astype(dtype)),
        None if b is None else mge.tensor(b.astype(dtype)),
        output_padding=case.output_padding,
        **case.kwargs(),
    )
    ref = reference_transpose(case, x, w, b)
    abs_ref = reference_transpose(case, np.abs(x), np.abs(w), None if b is None else np.abs(b))
    assert y.dtype == dtype
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=tolerance(case, dtype, abs_ref))


def test_workspace_cap_changes_nothing(workspace):
    """Tiny caps force one-plane slabs; the result must not change."""
    case = CASES[0]
    x, w, b = case.arrays()
    full = F.conv3d(x, w, b, **case.kwargs()).numpy()
    workspace(4096)
    tiny = F.conv3d(x, w, b, **case.kwargs()).numpy()
    np.testing.assert_allclose(tiny, full, rtol=1e-12, atol=1e-12)


def test_inputs_are_not_mutated():
    case = CASES[0]
    x, w, b = (a.astype(np.float32) for a in case.arrays())
    copies = [x.copy(), w.copy(), b.copy()]
    F.conv3d(x, w, b, **case.kwargs())
    for before, after in zip(copies, (x, w, b), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("layout", ["fortran", "strided", "readonly", "negative_stride"])
def test_noncontiguous_inputs(layout):
    case = CASES[7]
    x, w, b = case.arrays()
    expected = F.conv3d(x, w, b, **case.kwargs()).numpy()
    if layout == "fortran":
        xv = np.asfortranarray(x)
    elif layout == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],))
        big[..., ::2] = x
        xv = big[..., ::2]
    elif layout == "readonly":
        xv = x.copy()
        xv.flags.writeable = False
    else:
        xv = x[..., ::-1].copy()[..., ::-1]
    got = F.conv3d(xv, w, b, **case.kwargs()).numpy()
    np.testing.assert_array_equal(got, expected)


def test_nan_and_inf_propagate():
    x = np.ones((1, 1, 4, 4, 4), np.float32)
    x[0, 0, 1, 1, 1] = np.nan
    x[0, 0, 3, 3, 3] = np.inf
    y = F.conv3d(x, np.ones((1, 1, 2, 2, 2), np.float32)).numpy()
    assert np.isnan(y[0, 0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 1, 1])
    assert np.isposinf(y[0, 0, 2, 2, 2])
    assert np.isfinite(y[0, 0, 2, 0, 0])


def test_megengine_unit_test_values():
    """MegEngine's own test_conv3d: all outputs 16, 17 with a ones bias."""
    inp = mge.tensor(np.ones((2, 2, 4, 4, 4), np.float32))
    w = mge.tensor(np.ones((3, 2, 2, 2, 2), np.float32))
    b = mge.tensor(np.ones((1, 3, 1, 1, 1), np.float32))
    np.testing.assert_array_equal(F.conv3d(inp, w, None, 2, 0, 1, 1).numpy(), 16)
    np.testing.assert_array_equal(F.conv3d(inp, w, b, 2, 0, 1, 1).numpy(), 17)
    assert F.nn.conv3d is F.conv3d
    assert F.nn.conv_transpose3d is F.conv_transpose3d


@pytest.mark.parametrize(
    "xdt,wdt,out",
    [
        (np.float32, np.float32, np.float32),
        (np.float64, np.float64, np.float64),
        (np.float16, np.float16, np.float16),
        (np.float16, np.float32, np.float32),
        (np.int32, np.float32, np.float32),
        (np.float64, np.float32, np.float64),
    ],
)
def test_dtype_rules(xdt, wdt, out):
    x = np.ones((1, 2, 3, 3, 3), xdt)
    w = np.ones((1, 2, 2, 2, 2), wdt)
    y = F.conv3d(x, w)
    assert y.dtype == out
    np.testing.assert_array_equal(y.numpy(), 16)


def test_float16_accumulates_in_float32():
    """MegEngine sums 3000 ones to 3952 in float16; volconv rounds once: 3000."""
    x = np.ones((1, 3000, 1, 1, 1), np.float16)
    w = np.ones((1, 3000, 1, 1, 1), np.float16)
    assert float(F.conv3d(x, w).numpy().ravel()[0]) == 3000.0


# ---- the bias fused into the algorithms' output writes ------------------------------------------
FUSED_BIAS_CASES = [
    # (algorithm, x shape, weight shape (O, C, k...), stride, pads): hwunfold's tap columns
    # (one item per slab, and items batched through a plane buffer), its tap rows (stems),
    # depth padding so wide that some output planes read no input at all, and Winograd
    ("hwunfold", (1, 3, 6, 20, 20), (8, 3, 3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ("hwunfold", (3, 2, 5, 6, 7), (4, 2, 3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ("hwunfold", (2, 3, 6, 20, 20), (8, 3, 3, 7, 7), (1, 2, 2), (1, 3, 3)),
    ("hwunfold", (1, 3, 2, 9, 9), (5, 3, 3, 3, 3), (1, 1, 1), (4, 1, 1)),
    ("hwunfold", (1, 16, 2, 9, 9), (5, 16, 3, 3, 3), (1, 1, 1), (4, 1, 1)),
    ("winograd", (2, 16, 6, 9, 10), (24, 16, 3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ("winograd", (1, 16, 5, 12, 12), (8, 16, 1, 3, 3), (1, 1, 1), (0, 1, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "xs", "ws", "stride", "pads"), FUSED_BIAS_CASES)
def test_fused_bias_matches_bias_added_after(algorithm, name, xs, ws, stride, pads, dtype):
    """An algorithm that adds the bias while writing y (``FUSED_BIAS``) gives the
    forward plus the bias exactly as one added after, planes without input included."""
    from volconv.engine._args import conv_geometry
    from volconv.engine.reference import conv3d_reference

    assert getattr(engine.ALGORITHMS[name], "FUSED_BIAS", False)
    geom = conv_geometry(xs, (1, *ws), stride, tuple((p, p) for p in pads), (1, 1, 1), 1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    b = rng.standard_normal(geom.O).astype(dtype)
    algorithm(name)
    assert engine.choose(geom, np.dtype(dtype)) == name
    fused = engine.conv3d_forward(x, w, geom, bias=b)
    after = engine.conv3d_forward(x, w, geom) + b.reshape(-1, 1, 1, 1)
    K = geom.reduction
    tol = 4 * np.finfo(dtype).eps * np.sqrt(K) * (np.abs(after).max() + np.abs(b).max())
    np.testing.assert_allclose(fused, after, rtol=0, atol=tol)
    ref = conv3d_reference(x, w, geom) + b.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(fused, ref, rtol=0, atol=(16 if name == "winograd" else 1) * tol)
