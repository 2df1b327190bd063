"""The ``pointwise`` algorithm: 1x1x1 and depth-only (kd x 1 x 1) kernels as GEMMs on
the arrays themselves, against the float64 oracle (forward) and float64 im2col (both
gradients, itself checked against finite differences in test_conv_backward.py)."""

from __future__ import annotations

import numpy as np
import pytest

from volconv import engine
from volconv.engine import _numba_runtime, pointwise
from volconv.engine.reference import conv3d_reference

CASES = {
    "1x1x1": ((2, 6, 4, 5, 3), (1, 5, 6, 1, 1, 1), (1, 1, 1), ((0, 0),) * 3, (1, 1, 1)),
    "1x1x1-strided-grouped": (
        (2, 6, 7, 5, 6),
        (3, 2, 2, 1, 1, 1),
        (2, 1, 3),
        ((0, 0),) * 3,
        (1, 1, 1),
    ),
    "temporal-3x1x1": (
        (2, 6, 7, 4, 5),
        (1, 5, 6, 3, 1, 1),
        (1, 1, 1),
        ((1, 1), (0, 0), (0, 0)),
        (1, 1, 1),
    ),
    "depth-dilated-asym": (
        (1, 5, 9, 3, 3),
        (1, 7, 5, 3, 1, 1),
        (1, 1, 1),
        ((0, 2), (0, 0), (0, 0)),
        (2, 1, 1),
    ),
    "depth-negative-pad": (
        (2, 4, 6, 2, 3),
        (1, 4, 4, 2, 1, 1),
        (1, 1, 1),
        ((-1, 3), (0, 0), (0, 0)),
        (1, 1, 1),
    ),
    "depth-more-taps-than-planes": (
        (1, 3, 2, 2, 2),
        (1, 8, 3, 4, 1, 1),
        (1, 1, 1),
        ((3, 0), (0, 0), (0, 0)),
        (1, 1, 1),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_references(name, dtype, algorithm):
    x_shape, w_shape, stride, pads, dilation = CASES[name]
    geom = engine.conv_geometry(x_shape, w_shape, stride, pads, dilation, w_shape[0])
    assert pointwise.supports(geom)
    rng = np.random.default_rng(len(name))
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    y = pointwise.forward(x, w, geom)
    dx = pointwise.backward_input(dy, w, geom)
    dw = pointwise.backward_weight(x, dy, geom)
    algorithm("im2col")
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    dx_ref = engine.conv3d_backward_input(dy64, w64, geom)
    dw_ref = engine.conv3d_backward_weight(x64, dy64, geom)
    eps = float(np.finfo(dtype).eps)
    for got, ref, k in (
        (y, conv3d_reference(x64, w64, geom), geom.reduction),
        (dx, dx_ref, geom.Og * geom.taps),
        (dw, dw_ref, geom.N * int(np.prod(geom.spatial_out))),
    ):
        assert got.dtype == dtype and got.shape == ref.shape
        bound = 4 * eps * np.sqrt(k) * max(1.0, float(np.abs(ref).max()))
        assert np.abs(got - ref).max() <= bound


def test_supports_only_depth_kernels_without_in_plane_padding():
    def geom(kernel, pads, stride=(1, 1, 1), groups=1):
        return engine.conv_geometry(
            (1, 4, 5, 5, 5),
            (groups, 4 // groups, 4 // groups, *kernel),
            stride,
            pads,
            (1, 1, 1),
            groups,
        )

    z = (0, 0)
    assert pointwise.supports(geom((3, 1, 1), ((1, 1), z, z)))
    assert not pointwise.supports(geom((3, 1, 1), ((1, 1), (1, 1), z)))  # in-plane padding
    assert not pointwise.supports(geom((3, 1, 1), (z, z, z), stride=(2, 1, 1)))
    assert not pointwise.supports(geom((3, 1, 1), (z, z, z), groups=2))
    assert not pointwise.supports(geom((1, 3, 1), (z, z, z)))
    assert not pointwise.supports(geom((1, 1, 1), ((1, 1), z, z)))  # 1x1x1 with padding


def test_chooser_takes_depth_kernels(monkeypatch):
    """Depth-only kernels are pointwise's GEMM family: their gradients always, their
    forward where the depth transform does not take it (small planes, or no numba;
    R(2+1)D's temporal layer, 56 x 56 planes, is depthwinograd's)."""
    f32 = np.dtype(np.float32)
    pads = ((1, 1), (0, 0), (0, 0))
    small = engine.conv_geometry(
        (4, 144, 16, 28, 28), (1, 64, 144, 3, 1, 1), (1,) * 3, pads, (1,) * 3, 1
    )
    large = engine.conv_geometry(
        (4, 144, 16, 56, 56), (1, 64, 144, 3, 1, 1), (1,) * 3, pads, (1,) * 3, 1
    )
    assert engine.choose(small, f32) == "pointwise"
    for g in (small, large):
        assert engine._weight_gradient_algorithm(g, f32) == "pointwise"
    if _numba_runtime.numba_available():
        assert engine.choose(large, f32) == "depthwinograd"
    monkeypatch.setattr(_numba_runtime, "_HAVE_NUMBA", False)
    assert engine.choose(large, f32) == "pointwise"


def _last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_equals_ncdhw(name, dtype, algorithm):
    """Where pointwise computes NDHWC as it lies (1x1x1 and depth-only kernels, stride
    1, one group), its three passes give the NCDHW results (the same products, summed
    over other row windows; float64 to 1e-12), and leave their inputs alone."""
    x_shape, w_shape, stride, pads, dilation = CASES[name]
    geom = engine.conv_geometry(x_shape, w_shape, stride, pads, dilation, w_shape[0])
    if not pointwise.channels_last(geom):
        assert geom.stride != (1, 1, 1) or geom.G > 1
        return
    algorithm(None)
    assert engine.channels_last(geom, dtype)
    rng = np.random.default_rng(len(name))
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    b = rng.standard_normal(geom.O).astype(dtype)
    xl, dyl = _last(x), _last(dy)
    xl0, dyl0 = xl.copy(), dyl.copy()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    y = pointwise.forward(x, w, geom) + b.reshape(-1, 1, 1, 1)
    for got, want in (
        (engine.ndhwc_forward(xl, w, geom, b), _last(y)),
        (engine.ndhwc_backward_input(dyl, w, geom), _last(pointwise.backward_input(dy, w, geom))),
        (engine.ndhwc_backward_weight(xl, dyl, geom), pointwise.backward_weight(x, dy, geom)),
    ):  # fmt: skip
        assert got.dtype == dtype and got.shape == want.shape
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    np.testing.assert_array_equal(xl, xl0)
    np.testing.assert_array_equal(dyl, dyl0)
