"""FFT (overlap-save) convolution (``volconv.engine.fft``).

Forward, input gradient and weight gradient against float64 direct sums, with the
error measured as a constant ``c`` of the bound ``c * eps * sqrt(K) * S``: ``K`` the
reduction length of the quantity (``C*taps`` for y, ``O*taps`` for dx, ``N*Do*Ho*Wo``
for dw) and ``S`` the largest sum of magnitudes that any one entry adds up (the same
direct sums on ``|x|, |w|, |dy|``). Measured over 2,400 random geometries (1-6
channels, sizes 1-9, kernels 1-4, dilation 1-3, pads 0-3, both dtypes), the table below
at the default and a tight workspace cap, and five wider layers (8-64 channels, kernels
3-7, 16^3-20^3): forward c <= 2.3, dx c <= 2.3, dw c <= 0.95, typically <= 1.5; the
largest values come from the smallest reductions (K = 1-3), where the transforms'
error, ``~eps * log n`` relative to the block's norm, is largest against the bound.
The tests allow ``C_Y = C_DX = C_DW = 6``.

Also: both dtypes, the tiled / chunked / batched code paths under a tight cap (blocks
that do not divide the volume, output-channel chunks with cached and recomputed input
spectra), the numpy fallback without numba, exact zeros where every product reads
padding, Inf/NaN gradients through the GEMM family, the workspace cap measured with
``tracemalloc``, and ``supports()`` refusing a cap that cannot hold one block.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from volconv import engine
from volconv.engine import fft
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference

#: Allowed error constants (measured worst: see the module docstring).
C_Y = 6.0
C_DX = 6.0
C_DW = 6.0

#: A cap that forces several blocks, output-channel chunks and batches on these layers.
TIGHT = 352 << 10

# (name, x shape, out channels, kernel, pads, dilation)
CASES = [
    ("k3_p1_batch2", (2, 5, 9, 10, 11), 6, (3, 3, 3), ((1, 1),) * 3, (1, 1, 1)),
    ("k5_p2", (1, 4, 14, 13, 12), 3, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1)),
    ("k7_p3", (1, 3, 12, 15, 13), 4, (7, 7, 7), ((3, 3),) * 3, (1, 1, 1)),
    ("k3_dilation2", (1, 4, 13, 12, 14), 5, (3, 3, 3), ((2, 2),) * 3, (2, 2, 2)),
    ("asymmetric", (2, 3, 9, 12, 10), 4, (3, 5, 2), ((2, 0), (1, 3), (0, 1)), (1, 2, 3)),
    ("negative_pads", (1, 3, 10, 11, 9), 2, (3, 3, 3), ((-1, 2), (3, -2), (-1, -1)), (1, 1, 1)),
    ("noncubic_batch3", (3, 2, 5, 17, 8), 3, (1, 5, 3), ((0, 0), (2, 2), (1, 1)), (1, 1, 1)),
]


def _geometry(x_shape, O, kernel, pads, dilation):
    return conv_geometry(x_shape, (1, O, x_shape[1], *kernel), (1, 1, 1), pads, dilation, 1)


def _reference(x, w, dy, geom):
    """float64 ``(y, dx, dw)`` by direct sums over the kernel taps (independent of the
    engine: explicit zero padding, negative pads cropping)."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    N, C = x.shape[:2]
    O = geom.O
    lows = [p[0] for p in geom.pads]
    padded = [n + lo + hi for n, (lo, hi) in zip(geom.spatial_in, geom.pads, strict=True)]
    inner = []  # x[j] sits at padded position j + lo
    for n, lo, ln in zip(geom.spatial_in, lows, padded, strict=True):
        j0, j1 = max(0, -lo), min(n, ln - lo)
        inner.append((slice(j0, j1), slice(j0 + lo, j1 + lo)))
    xp = np.zeros((N, C, *padded))
    xp[(slice(None), slice(None), *(p for _, p in inner))] = x[
        (slice(None), slice(None), *(s for s, _ in inner))
    ]
    w5 = w.reshape(O, C, *geom.kernel)
    y = np.zeros(geom.out_shape)
    dxp = np.zeros_like(xp)
    dw = np.zeros((O, C, *geom.kernel))
    Do, Ho, Wo = geom.spatial_out
    dd, dh, dl = geom.dilation
    for a in range(geom.kernel[0]):
        for b in range(geom.kernel[1]):
            for e in range(geom.kernel[2]):
                win = (
                    slice(None),
                    slice(None),
                    slice(a * dd, a * dd + Do),
                    slice(b * dh, b * dh + Ho),
                    slice(e * dl, e * dl + Wo),
                )
                tap = w5[:, :, a, b, e]
                y += np.einsum("ncdhw,oc->nodhw", xp[win], tap)
                dxp[win] += np.einsum("nodhw,oc->ncdhw", dy, tap)
                dw[:, :, a, b, e] = np.einsum("nodhw,ncdhw->oc", dy, xp[win])
    dx = np.zeros(x.shape)
    dx[(slice(None), slice(None), *(s for s, _ in inner))] = dxp[
        (slice(None), slice(None), *(p for _, p in inner))
    ]
    return y, dx, dw.reshape(geom.w_shape)


def _constants(x, w, dy, geom, got):
    """The error constants ``c`` of ``got = (y, dx, dw)`` (see the module docstring)."""
    dtype = got[0].dtype
    ref = _reference(x, w, dy, geom)
    mag = _reference(np.abs(x), np.abs(w), np.abs(dy), geom)
    lengths = (geom.reduction, geom.O * geom.taps, geom.N * int(np.prod(geom.spatial_out)))
    out = []
    for g, r, m, K in zip(got, ref, mag, lengths, strict=True):
        bound = float(np.finfo(dtype).eps) * np.sqrt(K) * float(np.abs(m).max(initial=0.0))
        err = float(np.abs(g - r).max(initial=0.0))
        out.append(err / bound if bound > 0 else (0.0 if err == 0 else np.inf))
    return out


def _passes(x, w, dy, geom):
    return (
        fft.forward(x, w, geom),
        fft.backward_input(dy, w, geom),
        fft.backward_weight(x, dy, geom),
    )


def _data(rng, geom, dtype):
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    return x, w, dy


@pytest.mark.parametrize("cap", [None, TIGHT], ids=["default_cap", "tight_cap"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "xs", "O", "k", "pads", "dil"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference(workspace, rng, name, xs, O, k, pads, dil, dtype, cap):
    if cap is not None:
        workspace(cap)
    geom = _geometry(xs, O, k, pads, dil)
    assert fft.supports(geom)
    x, w, dy = _data(rng, geom, dtype)
    got = _passes(x, w, dy, geom)
    for g, shape in zip(got, (geom.out_shape, geom.in_shape, geom.w_shape), strict=True):
        assert g.dtype == dtype and g.shape == shape
    cy, cdx, cdw = _constants(x, w, dy, geom, got)
    assert cy <= C_Y and cdx <= C_DX and cdw <= C_DW, (cy, cdx, cdw)


def test_tight_cap_plans_cover_every_path(workspace):
    """The tight-cap cases above run blocks that do not divide the output, several
    batches of blocks, and output-channel chunks both with the input spectra computed
    once (one batch) and recomputed per chunk (several batches), in both passes."""
    workspace(TIGHT)
    seen = set()
    for _, xs, O, k, pads, dil in CASES:
        geom = _geometry(xs, O, k, pads, dil)
        for isz in (4, 8):
            for kind in ("forward", "weight"):
                plan = fft._plan(geom, isz, kind)
                assert plan is not None and plan.nbytes <= TIGHT
                blocks = geom.N * int(np.prod(plan.m))
                several = plan.bb < blocks
                chunked = plan.ob < O
                if any(m * b > n for m, b, n in zip(plan.m, plan.b, geom.spatial_out, strict=True)):
                    seen.add("remainder")
                if max(plan.m) > 1:
                    seen.add("tiled")
                seen.add((kind, "batches" if several else "one batch", chunked))
    assert {"remainder", "tiled"} <= seen
    for kind in ("forward", "weight"):
        assert (kind, "one batch", True) in seen  # chunks, input spectra cached
        assert (kind, "batches", True) in seen  # chunks, input spectra recomputed
        assert (kind, "batches", False) in seen


def test_float64_is_double_precision(rng):
    """float64 stays float64 end to end: errors near 1e-16, far below float32's."""
    geom = _geometry((2, 6, 11, 9, 10), 5, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1))
    x, w, dy = _data(rng, geom, np.float64)
    got = _passes(x, w, dy, geom)
    ref = _reference(x, w, dy, geom)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == np.float64
        assert np.abs(g - r).max() <= 1e-13 * np.abs(r).max()
    # and float32 really computes in single precision (complex64)
    got32 = _passes(*(a.astype(np.float32) for a in (x, w, dy)), geom)
    assert all(
        np.abs(g - r).max() > 1e-10 * np.abs(r).max() for g, r in zip(got32, ref, strict=True)
    )


def test_engine_routes_and_matches_im2col(algorithm, rng):
    """Forced through the engine (dx of a 16-channel layer goes through the forward on
    the transposed geometry, negative pads included): float64 equals im2col's."""
    geom = _geometry((1, 16, 7, 8, 6), 16, (3, 3, 3), ((3, 3),) * 3, (1, 1, 1))
    x, w, dy = _data(rng, geom, np.float64)
    results = {}
    for name in ("fft", "im2col"):
        algorithm(name)
        results[name] = (
            engine.conv3d_forward(x, w, geom),
            engine.conv3d_backward_input(dy, w, geom),
            engine.conv3d_backward_weight(x, dy, geom),
        )
    for a, b in zip(results["fft"], results["im2col"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


def test_numpy_fallback_without_numba(monkeypatch, workspace, rng):
    """Without numba the channel products run in numpy: same results."""
    workspace(TIGHT)
    geom = _geometry((2, 3, 9, 12, 10), 4, (3, 5, 2), ((2, 0), (1, 3), (0, 1)), (1, 2, 3))
    x, w, dy = _data(rng, geom, np.float32)
    compiled = _passes(x, w, dy, geom)
    monkeypatch.setattr(fft, "_kernels", lambda: None)
    fallback = _passes(x, w, dy, geom)
    for a, b in zip(fallback, compiled, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert max(_constants(x, w, dy, geom, fallback)) <= 6.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_public_scipy_fft_fallback(monkeypatch, workspace, rng, dtype):
    """Without SciPy's pocketfft binding (a private module) the transforms go through the
    public ``scipy.fft`` functions: the same results to rounding."""
    workspace(TIGHT)
    geom = _geometry((2, 3, 9, 12, 10), 4, (3, 5, 2), ((2, 0), (1, 3), (0, 1)), (1, 2, 3))
    x, w, dy = _data(rng, geom, dtype)
    binding = _passes(x, w, dy, geom)
    monkeypatch.setattr(fft, "_pocketfft", None)
    public = _passes(x, w, dy, geom)
    for a, b in zip(public, binding, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_outputs_reading_only_padding_are_exact_zeros(rng):
    """Every product of these outputs / taps reads padding: direct convolution gives
    exact zeros, and so must the transforms (no rounding residue)."""
    # depth: 2 samples, kernel 2 with dilation 3 and padding 1 reads positions -1 and 2
    geom = _geometry((2, 2, 2, 8, 8), 3, (2, 3, 4), ((1, 1), (0, 0), (1, 1)), (3, 3, 3))
    x, w, dy = _data(rng, geom, np.float64)
    y, dx, dw = _passes(x, w, dy, geom)
    assert not y.any() and not dx.any() and not dw.any()
    # partly: the first and last output rows along W read only padding
    geom = _geometry((1, 2, 5, 5, 5), 2, (3, 3, 2), ((1, 1), (1, 1), (4, 4)), (1, 1, 3))
    x, w, dy = _data(rng, geom, np.float64)
    y = fft.forward(x, w, geom)
    ry = _reference(x, w, dy, geom)[0]
    assert (ry[..., 0] == 0).all() and (ry[..., -1] == 0).all()
    np.testing.assert_array_equal(y == 0, ry == 0)
    np.testing.assert_allclose(y, ry, rtol=0, atol=1e-13 * np.abs(ry).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["x", "dy", "w"])
def test_non_finite_gradients_go_to_gemm(rng, bad, where):
    """A transform would spread one Inf/NaN over its block; the gradients then return the
    GEMM family's result, whose IEEE propagation is exact (the chooser's GEMM pick: the
    GEMM algorithms differ on NaN taps that meet only padding, see the README)."""
    geom = _geometry((1, 4, 6, 7, 8), 3, (3, 3, 3), ((1, 1),) * 3, (1, 1, 1))
    x, w, dy = _data(rng, geom, np.float64)
    {"x": x, "dy": dy, "w": w}[where][0, 1, 0, 0, 0] = bad
    gemm = engine.ALGORITHMS[engine._preferred_gemm(geom)]  # the chooser's GEMM pick
    with np.errstate(invalid="ignore"):
        if where != "w":
            _same_ieee(fft.backward_weight(x, dy, geom), gemm.backward_weight(x, dy, geom))
        if where != "x":
            _same_ieee(fft.backward_input(dy, w, geom), gemm.backward_input(dy, w, geom))


def _same_ieee(got, expected):
    """Same NaN / +Inf / -Inf entries (some, not all: not spread over the block), and
    the finite ones equal up to rounding."""
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(got), test(expected))
    finite = np.isfinite(expected)
    assert finite.any() and not finite.all()
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-10, atol=1e-10)


def _scratch(fn, result_bytes):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del out
    return peak - result_bytes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scratch_memory_under_small_cap(workspace, rng, dtype):
    """1 MiB cap on a 5x5x5 layer whose whole weight spectra alone would need 8-16 MiB:
    the plan tiles and chunks, and what numpy (and numba's runtime) allocate besides
    the operands and the result stays under the cap."""
    cap = 1 << 20
    workspace(cap)
    geom = _geometry((1, 16, 20, 22, 18), 16, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1))
    assert fft.supports(geom)
    isz = np.dtype(dtype).itemsize
    assert fft.workspace_bytes(geom, isz, fft._threads()) <= cap
    plan = fft._plan(geom, isz, "forward")
    assert plan.ob < geom.O and max(plan.m) > 1
    x, w, dy = _data(rng, geom, dtype)
    _passes(x, w, dy, geom)  # numba compiles or loads its kernels outside the measurement
    slack = 64 << 10  # small per-call arrays (twiddles, block lists, the flipped weight)
    assert _scratch(lambda: fft.forward(x, w, geom), dy.nbytes) <= cap + slack
    assert _scratch(lambda: fft.backward_input(dy, w, geom), x.nbytes) <= cap + slack
    assert _scratch(lambda: fft.backward_weight(x, dy, geom), w.nbytes) <= cap + slack


def test_too_small_cap_is_not_supported(workspace):
    geom = _geometry((1, 16, 20, 22, 18), 16, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1))
    assert fft.supports(geom)
    # one 5^3 block (b = 1) of 16 channels: its spectra, window and input spectra
    # take more than this in float32 already
    workspace(16 << 10)
    assert not fft.supports(geom)
    for isz in (4, 8):
        with pytest.raises(ValueError, match="cannot hold one block"):
            fft.workspace_bytes(geom, isz)
    assert "fft" not in [n for n in engine.algorithms() if engine._supports(n, geom)]


def test_supports_only_dense_stride_1():
    dense = conv_geometry(
        (1, 4, 6, 6, 6), (1, 4, 4, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 1
    )
    grouped = conv_geometry(
        (1, 4, 6, 6, 6), (2, 2, 2, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 2
    )
    strided = conv_geometry(
        (1, 4, 6, 6, 6), (1, 4, 4, 3, 3, 3), (1, 2, 1), ((1, 1),) * 3, (1, 1, 1), 1
    )
    assert fft.supports(dense)
    assert not fft.supports(grouped) and not fft.supports(strided)
    assert not fft.prefer(grouped, np.float32) and not fft.prefer(strided, np.float32)


def test_repeated_calls_are_bitwise_identical(workspace, rng):
    """Several batches and chunks, threads in the transforms and the product kernels."""
    workspace(TIGHT)
    geom = _geometry((1, 4, 14, 13, 12), 3, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1))
    x, w, dy = _data(rng, geom, np.float32)
    first = _passes(x, w, dy, geom)
    for _ in range(2):
        again = _passes(x.copy(), w.copy(), dy.copy(), geom)
        for a, b in zip(again, first, strict=True):
            np.testing.assert_array_equal(a, b)


def test_reference_helper_agrees_with_the_engine_oracle(rng):
    """The direct sums above against ``conv3d_reference`` (forward) on a padded case, so
    that a wrong helper cannot make the comparisons vacuous."""
    geom = _geometry((2, 3, 6, 7, 5), 2, (3, 2, 3), ((2, -1), (1, 1), (0, 2)), (2, 1, 1))
    x, w, dy = _data(rng, geom, np.float64)
    y, dx, dw = _reference(x, w, dy, geom)
    np.testing.assert_allclose(y, conv3d_reference(x, w, geom), rtol=1e-12, atol=1e-12)
    # adjointness: <y(x), dy> = <x, dx(dy)> and = <w, dw(x, dy)>
    lhs = float((y * dy).sum())
    assert abs(lhs - float((x * dx).sum())) <= 1e-9 * abs(lhs)
    assert abs(lhs - float((w * dw).sum())) <= 1e-9 * abs(lhs)


@pytest.mark.skipif(not fft.numba_available(), reason="prefer() needs numba")
def test_prefer_large_kernels_on_large_volumes():
    """The measured policy (see ``fft.prefer``): V-Net's 5x5x5 forward and weight gradient
    yes; 3x3x3 layers (dilated too), a small volume with many channels and the small
    5x5x5 weight gradients no."""

    def geom(C, S, k, pad, dil=1):
        return _geometry((1, C, S, S, S), C, (k, k, k), ((pad, pad),) * 3, (dil, dil, dil))

    assert fft.prefer(geom(16, 64, 5, 2), np.float32)
    assert fft.prefer(geom(16, 64, 5, 2), np.float32, kind="weight")  # V-Net: 0.60x
    assert fft.prefer(geom(16, 48, 7, 3), np.float32, kind="weight")
    # weight gradients where the in-plane unfolding measured faster (1.08x, 1.25x)
    assert not fft.prefer(geom(16, 32, 5, 2), np.float32, kind="weight")
    thin = _geometry((1, 8, 32, 32, 32), 32, (5, 5, 5), ((2, 2),) * 3, (1, 1, 1))
    assert not fft.prefer(thin, np.float32, kind="weight")
    assert not fft.prefer(thin, np.float32)
    for g in (geom(32, 32, 3, 1), geom(32, 64, 3, 2, dil=2), geom(64, 16, 5, 2)):
        assert not fft.prefer(g, np.float32)
        assert not fft.prefer(g, np.float32, kind="weight")
    with pytest.raises(ValueError, match="kind"):
        fft.prefer(geom(16, 64, 5, 2), np.float32, kind="input")
