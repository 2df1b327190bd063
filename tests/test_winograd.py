"""Winograd F(4x4x4, 3x3x3) / F(2, 3) convolution (``volconv.engine.winograd``).

Forward against the float64 oracle with a *measured* error bound: Winograd's error is
``c * eps * sqrt(K) * max|y|`` (``K = C * 27``), where direct summation gives c ~ 0.1.
Measured over 60 random geometries (C = 1..64, pads 0..2, odd sizes, both dtypes):
F(4, 3) c <= 6.0 (<= 1.5 from C = 16 up; the tensor-product transforms amplify rounding
by a constant, so the smallest K are worst), F(2, 3) c <= 0.54. The tests allow
``C_F4 = 12`` and ``C_F2 = 2``. The input gradient (the forward on the engine's
transposed geometry, negative pads included) is checked against im2col's, the chooser's
pick and the workspace cap.

The weight gradient (F(3, 4): ``G^T [(A dy) * (B^T x)]``) against a float64 direct
sum: ``max|dw - ref| <= c * eps * sqrt(K) * max(|dy| (*) |x|)`` with ``K = N*Do*Ho*Wo``
(its reduction length) and ``|dy| (*) |x|`` the per-(o, c, tap) sum of magnitudes.
Measured over 310 random geometries (C = 1..64, O = 1..39, sizes 1..11, pads 0..2, both
dtypes): F(4) c <= 2.2 (worst at K of a few outputs), F(2) c <= 0.64; at C = 16..256 on
8^3-64^3 volumes F(4) c <= 0.12. The tests allow ``C_DW_F4 = 8`` and ``C_DW_F2 = 2``.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

import volconv
from volconv import engine
from volconv.engine import _numba_runtime, winograd
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference

pytestmark = pytest.mark.skipif(not winograd.numba_available(), reason="numba is not installed")

#: Allowed error constants (see the module docstring for the measured values).
C_F4 = 12.0
C_F2 = 2.0
C_DW_F4 = 8.0
C_DW_F2 = 2.0


def _geometry(x_shape, out_channels, pads, kernel=(3, 3, 3)):
    C = x_shape[1]
    pads = tuple((p, p) if isinstance(p, int) else p for p in pads)
    return conv_geometry(x_shape, (1, out_channels, C, *kernel), (1, 1, 1), pads, (1, 1, 1), 1)


def _data(rng, geom, dtype):
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    return x, w


def _rel_error(y, ref, geom, dtype):
    """``max|y - ref| / (eps * sqrt(K) * max|ref|)``: the constant c of the bound."""
    scale = float(np.finfo(dtype).eps) * np.sqrt(geom.reduction) * float(np.abs(ref).max())
    return float(np.abs(y - ref).max()) / max(scale, 1e-300)


def _traced_peak(fn):
    """``(fn(), peak)``: the result of a call (after one to compile or load the kernels)
    and the peak of what numpy allocated during it."""
    fn()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def tile():
    """Force one Winograd tile size for a test and restore the automatic choice."""
    saved = winograd.FORCE_TILE

    def force(m):
        winograd.FORCE_TILE = m

    yield force
    winograd.FORCE_TILE = saved


@pytest.fixture
def no_slabs(monkeypatch):
    """Plans without slabs of depth points: a transformed weight that does not fit goes
    in chunks of output channels."""
    monkeypatch.setattr(winograd, "SLABS", False)


# x shape (N, C, D, H, W), out channels, pads per axis (int or (lo, hi))
CASES = [
    ("odd_pad1", (1, 3, 5, 6, 7), 4, (1, 1, 1)),
    ("n2_pad0", (2, 8, 9, 10, 11), 5, (0, 0, 0)),
    ("pad2_medium", (1, 16, 3, 5, 4), 16, (2, 2, 2)),
    ("mixed_pads", (2, 5, 6, 7, 9), 3, (0, 1, 2)),
    ("depth2_mixed_tiles", (2, 24, 2, 9, 7), 17, (1, 1, 1)),  # F(2) on D, F(4) on H, W
    ("one_voxel", (1, 4, 1, 1, 1), 3, (1, 1, 1)),
    ("medium_channels", (1, 40, 6, 6, 6), 36, (1, 1, 1)),
    # negative pads crop, as in the engine's transposed geometries
    ("negative_pads", (1, 6, 7, 8, 9), 5, ((-1, 2), (2, -1), (0, 1))),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [None, 2], ids=["auto", "F2"])
@pytest.mark.parametrize(("name", "x_shape", "O", "pads"), CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(algorithm, tile, rng, name, x_shape, O, pads, m, dtype):
    geom = _geometry(x_shape, O, pads)
    algorithm("winograd")
    tile(m)
    assert engine.choose(geom, np.dtype(dtype)) == "winograd"
    x, w = _data(rng, geom, dtype)
    y = engine.conv3d_forward(x, w, geom)
    ref = conv3d_reference(x, w, geom)
    assert y.dtype == dtype and y.shape == ref.shape
    c = _rel_error(y, ref, geom, dtype)
    assert c <= (C_F2 if m == 2 else C_F4), f"error constant {c:.3f}"


def test_f4_error_at_realistic_width(rng):
    """C = 64 (K = 1728): F(4, 3) in float32 stays within 3 eps sqrt(K) max|y| (measured
    ~1), i.e. ~1.5e-5 relative to max|y|, against ~1e-6 for the GEMM algorithms."""
    geom = _geometry((1, 64, 8, 8, 8), 32, (1, 1, 1))
    x, w = _data(rng, geom, np.float32)
    assert winograd.tile_sizes(geom) == (4, 4, 4)
    c = _rel_error(winograd.forward(x, w, geom), conv3d_reference(x, w, geom), geom, np.float32)
    assert c <= 3.0, f"error constant {c:.3f}"


def test_matrices_are_a_winograd_identity(rng):
    """A^T [(G g) * (B^T d)] is the 3-tap correlation of d with g, for both tile sizes."""
    for m in (2, 4):
        BT, G, AT = winograd.matrices(m)
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        direct = np.array([d[i : i + 3] @ g for i in range(m)])
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_input_gradient_through_transposed_geometry(algorithm, rng, pad):
    """Stride-1 dx is a forward on the transposed geometry (pads 2 - p, negative for
    p = 3); with Winograd forced it must match im2col's col2im in float64."""
    geom = _geometry((2, 6, 5, 7, 6), 7, (pad, pad, pad))
    x, w = _data(rng, geom, np.float64)
    dy = rng.standard_normal(geom.out_shape)
    algorithm("winograd")
    assert engine.choose(engine.transposed_geometry(geom), np.dtype(np.float64)) == "winograd"
    dx = engine.conv3d_backward_input(dy, w, geom)
    algorithm("im2col")
    expected = engine.conv3d_backward_input(dy, w, geom)
    np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def _reference_dw(x, dy, geom):
    """float64 ``dw`` by direct summation per tap, and ``max(|dy| (*) |x|)`` (the largest
    per-(o, c, tap) sum of magnitudes, the scale of the error bound)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    pad = [(0, 0), (0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in geom.pads]
    xp = np.pad(x, pad)
    crop = tuple(
        slice(-min(lo, 0), xp.shape[2 + i] + min(hi, 0)) for i, (lo, hi) in enumerate(geom.pads)
    )
    xp = xp[(slice(None), slice(None), *crop)]
    Do, Ho, Wo = geom.spatial_out
    dyf = dy.transpose(1, 0, 2, 3, 4).reshape(geom.O, -1)
    dw = np.zeros((geom.O, geom.C, *geom.kernel))
    scale = 0.0
    kd, kh, kw = geom.kernel
    dd, dh, dw_ = geom.dilation
    for a in range(kd):
        for b in range(kh):
            for e in range(kw):
                window = (slice(a * dd, a * dd + Do), slice(b * dh, b * dh + Ho),
                          slice(e * dw_, e * dw_ + Wo))  # fmt: skip
                patch = xp[(slice(None), slice(None), *window)].transpose(1, 0, 2, 3, 4)
                patch = patch.reshape(geom.C, -1)
                dw[:, :, a, b, e] = dyf @ patch.T
                scale = max(scale, float((np.abs(dyf) @ np.abs(patch).T).max(initial=0.0)))
    return dw.reshape(geom.w_shape), scale


def _dw_error(dw, x, dy, geom, dtype):
    """``max|dw - ref| / (eps * sqrt(N*Do*Ho*Wo) * max(|dy| (*) |x|))``: the constant c."""
    ref, scale = _reference_dw(x, dy, geom)
    K = geom.N * int(np.prod(geom.spatial_out))
    bound = float(np.finfo(dtype).eps) * np.sqrt(K) * scale
    return float(np.abs(dw - ref).max()) / max(bound, 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [None, 2], ids=["auto", "F2"])
@pytest.mark.parametrize(("name", "x_shape", "O", "pads"), CASES, ids=[c[0] for c in CASES])
def test_weight_gradient_matches_reference(algorithm, tile, rng, name, x_shape, O, pads, m, dtype):
    """Winograd's own weight gradient (forced), partial tiles, negative pads included."""
    geom = _geometry(x_shape, O, pads)
    algorithm("winograd")
    tile(m)
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    dw = engine.conv3d_backward_weight(x, dy, geom)
    assert dw.dtype == dtype and dw.shape == geom.w_shape
    c = _dw_error(dw, x, dy, geom, dtype)
    assert c <= (C_DW_F2 if m == 2 else C_DW_F4), f"error constant {c:.3f}"


ONE_TAP_KERNELS = [(1, 3, 3), (3, 1, 3), (3, 3, 1), (3, 1, 1), (1, 1, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [None, 2], ids=["auto", "F2"])
@pytest.mark.parametrize("kernel", ONE_TAP_KERNELS, ids=lambda k: "x".join(map(str, k)))
def test_one_tap_axes(algorithm, tile, rng, kernel, m, dtype):
    """Kernels with 1-tap axes (R(2+1)D's in-plane 1x3x3 first of all): no transform on
    those axes (one transformed point per output), F(m, 3) on the others. Forward, the
    input gradient (forward on the transposed geometry) and the weight gradient against
    float64 references, with mixed and negative pads on the 3-tap axes."""
    pads = tuple(p if k == 3 else 0 for p, k in zip(((1, 1), (0, 2), (2, -1)), kernel, strict=True))
    geom = _geometry((2, 6, 5, 7, 9), 5, pads, kernel)
    algorithm("winograd")
    tile(m)
    assert engine.choose(geom, np.dtype(dtype)) == "winograd"
    assert all((t == 1) == (k == 1) for t, k in zip(winograd.tile_sizes(geom), kernel, strict=True))
    x, w = _data(rng, geom, dtype)
    y = engine.conv3d_forward(x, w, geom)
    c = _rel_error(y, conv3d_reference(x, w, geom), geom, dtype)
    assert c <= (C_F2 if m == 2 else C_F4), f"forward error constant {c:.3f}"
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    c = _dw_error(engine.conv3d_backward_weight(x, dy, geom), x, dy, geom, dtype)
    assert c <= (C_DW_F2 if m == 2 else C_DW_F4), f"weight-gradient error constant {c:.3f}"
    adjoint = engine.transposed_geometry(geom)
    dx = winograd.forward(dy, engine.flip_weight(w), adjoint)
    algorithm("im2col")
    expected = engine.conv3d_backward_input(dy.astype(np.float64), w.astype(np.float64), geom)
    c = _rel_error(dx, expected, adjoint, dtype)
    assert c <= (C_F2 if m == 2 else C_F4), f"input-gradient error constant {c:.3f}"


def test_in_plane_kernels_take_winograd_in_all_three_passes(algorithm, monkeypatch, rng):
    """A 1x3x3 layer with enough channels (R(2+1)D's spatial conv, scaled down): the
    chooser gives Winograd the forward, dx (forward on the transposed geometry) and dw;
    depth-only 3x1x1 kernels stay with the pointwise GEMMs."""
    algorithm(None)
    f32 = np.dtype(np.float32)
    geom = _geometry((1, 16, 4, 20, 20), 24, (0, 1, 1), (1, 3, 3))
    assert engine.choose(geom, f32) == "winograd"
    assert winograd.prefer(engine.transposed_geometry(geom), f32)
    assert winograd.prefer_weight(geom, f32)
    assert engine.choose(_geometry((1, 16, 4, 20, 20), 24, (1, 0, 0), (3, 1, 1)), f32) != "winograd"
    calls = []
    forward, weight = winograd.forward, winograd.backward_weight
    monkeypatch.setattr(winograd, "forward", lambda *a: calls.append("f") or forward(*a))
    monkeypatch.setattr(winograd, "backward_weight", lambda *a: calls.append("w") or weight(*a))
    x, w = _data(rng, geom, np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    engine.conv3d_forward(x, w, geom)
    dx = engine.conv3d_backward_input(dy, w, geom)
    dw = engine.conv3d_backward_weight(x, dy, geom)
    assert calls == ["f", "f", "w"]
    assert _dw_error(dw, x, dy, geom, np.float32) <= C_DW_F4
    algorithm("im2col")
    expected = engine.conv3d_backward_input(dy.astype(np.float64), w.astype(np.float64), geom)
    assert _rel_error(dx, expected, engine.transposed_geometry(geom), np.float32) <= C_F4


# x shape, out channels, pads, dilation, kernel
DILATED = {
    "cubic-d2": ((1, 16, 36, 33, 35), 16, ((2, 2),) * 3, (2, 2, 2), (3, 3, 3)),
    "mixed-dilation-asym-pads": (
        (2, 16, 29, 36, 27),
        24,
        ((1, 3), (0, 2), (2, 1)),
        (2, 3, 1),
        (3, 3, 3),
    ),  # fmt: skip
    "d3-uneven-phases": ((1, 16, 40, 37, 38), 16, ((4, 4), (3, 1), (4, 4)), (3, 3, 3), (3, 3, 3)),
    "in-plane-d2": ((1, 16, 5, 30, 31), 16, ((0, 0), (2, 2), (1, 3)), (1, 2, 2), (1, 3, 3)),
    # dilation beyond the output extent on D: some phases have no outputs at all
    "empty-phases": ((1, 16, 5, 12, 13), 8, ((4, 4), (1, 1), (1, 1)), (4, 1, 1), (3, 3, 3)),
}


@pytest.mark.parametrize("m", [None, 2], ids=["auto", "F2"])
@pytest.mark.parametrize("name", sorted(DILATED))
def test_dilated_layers(algorithm, tile, monkeypatch, name, m):
    """Dilation: the tiles run over the dilation phases (no copies). The chooser's pick
    (asserted: Winograd for all three passes where it prefers it), float32 against the
    float64 references; inputs are not mutated."""
    x_shape, O, pads, dilation, kernel = DILATED[name]
    geom = conv_geometry(x_shape, (1, O, x_shape[1], *kernel), (1, 1, 1), pads, dilation, 1)
    rng = np.random.default_rng(sum(map(ord, name)))
    x, w = _data(rng, geom, np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    f32 = np.dtype(np.float32)
    algorithm(None if name != "empty-phases" else "winograd")  # too small to be preferred
    tile(m)
    calls = []
    forward, weight = winograd.forward, winograd.backward_weight
    monkeypatch.setattr(winograd, "forward", lambda *a: calls.append("f") or forward(*a))
    monkeypatch.setattr(winograd, "backward_weight", lambda *a: calls.append("w") or weight(*a))
    assert engine.choose(geom, f32) == "winograd"
    x0, w0, dy0 = x.copy(), w.copy(), dy.copy()
    y = engine.conv3d_forward(x, w, geom)
    dx = engine.conv3d_backward_input(dy, w, geom)
    dw = engine.conv3d_backward_weight(x, dy, geom)
    assert calls == ["f", "f", "w"]
    c_y, c_dw = (C_F2, C_DW_F2) if m == 2 else (C_F4, C_DW_F4)
    assert _rel_error(y, conv3d_reference(x, w, geom), geom, np.float32) <= c_y
    assert _dw_error(dw, x, dy, geom, np.float32) <= c_dw
    algorithm("im2col")
    expected = engine.conv3d_backward_input(dy.astype(np.float64), w.astype(np.float64), geom)
    assert _rel_error(dx, expected, engine.transposed_geometry(geom), np.float32) <= c_y
    for before, after in ((x0, x), (w0, w), (dy0, dy)):
        np.testing.assert_array_equal(before, after)


def test_weight_gradient_error_at_realistic_width(rng):
    """C = 64, 2 x 10^3 outputs (K = 2000): F(4) in float32 within c = 1 (measured 0.12)."""
    geom = _geometry((2, 64, 10, 10, 10), 48, (1, 1, 1))
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    assert winograd.tile_sizes(geom) == (4, 4, 4)
    c = _dw_error(winograd.backward_weight(x, dy, geom), x, dy, geom, np.float32)
    assert c <= 1.0, f"error constant {c:.3f}"


def test_weight_gradient_float64_matches_im2col(algorithm, rng):
    geom = _geometry((2, 16, 6, 5, 7), 8, (1, 1, 1))
    x, _ = _data(rng, geom, np.float64)
    dy = rng.standard_normal(geom.out_shape)
    algorithm("winograd")
    dw = engine.conv3d_backward_weight(x, dy, geom)
    algorithm("im2col")
    expected = engine.conv3d_backward_weight(x, dy, geom)
    np.testing.assert_allclose(dw, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["x", "dy"])
def test_weight_gradient_non_finite_goes_to_gemm(algorithm, rng, bad, where):
    """Inf/NaN anywhere make Winograd's dw non-finite; it then returns the GEMM family's
    result, whose IEEE propagation is exact (a lone Inf gives +-Inf, not NaN)."""
    geom = _geometry((1, 16, 5, 6, 7), 8, (1, 1, 1))
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    (x if where == "x" else dy)[0, 3, 2, 3, 4] = bad
    algorithm("winograd")
    dw = engine.conv3d_backward_weight(x, dy, geom)
    expected = winograd._gemm_weight(x, dy, geom)
    np.testing.assert_array_equal(dw, expected)
    assert not np.isfinite(dw).all()


def test_weight_gradient_small_workspace_cap(workspace, rng):
    """1 MiB cap: several blocks of tile rows accumulate into Mw; numpy allocates at most
    the cap besides dw, and the planned workspace fits too."""
    cap = 1 << 20
    workspace(cap)
    geom = _geometry((2, 16, 9, 13, 11), 24, (1, 1, 1))
    plan = winograd._plan_weight(geom, 4, winograd._threads())
    assert plan is not None and plan.rb < plan.rows  # several blocks
    assert winograd.weight_workspace_bytes(geom, 4, winograd._threads()) <= cap
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    dw, peak = _traced_peak(lambda: winograd.backward_weight(x, dy, geom))
    assert peak - dw.nbytes <= cap
    assert _dw_error(dw, x, dy, geom, np.float32) <= C_DW_F4


def test_weight_gradient_output_channel_chunks(no_slabs, workspace, rng):
    """When Mw does not fit half the cap, output channels go in chunks; C > O and C < O
    give the two Mw layouts (BLAS's m is the smaller channel count)."""
    workspace(3 << 20)
    for C, O in ((32, 80), (48, 20)):
        geom = _geometry((1, C, 4, 5, 6), O, (1, 1, 1))
        plan = winograd._plan_weight(geom, 4, winograd._threads())
        x = rng.standard_normal(geom.in_shape).astype(np.float32)
        dy = rng.standard_normal(geom.out_shape).astype(np.float32)
        assert plan is not None and (plan.ob < plan.Op) == (O == 80)  # output-channel chunks
        assert _dw_error(winograd.backward_weight(x, dy, geom), x, dy, geom, np.float32) <= C_DW_F4


def test_engine_uses_winograd_weight_gradient(algorithm, monkeypatch, rng):
    """The chooser keeps Winograd for dw where prefer_weight says so, else the unfolding."""
    algorithm(None)
    f32 = np.dtype(np.float32)
    # ... C3D conv5a too: its Mw goes in channel chunks, each computed once (one block)
    for shape, O in [((2, 128, 8, 28, 28), 256), ((1, 32, 64, 64, 64), 64),
                     ((2, 128, 16, 16, 16), 256), ((16, 512, 2, 7, 7), 512)]:  # fmt: skip
        assert winograd.prefer_weight(_geometry(shape, O, (1, 1, 1)), f32)
    # 8 input channels (half-empty lanes)
    assert not winograd.prefer_weight(_geometry((1, 8, 32, 32, 32), 16, (1, 1, 1)), f32)
    calls = []
    real = winograd.backward_weight
    monkeypatch.setattr(winograd, "backward_weight", lambda *a: calls.append(1) or real(*a))
    geom = _geometry((2, 16, 8, 8, 16), 16, (1, 1, 1))
    assert engine.choose(geom, f32) == "winograd" and winograd.prefer_weight(geom, f32)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    dw = engine.conv3d_backward_weight(x, dy, geom)
    assert calls == [1]
    assert _dw_error(dw, x, dy, geom, np.float32) <= C_DW_F4
    small = _geometry((2, 8, 8, 8, 16), 16, (1, 1, 1))  # Winograd forward, unfolded dw
    assert engine.choose(small, f32) == "winograd" and not winograd.prefer_weight(small, f32)
    engine.conv3d_backward_weight(x[:, :8], dy, small)
    assert calls == [1]


def test_small_workspace_cap(workspace, rng):
    """A 1 MiB cap: blocks of one tile row (or a few), same results, and neither the
    planned workspace nor what numpy allocates besides the output exceeds the cap."""
    cap = 1 << 20
    workspace(cap)
    geom = _geometry((2, 16, 9, 13, 11), 24, (1, 1, 1))
    plan = winograd._plan(geom, 4, winograd._threads())
    assert plan is not None and plan.rb < plan.rows  # several blocks
    assert winograd.workspace_bytes(geom, 4, winograd._threads()) <= cap
    x, w = _data(rng, geom, np.float32)
    y, peak = _traced_peak(lambda: winograd.forward(x, w, geom))
    assert peak - y.nbytes <= cap
    c = _rel_error(y, conv3d_reference(x, w, geom), geom, np.float32)
    assert c <= C_F4


def test_output_channel_chunks(no_slabs, workspace, rng):
    """When U does not fit half the cap, output channels go in chunks."""
    geom = _geometry((1, 32, 4, 5, 6), 80, (1, 1, 1))
    workspace(3 << 20)
    plan = winograd._plan(geom, 4, winograd._threads())
    assert plan is not None and plan.ob < plan.Op  # output-channel chunks
    x, w = _data(rng, geom, np.float32)
    c = _rel_error(winograd.forward(x, w, geom), conv3d_reference(x, w, geom), geom, np.float32)
    assert c <= C_F4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunks_recomputed_for_every_block(no_slabs, workspace, rng, dtype):
    """Under a cap that holds neither U nor Mw whole, several blocks each compute every
    chunk of output channels again (forward), or transform and add their share of dw
    (weight gradient): both match the references, within the cap."""
    cap = 3 << 20
    workspace(cap)
    geom = _geometry((2, 24, 13, 14, 15), 96, (1, 1, 1))
    x, w = _data(rng, geom, dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    isz = np.dtype(dtype).itemsize
    for plan, planned in (
        (winograd._plan(geom, isz, 2), winograd.workspace_bytes(geom, isz, 2)),
        (winograd._plan_weight(geom, isz, 2), winograd.weight_workspace_bytes(geom, isz, 2)),
    ):
        assert plan is not None and not plan.whole and plan.rb < plan.rows  # chunks x blocks
        assert planned <= cap
    b = rng.standard_normal(geom.O).astype(dtype)
    y = winograd.forward(x, w, geom, bias=b)
    ref = conv3d_reference(x, w, geom) + b.reshape(1, -1, 1, 1, 1)
    assert _rel_error(y, ref, geom, dtype) <= C_F4
    assert _dw_error(winograd.backward_weight(x, dy, geom), x, dy, geom, dtype) <= C_DW_F4


def test_chooser_takes_chunks_where_they_pay(no_slabs, algorithm, workspace):
    """Under a 32 MiB cap C3D conv3a's U (27 MiB) goes in chunks, and Winograd still
    pays; C3D conv5a's (F(2) on its depth of 2: 5.9 multiplications per output) does not,
    unless one block holds all its tiles (no chunk computed twice)."""
    algorithm(None)
    workspace(32 << 20)
    f32 = np.dtype(np.float32)
    c3d_conv3a = _geometry((2, 128, 8, 28, 28), 256, (1, 1, 1))
    assert not winograd._plan(c3d_conv3a, 4, winograd._threads()).whole
    assert engine.choose(c3d_conv3a, f32) == "winograd"
    assert winograd.prefer_weight(c3d_conv3a, f32)
    c3d_conv5a = _geometry((16, 512, 2, 7, 7), 512, (1, 1, 1))
    plan = winograd._plan(c3d_conv5a, 4, winograd._threads())
    assert plan is not None and plan.rb < plan.rows  # chunks again for every block
    assert not winograd.prefer(c3d_conv5a, f32)
    # at the default cap one block takes all 64 tiles: each chunk is computed once
    workspace(64 << 20)
    plan = winograd._plan(c3d_conv5a, 4, winograd._threads())
    assert not plan.whole and plan.rb == plan.rows and len(plan.slabs) == 1
    assert winograd.prefer(c3d_conv5a, f32)


def test_chooser(algorithm):
    algorithm(None)
    f32 = np.dtype(np.float32)
    c3d_conv3a = _geometry((2, 128, 8, 28, 28), 256, (1, 1, 1))
    assert engine.choose(c3d_conv3a, f32) == "winograd"
    # its input gradient (pads 1, channels swapped) too
    assert engine.choose(engine.transposed_geometry(c3d_conv3a), f32) == "winograd"
    assert engine.choose(_geometry((1, 32, 64, 64, 64), 64, (1, 1, 1)), f32) == "winograd"
    # not Winograd: a first layer, stride 2, groups
    assert engine.choose(_geometry((2, 3, 16, 112, 112), 64, (1, 1, 1)), f32) != "winograd"
    dilated = conv_geometry((1, 32, 9, 9, 9), (1, 32, 32, 3, 3, 3), (1, 1, 1), ((2, 2),) * 3,
                            (2, 2, 2), 1)  # fmt: skip
    strided = conv_geometry((1, 32, 9, 9, 9), (1, 32, 32, 3, 3, 3), (2, 2, 2), ((1, 1),) * 3,
                            (1, 1, 1), 1)  # fmt: skip
    grouped = conv_geometry((1, 32, 9, 9, 9), (2, 16, 16, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3,
                            (1, 1, 1), 2)  # fmt: skip
    # dilated: the tiles run over the dilation phases, taken where the partial tiles of
    # the phases waste little (9^3 at d=2 has phases of 5: 5.6x the outputs computed)
    assert winograd.supports(dilated) and winograd.tile_waste(dilated) > winograd.MAX_TILE_WASTE
    assert engine.choose(dilated, f32) != "winograd"
    even = conv_geometry((1, 32, 16, 16, 16), (1, 32, 32, 3, 3, 3), (1, 1, 1), ((2, 2),) * 3,
                         (2, 2, 2), 1)  # fmt: skip
    assert winograd.tile_waste(even) == 1.0 and engine.choose(even, f32) == "winograd"
    for geom in (strided, grouped):
        assert not winograd.supports(geom)
        assert engine.choose(geom, f32) != "winograd"
    # too few tiles for the 128-256 channel GEMMs to amortise U
    assert engine.choose(_geometry((8, 256, 4, 4, 4), 256, (1, 1, 1)), f32) != "winograd"


def test_without_numba_falls_back(algorithm, monkeypatch):
    monkeypatch.setattr(_numba_runtime, "_HAVE_NUMBA", False)
    geom = _geometry((2, 128, 8, 28, 28), 256, (1, 1, 1))
    assert not winograd.supports(geom)
    algorithm("winograd")  # forced but unsupported: the chooser decides
    assert engine.choose(geom, np.dtype(np.float32)) != "winograd"


def test_through_the_public_api(algorithm, rng):
    """volconv.functional's conv3d with Winograd forced, float32."""
    algorithm("winograd")
    x = rng.standard_normal((1, 8, 6, 7, 5)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3, 3)).astype(np.float32)
    y = volconv.functional.conv3d(volconv.tensor(x), volconv.tensor(w), padding=1).numpy()
    geom = _geometry(x.shape, 6, (1, 1, 1))
    ref = conv3d_reference(x, w.reshape(geom.w_shape), geom)
    assert _rel_error(y, ref, geom, np.float32) <= C_F4


def test_threads_give_the_serial_result_bitwise(algorithm, rng):
    """Four Python threads through the public API (the engine lock serialises the
    calls; the transform workers and their shared pool must not mix them up)."""
    algorithm("winograd")
    x = rng.standard_normal((2, 16, 6, 9, 7)).astype(np.float32)
    w = rng.standard_normal((12, 16, 3, 3, 3)).astype(np.float32)
    serial = volconv.functional.conv3d(x, w, padding=1).numpy()
    out, errors = {}, []

    def worker(t):
        try:
            for k in range(3):
                out[(t, k)] = volconv.functional.conv3d(x, w, padding=1).numpy()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    assert len(out) == 12
    for y in out.values():
        np.testing.assert_array_equal(y, serial)


# ---- channels-last: the transforms read and write NDHWC as it lies ------------------------
def _last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1))


CHANNELS_LAST = {  # name: (x shape, out channels, pads, dilation, kernel, cap or None)
    "mixed_pads": ((2, 5, 6, 7, 9), 3, ((0, 0), (1, 1), (2, 2)), (1, 1, 1), (3, 3, 3), None),
    "partial_tiles": ((2, 24, 2, 9, 7), 17, ((1, 1),) * 3, (1, 1, 1), (3, 3, 3), None),
    "negative_pads": ((1, 6, 7, 8, 9), 5, ((-1, 2), (2, -1), (0, 1)), (1, 1, 1), (3, 3, 3), None),
    "in_plane": ((1, 16, 4, 11, 10), 12, ((0, 0), (1, 1), (1, 1)), (1, 1, 1), (1, 3, 3), None),
    "dilated": ((1, 16, 13, 14, 15), 8, ((2, 2),) * 3, (2, 2, 2), (3, 3, 3), None),
    "odd_channels": ((1, 19, 6, 7, 8), 21, ((1, 1),) * 3, (1, 1, 1), (3, 3, 3), None),
    # several blocks, each computing every chunk of U again (Mw likewise), or slabs of
    # depth points, each over several blocks
    "chunks_x_blocks": ((2, 24, 13, 14, 15), 96, ((1, 1),) * 3, (1, 1, 1), (3, 3, 3), 3 << 20),
    "slabs_x_blocks": ((2, 24, 13, 14, 15), 96, ((1, 1),) * 3, (1, 1, 1), (3, 3, 3), 3 << 20),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CHANNELS_LAST))
def test_channels_last_equals_ncdhw_bitwise(workspace, tile, monkeypatch, name, dtype):
    """NDHWC in, NDHWC out: the forward (with its bias), the weight gradient and the input
    gradient (the adjoint's forward) equal the NCDHW computations bit for bit (the same
    arithmetic: only the gathers and scatters change), and leave their inputs alone."""
    x_shape, O, pads, dilation, kernel, cap = CHANNELS_LAST[name]
    tile(None)
    geom = conv_geometry(x_shape, (1, O, x_shape[1], *kernel), (1, 1, 1), pads, dilation, 1)
    isz = np.dtype(dtype).itemsize
    if cap is not None:  # (float64: twice the bytes)
        workspace(cap * isz // 4)
        slabs = name.startswith("slabs")
        monkeypatch.setattr(winograd, "SLABS", slabs)
        for plan in (winograd._plan(geom, isz, 2), winograd._plan_weight(geom, isz, 2)):
            assert plan.rb < plan.rows
            assert (plan.pz < 6 and plan.whole) if slabs else not plan.whole
    rng = np.random.default_rng(sum(map(ord, name)))
    x, w = _data(rng, geom, dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    b = rng.standard_normal(geom.O).astype(dtype)
    xl, dyl = _last(x), _last(dy)
    xl0, dyl0 = xl.copy(), dyl.copy()
    y = winograd.forward(xl, w, geom, bias=b, channels_last=True)
    assert y.shape == (geom.N, *geom.spatial_out, geom.O) and y.flags.c_contiguous
    np.testing.assert_array_equal(y, _last(winograd.forward(x, w, geom, bias=b)))
    dw = winograd.backward_weight(xl, dyl, geom, channels_last=True)
    np.testing.assert_array_equal(dw, winograd.backward_weight(x, dy, geom))
    adjoint, flipped = engine.transposed_geometry(geom), engine.flip_weight(w)
    dx = winograd.forward(dyl, flipped, adjoint, channels_last=True)
    np.testing.assert_array_equal(dx, _last(winograd.forward(dy, flipped, adjoint)))
    np.testing.assert_array_equal(xl, xl0)
    np.testing.assert_array_equal(dyl, dyl0)


def _no_transposes(monkeypatch):
    """Make every NCDHW <-> NDHWC transpose of the library fail the test."""
    from volconv.functional import _padding

    def refuse(*args, **kwargs):
        raise AssertionError("transpose_channels called")

    for module in (engine, winograd, _padding):
        monkeypatch.setattr(module, "transpose_channels", refuse)


def test_channels_last_layer_is_never_transposed(algorithm, monkeypatch, rng):
    """``conv3d(format="NDHWC")`` on a Winograd layer, forward and all three gradients,
    without one transpose; the results equal the NCDHW layer's bit for bit (the bias
    gradient, summed in another order, within a float32 sum's bound)."""
    from volconv.autodiff import GradManager

    algorithm(None)
    x = rng.standard_normal((1, 16, 12, 13, 14)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal((1, 24, 1, 1, 1)).astype(np.float32)
    dy = rng.standard_normal((1, 24, 12, 13, 14)).astype(np.float32)
    geom = _geometry(x.shape, 24, (1, 1, 1))
    assert engine.channels_last(geom, np.float32)
    assert winograd.prefer_weight(geom, np.float32)

    def run(xa, dya, fmt):
        xt, wt, bt = (volconv.Parameter(a) for a in (xa, w, b))
        gm = GradManager().attach([xt, wt, bt])
        with gm:
            y = volconv.functional.conv3d(xt, wt, bt, padding=1, format=fmt)
            gm.backward(y, volconv.tensor(dya))
        return y.numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()

    want = run(x, dy, "NCDHW")
    with monkeypatch.context() as patch:
        _no_transposes(patch)
        got = run(_last(x), _last(dy), "NDHWC")
    np.testing.assert_array_equal(got[0], _last(want[0]))
    np.testing.assert_array_equal(got[1], _last(want[1]))
    np.testing.assert_array_equal(got[2], want[2])
    # the bias gradient sums dy in another order: both within the worst-case bound of a
    # float32 sum of n terms (n eps max|dy|) of the float64 sum
    n = dy.size // dy.shape[1]
    db = dy.astype(np.float64).sum(axis=(0, 2, 3, 4)).reshape(b.shape)
    atol = n * float(np.finfo(np.float32).eps) * float(np.abs(dy).max())
    for grad in (got[3], want[3]):
        np.testing.assert_allclose(grad, db, rtol=0, atol=atol)


@pytest.mark.parametrize("bad", ["x", "w", "dy"])
def test_channels_last_non_finite_goes_through_ncdhw(algorithm, rng, bad):
    """An Inf/NaN sends each NDHWC pass to the GEMM family in NCDHW (between transposes),
    as it does the NCDHW passes: the same results, NaN for NaN."""
    algorithm(None)
    geom = _geometry((1, 16, 12, 13, 14), 16, (1, 1, 1))
    x, w = _data(rng, geom, np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    target = {"x": x, "w": w, "dy": dy}[bad]
    target[(0, 3, 2, 1, 1, 1)[: target.ndim]] = np.inf
    assert engine.channels_last(geom, np.float32)
    pairs = (
        (engine.ndhwc_forward(_last(x), w, geom), _last(engine.conv3d_forward(x, w, geom))),
        (engine.ndhwc_backward_input(_last(dy), w, geom),
         _last(engine.conv3d_backward_input(dy, w, geom))),
        (engine.ndhwc_backward_weight(_last(x), _last(dy), geom),
         engine.conv3d_backward_weight(x, dy, geom)),
    )  # fmt: skip
    for got, want in pairs:
        np.testing.assert_array_equal(got, want)
    assert not all(np.isfinite(got).all() for got, _ in pairs)


def test_channels_last_gradients_that_are_not_winograd(algorithm, rng):
    """Eight input channels: Winograd's forward, but a GEMM weight gradient and GEMM +
    col2im input gradient (the NCDHW choices): NDHWC gives the NCDHW results."""
    algorithm(None)
    geom = _geometry((1, 8, 12, 13, 14), 16, (1, 1, 1))
    x, w = _data(rng, geom, np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    assert engine.channels_last(geom, np.float32)
    assert not winograd.prefer_weight(geom, np.float32)
    np.testing.assert_array_equal(
        engine.ndhwc_backward_weight(_last(x), _last(dy), geom),
        engine.conv3d_backward_weight(x, dy, geom),
    )
    np.testing.assert_array_equal(
        engine.ndhwc_backward_input(_last(dy), w, geom),
        _last(engine.conv3d_backward_input(dy, w, geom)),
    )


# ---- slabs of depth points -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [None, 2], ids=["F4", "F2"])
def test_depth_point_slabs(tile, monkeypatch, rng, m, dtype):
    """Every slab size (uneven last slabs included), over several blocks: the forward
    (with its bias: the first slab writes y, the others add), the weight gradient (each
    slab's share of dw added) and the input gradient match the references, and the
    unslabbed results to rounding."""
    tile(m)
    geom = _geometry((2, 20, 9, 10, 11), 24, (1, 1, 1))
    x, w = _data(rng, geom, dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    b = rng.standard_normal(geom.O).astype(dtype)
    adjoint, flipped = engine.transposed_geometry(geom), engine.flip_weight(w)
    whole = (
        winograd.forward(x, w, geom, bias=b),
        winograd.backward_weight(x, dy, geom),
        winograd.forward(dy, flipped, adjoint),
    )
    plan = winograd._plan
    ad = winograd._points(winograd.tile_sizes(geom))[0]
    for pz in range(1, ad):
        seen = []

        def slabbed(*args, pz=pz, seen=seen, **kwargs):
            p = plan(*args, **kwargs)._replace(pz=pz, rb=3)
            seen.append(len(p.slabs))
            return p

        monkeypatch.setattr(winograd, "_plan", slabbed)
        y = winograd.forward(x, w, geom, bias=b)
        dw = winograd.backward_weight(x, dy, geom)
        dx = winograd.forward(dy, flipped, adjoint)
        assert seen == [-(-ad // pz)] * 3
        ref = conv3d_reference(x, w, geom) + b.reshape(1, -1, 1, 1, 1)
        c_y, c_dw = (C_F2, C_DW_F2) if m == 2 else (C_F4, C_DW_F4)
        assert _rel_error(y, ref, geom, dtype) <= c_y
        assert _dw_error(dw, x, dy, geom, dtype) <= c_dw
        assert _rel_error(dx, conv3d_reference(dy, flipped, adjoint), adjoint, dtype) <= c_y
        tol = 1e-12 if dtype == np.float64 else 2e-5
        for got, want in zip((y, dw, dx), whole, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * float(np.abs(want).max()))


def test_slabs_under_a_tight_cap(algorithm, workspace, rng):
    """Under a 4 MiB cap a 64 -> 128-channel layer on 16^3, whose U (7 MiB) is 8x its
    weight, takes slabs of depth points in both passes (and Winograd still pays: nothing
    is recomputed); numpy's peak besides the output stays within the cap, and the result
    matches the reference."""
    cap = 4 << 20
    workspace(cap)
    algorithm(None)
    geom = _geometry((1, 64, 16, 16, 16), 128, (1, 1, 1))
    for kind in ("forward", "weight"):
        plan = winograd._plan(geom, 4, winograd._threads(), kind)
        assert plan.whole and plan.pz < 6 and plan.workspace <= cap
    assert engine.choose(geom, np.dtype(np.float32)) == "winograd"
    assert winograd.prefer_weight(geom, np.dtype(np.float32))
    x, w = _data(rng, geom, np.float32)
    y, peak = _traced_peak(lambda: winograd.forward(x, w, geom))
    assert peak - y.nbytes <= cap
    assert _rel_error(y, conv3d_reference(x, w, geom), geom, np.float32) <= C_F4


def test_one_block_of_chunks_before_slabs(algorithm, workspace):
    """Chunks that one block covers compute nothing twice, slabs gather the input again:
    the planner takes the chunks (C3D conv5a, 64 tiles, at the default cap), and slabs
    where chunks would need several blocks (C3D conv3a under 16 MiB)."""
    algorithm(None)
    workspace(64 << 20)
    c3d_conv5a = _geometry((16, 512, 2, 7, 7), 512, (1, 1, 1))
    for kind in ("forward", "weight"):
        plan = winograd._plan(c3d_conv5a, 4, 2, kind)
        assert not plan.whole and plan.rb == plan.rows and len(plan.slabs) == 1
    workspace(16 << 20)
    c3d_conv3a = _geometry((2, 128, 8, 28, 28), 256, (1, 1, 1))
    for kind in ("forward", "weight"):
        plan = winograd._plan(c3d_conv3a, 4, 2, kind)
        assert plan.whole and len(plan.slabs) > 1


def test_weight_gradient_slabs_keep_tall_blocks(algorithm, workspace):
    """Under a 24 MiB cap C3D conv3a's weight gradient takes more, thinner slabs of depth
    points than its forward, for blocks of WEIGHT_SLAB_MIN_TILES tiles (its GEMMs reduce
    over a block's tiles); the tiny layer of test_slabs_under_a_tight_cap, whose every
    slab is too small for them, still gets slabs."""
    algorithm(None)
    workspace(24 << 20)
    c3d_conv3a = _geometry((2, 128, 8, 28, 28), 256, (1, 1, 1))
    forward = winograd._plan(c3d_conv3a, 4, 2, "forward")
    weight = winograd._plan(c3d_conv3a, 4, 2, "weight")
    assert forward.whole and weight.whole and weight.pz < forward.pz < 6
    assert weight.rb * weight.grid[2] >= winograd.WEIGHT_SLAB_MIN_TILES
    assert forward.rb * forward.grid[2] < winograd.WEIGHT_SLAB_MIN_TILES
    workspace(4 << 20)
    small = _geometry((1, 64, 16, 16, 16), 128, (1, 1, 1))
    plan = winograd._plan(small, 4, 2, "weight")
    assert plan.whole and plan.pz < 6 and plan.rb * plan.grid[2] < winograd.WEIGHT_SLAB_MIN_TILES


def test_r2plus1d_block_in_channels_last_is_never_transposed(algorithm, monkeypatch, rng):
    """An R(2+1)D block in NDHWC, spatial 1x3x3 (Winograd) then temporal 3x1x1
    (pointwise depth taps), forward and backward through both layers, without one
    transpose; the same results as the NCDHW block."""
    from volconv.autodiff import GradManager

    algorithm(None)
    F = volconv.functional
    x = rng.standard_normal((1, 16, 6, 14, 15)).astype(np.float32)
    ws = rng.standard_normal((24, 16, 1, 3, 3)).astype(np.float32) * 0.2
    wt = rng.standard_normal((16, 24, 3, 1, 1)).astype(np.float32) * 0.2
    spatial = _geometry(x.shape, 24, (0, 1, 1), kernel=(1, 3, 3))
    assert engine.choose(spatial, np.dtype(np.float32)) == "winograd"

    def run(xa, fmt):
        params = [volconv.Parameter(a) for a in (xa, ws, wt)]
        gm = GradManager().attach(params)
        with gm:
            h = F.relu(F.conv3d(params[0], params[1], padding=(0, 1, 1), format=fmt))
            y = F.conv3d(h, params[2], padding=(1, 0, 0), format=fmt)
            gm.backward((y * y).sum())
        return [y.numpy()] + [p.grad.numpy() for p in params]

    want = run(x, "NCDHW")
    with monkeypatch.context() as patch:
        _no_transposes(patch)
        got = run(_last(x), "NDHWC")
    pairs = zip(got, (_last(want[0]), _last(want[1]), want[2], want[3]), strict=True)
    for g, w in pairs:
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(np.abs(w).max()))
