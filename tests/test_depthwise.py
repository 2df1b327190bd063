"""The direct depthwise / small-group kernel (``volconv.engine.depthwise``).

Forward against the float64 oracle; both gradients against im2col's in float64 and
through the adjoint identities ``<conv(x, w), dy> = <x, dx> = <w, dw>``; float32
against float64 with an error bound from the sum of absolute products; bit-for-bit
reproducibility across thread counts; and the chooser's use of the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

import volconv
from volconv import engine
from volconv.engine import _numba_runtime, depthwise, im2col
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference

pytestmark = pytest.mark.skipif(not depthwise.numba_available(), reason="numba is not installed")

EPS32 = float(np.finfo(np.float32).eps)

# name, x_shape, groups, out channels per group, kernel, stride, (lo, hi) pads, dilation
CASES = [
    ("m1", (2, 4, 5, 6, 7), 4, 1, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1)),
    ("m2", (2, 3, 5, 6, 7), 3, 2, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1)),
    ("stride2", (1, 4, 7, 8, 9), 4, 1, (3, 3, 3), (2, 2, 2), ((1, 1),) * 3, (1, 1, 1)),
    (
        "stride_asym_k135",
        (2, 2, 7, 9, 11),
        2,
        2,
        (1, 3, 5),
        (1, 2, 3),
        ((0, 0), (1, 1), (2, 2)),
        (1, 1, 1),
    ),
    ("dilation2", (1, 3, 7, 8, 9), 3, 1, (3, 3, 3), (1, 1, 1), ((2, 2),) * 3, (2, 2, 2)),
    ("pad0_odd", (2, 2, 5, 7, 9), 2, 1, (3, 3, 3), (1, 1, 1), ((0, 0),) * 3, (1, 1, 1)),
    ("pad2_grows", (1, 2, 3, 5, 4), 2, 1, (3, 3, 3), (1, 1, 1), ((2, 2),) * 3, (1, 1, 1)),
    ("one_voxel", (2, 3, 1, 1, 1), 3, 2, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1)),
    ("groups_cg2", (2, 4, 5, 6, 7), 2, 3, (3, 3, 3), (2, 1, 2), ((1, 1),) * 3, (1, 1, 1)),
    # pads may be negative (crop) in the engine's internal transposed geometries
    (
        "neg_pad_mixed",
        (1, 4, 6, 7, 8),
        2,
        3,
        (2, 3, 3),
        (2, 1, 2),
        ((1, 0), (-1, 2), (0, 1)),
        (1, 2, 1),
    ),
    (
        "stride3_k2",
        (1, 2, 8, 7, 10),
        2,
        1,
        (2, 2, 2),
        (3, 3, 3),
        ((0, 1), (1, 0), (1, 1)),
        (1, 1, 1),
    ),
]


def _geom(case):
    _, xs, G, Og, k, s, p, d = case
    return conv_geometry(xs, (G, Og, xs[1] // G, *k), s, p, d, G)


def _arrays(case, seed=0):
    g = _geom(case)
    rng = np.random.default_rng(seed + sum(map(ord, case[0])))
    x = rng.standard_normal(g.in_shape)
    w = rng.standard_normal(g.w_shape)
    dy = rng.standard_normal(g.out_shape)
    return g, x, w, dy


@pytest.fixture
def threads():
    """Set numba's thread count for one test and restore it afterwards."""
    import numba

    saved = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(saved)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float64_exact(case):
    g, x, w, dy = _arrays(case)
    assert depthwise.supports(g)
    y = depthwise.forward(x, w, g)
    np.testing.assert_allclose(y, conv3d_reference(x, w, g), rtol=1e-12, atol=1e-12)
    dx = depthwise.backward_input(dy, w, g)
    dw = depthwise.backward_weight(x, dy, g)
    np.testing.assert_allclose(dx, im2col.backward_input(dy, w, g), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, im2col.backward_weight(x, dy, g), rtol=1e-12, atol=1e-11)
    # adjoint identities: <conv(x, w), dy> = <x, dx> = <w, dw>
    ydy = float(np.vdot(y, dy))
    scale = float(np.vdot(np.abs(y), np.abs(dy))) + 1e-300
    assert abs(float(np.vdot(x, dx)) - ydy) <= 1e-12 * scale
    assert abs(float(np.vdot(w, dw)) - ydy) <= 1e-12 * scale


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_error_bound(case):
    """|float32 - float64| <= c * eps32 * sqrt(K) * (sum of |products|), per element."""
    g, x, w, dy = _arrays(case, seed=7)
    x32, w32, dy32 = (a.astype(np.float32) for a in (x, w, dy))
    x, w, dy = (a.astype(np.float64) for a in (x32, w32, dy32))  # same values in both

    def check(got, ref, absref, K):
        assert got.dtype == np.float32
        tol = 4 * EPS32 * np.sqrt(K) * absref + 1e-30
        assert np.all(np.abs(got - ref) <= tol), float(np.max(np.abs(got - ref) / tol))

    ax, aw, ady = np.abs(x), np.abs(w), np.abs(dy)
    check(
        depthwise.forward(x32, w32, g),
        conv3d_reference(x, w, g),
        conv3d_reference(ax, aw, g),
        g.reduction,
    )
    check(
        depthwise.backward_input(dy32, w32, g),
        im2col.backward_input(dy, w, g),
        im2col.backward_input(ady, aw, g),
        g.Og * g.taps,
    )
    Do, Ho, Wo = g.spatial_out
    check(
        depthwise.backward_weight(x32, dy32, g),
        im2col.backward_weight(x, dy, g),
        im2col.backward_weight(ax, ady, g),
        g.N * Do * Ho * Wo,
    )


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[9]], ids=lambda c: c[0])
def test_bitwise_reproducible_across_threads_and_workspace(case, threads, workspace):
    g, x, w, dy = _arrays(case, seed=3)
    x, w, dy = (a.astype(np.float32) for a in (x, w, dy))

    def run():
        return (
            depthwise.forward(x, w, g),
            depthwise.backward_input(dy, w, g),
            depthwise.backward_weight(x, dy, g),
        )

    threads(1)
    one = run()
    threads(2)
    two = run()
    again = run()
    for a, b, c in zip(one, two, again, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    # A tiny workspace cap splits the depth into one-plane chunks: same forward and dw
    # bits (chunking never changes a sum's order), dx equal up to the halo additions.
    workspace(1)
    small = run()
    assert small[0].tobytes() == one[0].tobytes()
    assert small[2].tobytes() == one[2].tobytes()
    np.testing.assert_allclose(small[1], one[1], rtol=1e-5, atol=1e-5)


def test_engine_routes_and_gradients(algorithm):
    """Through the engine (stride-1 dx via the transposed geometry, strided dx via
    ``depthwise.backward_input``), with the chooser's pick and forced im2col agreeing."""
    for case in (CASES[1], CASES[2], CASES[3]):
        g, x, w, dy = _arrays(case)
        assert engine.choose(g, np.dtype(np.float64)) == depthwise.NAME
        got = (
            engine.conv3d_forward(x, w, g),
            engine.conv3d_backward_input(dy, w, g),
            engine.conv3d_backward_weight(x, dy, g),
        )
        algorithm("im2col")
        want = (
            engine.conv3d_forward(x, w, g),
            engine.conv3d_backward_input(dy, w, g),
            engine.conv3d_backward_weight(x, dy, g),
        )
        algorithm(None)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-11)


def test_empty_batch_through_engine():
    g = conv_geometry((0, 4, 5, 6, 7), (4, 1, 1, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 4)
    x = np.zeros(g.in_shape, np.float32)
    w = np.ones(g.w_shape, np.float32)
    dy = np.zeros(g.out_shape, np.float32)
    assert engine.conv3d_forward(x, w, g).shape == g.out_shape
    assert engine.conv3d_backward_input(dy, w, g).shape == g.in_shape
    dw = engine.conv3d_backward_weight(x, dy, g)
    assert dw.shape == g.w_shape and not dw.any()


def test_chooser_picks_depthwise_for_x3d_layer():
    """The suite's x3d_depthwise layer (N=4, 96 ch, 13x40x40, 3x3x3, pad 1, groups 96)
    and the transposed geometry its stride-1 input gradient runs on."""
    g = conv_geometry(
        (4, 96, 13, 40, 40), (96, 1, 1, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 96
    )
    for dtype in (np.float32, np.float64):
        assert engine.choose(g, np.dtype(dtype)) == depthwise.NAME
        assert engine.choose(engine.transposed_geometry(g), np.dtype(dtype)) == depthwise.NAME


def test_unsupported_without_numba(monkeypatch):
    g = conv_geometry((1, 4, 5, 5, 5), (4, 1, 1, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 4)
    monkeypatch.setattr(_numba_runtime, "_HAVE_NUMBA", False)
    assert not depthwise.supports(g)
    assert engine.choose(g, np.dtype(np.float32)) != depthwise.NAME


def test_many_channels_per_group_not_supported():
    g = conv_geometry((1, 64, 4, 4, 4), (2, 2, 32, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 2)
    assert not depthwise.supports(g)
    assert volconv.config.algorithm is None


# ---- channels-last: NDHWC computed as it lies -------------------------------------------
def _last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_channels_last_float64(case, algorithm):
    """Depthwise layers with multiplier 1 (any stride, padding, dilation, negative pads)
    in NDHWC: forward with bias, input gradient (the adjoint's forward at stride 1, the
    NCDHW kernel between transposes when strided) and weight gradient equal the oracle
    and im2col in float64, through the engine's NDHWC entry points."""
    g, x, w, dy = _arrays(case)
    algorithm(None)
    native = g.Cg == 1 and g.Og == 1
    assert engine.channels_last(g, np.float64) == native
    if not native:
        return
    b = np.random.default_rng(7).standard_normal(g.O)
    xl, dyl = _last(x), _last(dy)
    y = engine.ndhwc_forward(xl, w, g, b)
    ref = conv3d_reference(x, w, g) + b.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(y, _last(ref), rtol=1e-12, atol=1e-12)
    dx = engine.ndhwc_backward_input(dyl, w, g)
    np.testing.assert_allclose(dx, _last(im2col.backward_input(dy, w, g)), rtol=1e-12, atol=1e-12)
    dw = engine.ndhwc_backward_weight(xl, dyl, g)
    np.testing.assert_allclose(dw, im2col.backward_weight(x, dy, g), rtol=1e-12, atol=1e-11)
    np.testing.assert_array_equal(xl, _last(x))  # inputs left alone
    np.testing.assert_array_equal(dyl, _last(dy))


def test_channels_last_float32_and_reproducible(threads):
    """float32 NDHWC within the float32 bound of the NCDHW kernel's error, and bitwise
    the same from call to call (per thread count: the rows are split by task)."""
    case = ("x3d", (2, 24, 6, 9, 10), 24, 1, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1))
    g, x, w, dy = _arrays(case)
    x32, w32, dy32 = (a.astype(np.float32) for a in (x, w, dy))
    threads(2)
    runs = [
        (
            depthwise.forward_channels_last(_last(x32), w32, g),
            depthwise.backward_weight_channels_last(_last(x32), _last(dy32), g),
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert a.tobytes() == b.tobytes()
    y, dw = runs[0]
    y64 = conv3d_reference(x32.astype(np.float64), w32.astype(np.float64), g)
    bound = 4 * EPS32 * np.sqrt(g.taps) * float(np.abs(y64).max())
    assert np.abs(y - _last(y64)).max() <= bound
    dw64 = im2col.backward_weight(x32.astype(np.float64), dy32.astype(np.float64), g)
    K = g.N * int(np.prod(g.spatial_out))
    assert np.abs(dw - dw64).max() <= 4 * EPS32 * np.sqrt(K) * float(np.abs(dw64).max())


def test_x3d_block_in_channels_last_is_never_transposed(algorithm, monkeypatch):
    """An X3D bottleneck in NDHWC (1x1x1 expand, 3x3x3 depthwise, 1x1x1 project),
    forward and backward, without one transpose; the NCDHW block's results."""
    from volconv.autodiff import GradManager
    from volconv.functional import _padding

    algorithm(None)
    F = volconv.functional
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 5, 9, 10)).astype(np.float32)
    w1 = rng.standard_normal((24, 8, 1, 1, 1)).astype(np.float32) * 0.3
    wd = rng.standard_normal((24, 1, 1, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, 24, 1, 1, 1)).astype(np.float32) * 0.3

    def run(xa, fmt):
        params = [volconv.Parameter(a) for a in (xa, w1, wd, w2)]
        gm = GradManager().attach(params)
        with gm:
            h = F.relu(F.conv3d(params[0], params[1], format=fmt))
            h = F.relu(F.conv3d(h, params[2], padding=1, groups=24, format=fmt))
            y = F.conv3d(h, params[3], format=fmt)
            gm.backward((y * y).sum())
        return [y.numpy()] + [p.grad.numpy() for p in params]

    want = run(x, "NCDHW")

    def refuse(*args, **kwargs):
        raise AssertionError("transpose_channels called")

    for module in (engine, _padding):
        monkeypatch.setattr(module, "transpose_channels", refuse)
    got = run(_last(x), "NDHWC")
    expected = (_last(want[0]), _last(want[1]), *want[2:])
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(b).max()))
