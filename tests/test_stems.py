"""First layers and stems: few input channels, large in-plane kernels, in-plane stride 2.

These go through ``volconv.engine.hwunfold`` in both of its GEMM orders -- *tap rows*
(the depth taps stacked into the GEMM's rows, for ``C*kh*kw >= TAP_ROWS_MIN_K``: the
I3D / R3D stems) and *tap columns* (stacked into its reduction: C3D conv1a, U-Net's
first layer) -- each with the numba unfolding and the numpy fallback. Every test checks
which order it exercises, so a threshold change cannot silently turn it into a test of
the other. Forward against the float64 oracle; both gradients through the adjoint
identity ``<dy, conv(x, w)> = <dx, x> = <dw, w>`` plus float64 im2col.
"""

from __future__ import annotations

import numpy as np
import pytest
from tracing import scratch_bytes

import volconv
from volconv import engine
from volconv.engine import _numba_runtime, _slabs, hwunfold, im2col, winograd
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference

# name: (x shape, O, kernel, stride, pads, dilation)
STEMS = {
    # I3D-style 7x7x7 stem, stride (1, 2, 2): tap rows (K2 = 3*49)
    "i3d-like": ((2, 3, 9, 30, 28), 8, (7, 7, 7), (1, 2, 2), (3, 3, 3), (1, 1, 1)),
    # R3D-18 stem 3x7x7, odd sizes (the last stride-2 column reads padding)
    "r3d-like": ((3, 3, 6, 25, 23), 16, (3, 7, 7), (1, 2, 2), (1, 3, 3), (1, 1, 1)),
    # asymmetric pads, depth padding deeper than the kernel: planes that read nothing
    "pads-beyond-kernel": ((1, 3, 4, 19, 21), 5, (3, 7, 5), (1, 2, 2), ((4, 2), (3, 1), (0, 4)), 1),
    # tap rows with an in-plane dilation and stride 3
    "dilated-inplane": ((1, 2, 5, 26, 27), 6, (3, 5, 7), (1, 3, 2), (1, 2, 3), (1, 2, 1)),
    # tap rows on a plane too large to batch items (>= 2048 outputs): slabs on threads
    "large-plane-rows": ((1, 3, 5, 92, 90), 4, (3, 7, 7), (1, 2, 2), (1, 3, 3), (1, 1, 1)),
    # tap rows with 8 channels (C*kh*kw = 72): the weight gradient stacks tap rows too
    "rows-weight": ((2, 8, 5, 9, 8), 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    # tap columns: C3D conv1a / U-Net enc1 style (3x3x3, stride 1, C = 3 / 1)
    "c3d-like": ((2, 3, 6, 17, 18), 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    "unet-like": ((1, 1, 9, 12, 11), 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    # tap columns with depth padding deeper than the kernel: planes that read nothing
    "columns-pads-beyond-kernel": ((1, 3, 4, 10, 9), 5, (3, 3, 3), (1, 1, 1), ((4, 2), 1, 1), 1),
    # tap columns, depth dilation with padding past a tap: a later window reads lower
    # input planes than an earlier one (the ring of planes must not retire them early)
    "dilated-padded-depth": ((1, 2, 7, 9, 8), 4, (3, 3, 3), (1, 1, 1), (3, 1, 1), (2, 1, 1)),
    # tap columns with depth stride and dilation (runs of one tap), in-plane stride 2
    "depth-strided": ((2, 3, 11, 15, 16), 4, (3, 7, 7), (2, 2, 2), (2, 3, 3), (2, 1, 1)),
}
ROWS = {
    "i3d-like", "r3d-like", "pads-beyond-kernel", "dilated-inplane", "large-plane-rows",
    "rows-weight",
}  # fmt: skip


def _geometry(name):
    x_shape, O, kernel, stride, pads, dilation = STEMS[name]
    pads = tuple(p if isinstance(p, tuple) else (p, p) for p in pads)
    dilation = (dilation,) * 3 if isinstance(dilation, int) else dilation
    return conv_geometry(x_shape, (1, O, x_shape[1], *kernel), stride, pads, dilation, 1)


def _data(geom, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    return x, w, dy


@pytest.fixture(params=["numba", "numpy"])
def unfolding(request, monkeypatch):
    """Run with the numba kernels and with the numpy fallback."""
    if request.param == "numba":
        if not _numba_runtime.numba_available():
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(_numba_runtime, "_HAVE_NUMBA", False)
    return request.param


@pytest.mark.parametrize("cap", [64 << 20, 48 << 10], ids=["whole", "depth-slabs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(STEMS))
def test_stem_forward_and_gradients(name, dtype, cap, unfolding, workspace):
    geom = _geometry(name)
    assert hwunfold._tap_rows(geom) == (name in ROWS)
    assert (hwunfold._max_batch(geom) == 1) == (name == "large-plane-rows")
    workspace(cap)
    x, w, dy = _data(geom, dtype)
    y = hwunfold.forward(x, w, geom)
    ref = conv3d_reference(x.astype(np.float64), w.astype(np.float64), geom)
    eps = float(np.finfo(dtype).eps)
    scale = float(np.abs(conv3d_reference(np.abs(x), np.abs(w), geom)).max())
    assert np.abs(y - ref).max() <= 4 * eps * np.sqrt(geom.reduction) * scale
    dx = hwunfold.backward_input(dy, w, geom)
    dw = hwunfold.backward_weight(x, dy, geom)
    assert dx.shape == geom.in_shape and dw.shape == geom.w_shape
    dx_ref = im2col.backward_input(dy.astype(np.float64), w.astype(np.float64), geom)
    dw_ref = im2col.backward_weight(x.astype(np.float64), dy.astype(np.float64), geom)
    tol = 64 * eps
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol * np.abs(dx_ref).max() * 8)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=tol * np.abs(dw_ref).max() * 8)
    inner = float((dy.astype(np.float64) * ref).sum())
    assert abs(float((dx * x).sum(dtype=np.float64)) - inner) <= 1e-3 * abs(inner) + 1e-6
    assert abs(float((dw * w).sum(dtype=np.float64)) - inner) <= 1e-3 * abs(inner) + 1e-6


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "every-plane"])
@pytest.mark.parametrize(
    "name", ["i3d-like", "c3d-like", "unet-like", "depth-strided", "dilated-padded-depth"]
)
def test_gradients_hold_a_ring_of_planes(name, ring, monkeypatch):
    """The tap-columns gradients with their input planes in a ring of the depth taps'
    extent (a run that wraps is two GEMMs) and with a slot for every plane of the slab:
    the reference gradients either way, and the ring holds the taps' extent."""
    geom = _geometry(name)
    monkeypatch.setattr(hwunfold, "RING_MIN_K", 0 if ring else 1 << 30)
    x, w, dy = _data(geom, np.float64)
    dx = hwunfold.backward_input(dy, w, geom)
    dw = hwunfold.backward_weight(x, dy, geom)
    np.testing.assert_allclose(dx, im2col.backward_input(dy, w, geom), rtol=0, atol=1e-10)
    np.testing.assert_allclose(dw, im2col.backward_weight(x, dy, geom), rtol=0, atol=1e-10)
    first = next(hwunfold._PlaneRing.plan(geom, np.float64, None))
    slab, held = first.slab, first.R
    q0, q1 = hwunfold._plane_range(geom, slab.d0, slab.d1)
    extent = (geom.kernel[0] - 1) * geom.dilation[0] + 1
    assert held == (min(q1 - q0, extent) if ring else q1 - q0)
    assert extent < q1 - q0  # (each case has more input planes than the taps reach)


@pytest.mark.parametrize("name", ["i3d-like", "c3d-like"])
def test_depth_slabs_give_the_same_forward(name, workspace):
    """Slabs only regroup the GEMMs (BLAS may then round differently, not more)."""
    geom = _geometry(name)
    x, w, _ = _data(geom, np.float64)
    full = hwunfold.forward(x, w, geom)
    workspace(96 << 10)
    assert len(list(hwunfold._slabs(geom, 8, hwunfold._tap_rows(geom)))) > geom.N
    np.testing.assert_allclose(hwunfold.forward(x, w, geom), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["i3d-like", "r3d-like", "pads-beyond-kernel", "large-plane-rows"])
def test_tap_rows_relay_one_tap_at_a_time_past_the_share(name, workspace, monkeypatch):
    """A ``W''`` over the cap's ROW_WEIGHTS_SHARE is re-laid a depth tap at a time, right
    before that tap's GEMM: the same forward as with ``W''`` whole (C3D conv5a's case)."""
    geom = _geometry(name)
    assert hwunfold._tap_rows(geom)
    x, w, _ = _data(geom, np.float64)
    assert hwunfold._whole_row_weights(geom, 8)
    whole = hwunfold.forward(x, w, geom)
    taps = []
    real = hwunfold._tap_weights
    monkeypatch.setattr(
        hwunfold, "_tap_weights", lambda w, g, a, s: taps.append(a) or real(w, g, a, s)
    )
    monkeypatch.setattr(hwunfold, "ROW_WEIGHTS_SHARE", 10**9)  # W'' never fits
    # each tap copied on the engine's threads, also from inside the threaded slabs
    monkeypatch.setattr(_slabs, "PARALLEL_COPY_BYTES", 0)
    assert not hwunfold._whole_row_weights(geom, 8)
    np.testing.assert_allclose(hwunfold.forward(x, w, geom), whole, rtol=1e-12, atol=1e-12)
    assert set(taps) == set(range(geom.kernel[0]))


def _last(a):
    """NCDHW -> NDHWC."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 4, 1))


@pytest.mark.parametrize("cap", [64 << 20, 48 << 10], ids=["whole", "depth-slabs"])
@pytest.mark.parametrize("name", list(STEMS))
def test_channels_last_equals_ncdhw(name, cap, unfolding, workspace):
    """``channels_last``: the GEMMs write the output, and read ``dy``, in NDHWC as they
    lie (tap rows through a position-major slab, batched items through an NDHWC plane
    buffer). float64, bias included: the NCDHW results within rounding."""
    geom = _geometry(name)
    workspace(cap)
    x, w, dy = _data(geom, np.float64)
    bias = np.random.default_rng(7).standard_normal(geom.O)
    y = hwunfold.forward(_last(x), w, geom, bias=bias, channels_last=True)
    dx = hwunfold.backward_input(_last(dy), w, geom, channels_last=True)
    dw = hwunfold.backward_weight(_last(x), _last(dy), geom, channels_last=True)
    assert y.shape == _last(np.empty(geom.out_shape)).shape and dx.shape == _last(x).shape
    want = (
        _last(hwunfold.forward(x, w, geom, bias=bias)),
        _last(hwunfold.backward_input(dy, w, geom)),
        hwunfold.backward_weight(x, dy, geom),
    )
    for got, ref in zip((y, dx, dw), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * float(np.abs(ref).max()))


@pytest.mark.parametrize("name", list(STEMS))
def test_channels_last_stems_are_native(name, monkeypatch):
    """The engine's NDHWC entry points take the unfolding's channels-last paths wherever
    its NCDHW ones would run (never the transposing fallback), and transpose only the
    input side: ``x`` in, ``dx`` out, never the output or ``dy``."""
    geom = _geometry(name)
    x, w, dy = _data(geom, np.float32)
    want = (
        engine.conv3d_forward(x, w, geom),
        engine.conv3d_backward_input(dy, w, geom),
        engine.conv3d_backward_weight(x, dy, geom),
    )
    native = engine.choose(geom, np.dtype(np.float32)) == hwunfold.NAME
    assert engine.channels_last(geom, np.float32) == native
    shapes = []
    real = hwunfold.transpose_channels
    monkeypatch.setattr(
        hwunfold, "transpose_channels", lambda a, **k: shapes.append(a.shape) or real(a, **k)
    )
    if native:
        monkeypatch.setattr(engine, "_via_ncdhw", None)  # calling it would raise
        got = (
            engine.ndhwc_forward(_last(x), w, geom),
            engine.ndhwc_backward_input(_last(dy), w, geom),
            engine.ndhwc_backward_weight(_last(x), _last(dy), geom),
        )
        assert set(shapes) == {_last(x).shape, geom.in_shape}  # x in, dx out
        expected = (_last(want[0]), _last(want[1]), want[2])
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=4e-6 * float(np.abs(b).max()))
    else:  # (a depth stride: im2col's forward)
        assert engine._input_gradient_route(geom, np.float32) == (hwunfold.NAME, True)
        dx = engine.ndhwc_backward_input(_last(dy), w, geom)  # own threads, channels-last
        np.testing.assert_allclose(dx, _last(want[1]), rtol=0, atol=4e-6 * np.abs(dx).max())


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize(
    "name", ["c3d-like", "unet-like", "depth-strided", "columns-pads-beyond-kernel"]
)
def test_threaded_tap_columns_in_small_slabs(name, layout, monkeypatch):
    """Slabs of the threaded tap-columns forward and weight gradient one output plane
    deep (the smallest size that holds one; the weight gradient then fills all its
    partial sums), bias included, against the plane-by-plane paths; in either layout."""
    if not _numba_runtime.numba_available():
        pytest.skip("numba is not installed")
    geom = _geometry(name)
    x, w, _ = _data(geom, np.float64)
    bias = np.random.default_rng(3).standard_normal(geom.O)
    monkeypatch.setattr(hwunfold, "THREADED_MIN_PLANE_FLOPS", 0)  # these planes are small
    size = 1
    monkeypatch.setattr(hwunfold, "THREADED_SLAB_BYTES", size)
    while hwunfold._threaded_planes(geom, 8) == 0:
        size *= 2
        monkeypatch.setattr(hwunfold, "THREADED_SLAB_BYTES", size)
    assert 0 < hwunfold._threaded_planes(geom, 8) < geom.spatial_out[0]
    assert hwunfold.threaded_columns(geom, 8)
    cl = layout == "NDHWC"
    lay = _last if cl else (lambda a: a)
    y = hwunfold.forward(lay(x), w, geom, bias=bias, channels_last=cl)
    plain = np.empty_like(y)
    hwunfold._forward_tap_columns(x, w, geom, plain, bias.reshape(-1, 1), cl)
    np.testing.assert_allclose(y, plain, rtol=1e-12, atol=1e-12)
    ref = conv3d_reference(x, w, geom) + bias.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(y, lay(ref), rtol=1e-10, atol=1e-10)
    dy = np.random.default_rng(4).standard_normal(geom.out_shape)
    slabs = geom.N * -(-geom.spatial_out[0] // hwunfold._threaded_planes(geom, 8))
    assert slabs >= hwunfold.WEIGHT_PARTIALS
    dw = hwunfold.backward_weight(lay(x), lay(dy), geom, channels_last=cl)
    plain = hwunfold._backward_weight_tap_columns(x, dy, geom)  # (O, kd*K2)
    kd, kh, kw = geom.kernel
    plain = plain.reshape(geom.O, kd, geom.C, kh, kw).transpose(0, 2, 1, 3, 4)
    np.testing.assert_allclose(dw.reshape(plain.shape), plain, rtol=1e-12, atol=1e-11)
    dx = hwunfold.backward_input(lay(dy), w, geom, channels_last=cl)  # (own_threads here)
    dx_ref = im2col.backward_input(dy, w, geom)
    np.testing.assert_allclose(dx, lay(dx_ref), rtol=1e-10, atol=1e-10)


def test_threaded_tap_columns_threshold():
    """Small planes keep the plane-by-plane path; a C3D conv1a-sized plane is threaded."""
    if not _numba_runtime.numba_available():
        pytest.skip("numba is not installed")
    small = _geometry("c3d-like")
    assert not hwunfold.threaded_columns(small)
    conv1a = conv_geometry(
        (1, 3, 4, 112, 112), (1, 64, 3, 3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 1
    )
    assert hwunfold.threaded_columns(conv1a)


@pytest.mark.parametrize(
    "name", ["i3d-like", "r3d-like", "c3d-like", "depth-strided", "large-plane-rows"]
)
def test_results_do_not_depend_on_numba_threads(name, monkeypatch):
    """Kernel steps split planes into bands by thread count; no element's sum may move."""
    if not _numba_runtime.numba_available():
        pytest.skip("numba is not installed")
    geom = _geometry(name)
    x, w, dy = _data(geom, np.float32)
    runs = []
    for nw in (1, 2, 3):
        monkeypatch.setattr(hwunfold, "_INTERLEAVED_THREADS", nw)
        monkeypatch.setattr(hwunfold, "_threads", lambda interleaved, nw=nw: nw)
        runs.append(
            (
                hwunfold.forward(x, w, geom),
                hwunfold.backward_input(dy, w, geom),
                hwunfold.backward_weight(x, dy, geom),
            )
        )
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["i3d-like", "r3d-like", "c3d-like", "unet-like"])
def test_chooser_sends_stems_to_hwunfold(name):
    geom = _geometry(name)
    assert engine.choose(geom, np.dtype(np.float32)) == hwunfold.NAME


@pytest.mark.parametrize(
    "name,cap",
    # caps below one item's unfolding, above the smallest slab (kd planes of it)
    [("i3d-like", 1 << 20), ("c3d-like", 160 << 10)],
)
def test_workspace_cap_holds(name, cap, workspace, unfolding):
    geom = _geometry(name)
    x, w, dy = _data(geom, np.float32)
    workspace(cap)
    hwunfold.forward(x, w, geom)  # warm-up: JIT compilation allocates too
    limit = cap + (64 << 10)
    assert scratch_bytes(lambda: hwunfold.forward(x, w, geom), dy.nbytes) <= limit
    assert scratch_bytes(lambda: hwunfold.backward_input(dy, w, geom), x.nbytes) <= limit
    assert scratch_bytes(lambda: hwunfold.backward_weight(x, dy, geom), w.nbytes) <= limit


def test_stem_through_the_public_api_matches_im2col():
    """End to end (functional API, chooser) for a stem, forward and both gradients."""
    geom = _geometry("r3d-like")
    x, w, dy = _data(geom, np.float32, seed=3)
    y = engine.conv3d_forward(x, w, geom)
    saved = volconv.config.algorithm
    try:
        volconv.config.algorithm = im2col.NAME
        y_ref = engine.conv3d_forward(x, w, geom)
        dx_ref = engine.conv3d_backward_input(dy, w, geom)
        dw_ref = engine.conv3d_backward_weight(x, dy, geom)
    finally:
        volconv.config.algorithm = saved
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(engine.conv3d_backward_input(dy, w, geom), dx_ref, atol=1e-3)
    np.testing.assert_allclose(engine.conv3d_backward_weight(x, dy, geom), dw_ref, atol=1e-2)


def test_stem_then_winograd_chain_in_channels_last(monkeypatch):
    """A video stem in NDHWC (3 channels, 3x7x7 at stride (1, 2, 2): the unfolding), ReLU,
    then a 3x3x3 Winograd layer, forward and backward through the functional API with a
    bias on each: the NCDHW chain's results, and the only arrays ever transposed are the
    stem's input (for its forward and its weight gradient; the data needs no gradient)."""
    from volconv.autodiff import GradManager
    from volconv.functional import _padding

    F = volconv.functional
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 3, 6, 30, 28)).astype(np.float32)
    w1 = rng.standard_normal((16, 3, 3, 7, 7)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((16, 16, 3, 3, 3)).astype(np.float32) * 0.1
    b1, b2 = (rng.standard_normal((1, 16, 1, 1, 1)).astype(np.float32) for _ in range(2))

    def run(xa, fmt):
        params = [volconv.Parameter(a) for a in (w1, b1, w2, b2)]
        gm = GradManager().attach(params)
        with gm:
            h = F.relu(F.conv3d(volconv.Tensor(xa), params[0], params[1], (1, 2, 2), (1, 3, 3),
                                format=fmt))  # fmt: skip
            y = F.conv3d(h, params[2], params[3], padding=1, format=fmt)
            gm.backward((y * y).sum())
        return [y.numpy()] + [p.grad.numpy() for p in params]

    want = run(x, "NCDHW")
    shapes = []
    one = (1, 1, 1)
    stem = conv_geometry(x.shape, (1, 16, 3, 3, 7, 7), (1, 2, 2), ((1, 1), (3, 3), (3, 3)), one, 1)
    second = conv_geometry(stem.out_shape, (1, 16, 16, 3, 3, 3), one, ((1, 1),) * 3, one, 1)
    assert engine.channels_last(stem) and engine.choose(stem, np.dtype(np.float32)) == "hwunfold"
    assert (
        engine.channels_last(second) and engine.choose(second, np.dtype(np.float32)) == "winograd"
    )
    for module in (engine, _padding, hwunfold, winograd):
        real = module.transpose_channels
        monkeypatch.setattr(
            module,
            "transpose_channels",
            lambda a, *args, real=real, **kw: shapes.append(a.shape) or real(a, *args, **kw),
        )
    got = run(_last(x), "NDHWC")
    assert shapes == [_last(x).shape] * 2, shapes  # the stem's forward and weight gradient
    for a, b in zip(got, [_last(want[0]), *want[1:]], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(b).max()))
