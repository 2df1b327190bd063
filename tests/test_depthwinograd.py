"""Winograd along depth over the in-plane unfolding (``engine.depthwinograd``): the stems.

The transforms are checked as the Toom-Cook identity they must satisfy, the forward
against the float64 oracle on a table of depth geometries (kernel depths 2-7 and their
chunk splits, partial tiles, depth padding past the kernel, in-plane stride, dilation
and asymmetric padding, bias, both layouts), and the engine's routing: the chooser
takes it for the suite's stems only, their gradients stay the unfolding's, and
non-finite data goes to the GEMM family.
"""

from __future__ import annotations

import numpy as np
import pytest

import volconv
from volconv import engine
from volconv.bench import _suite
from volconv.engine import depthwinograd, hwunfold, im2col
from volconv.engine._args import conv_geometry
from volconv.engine.reference import conv3d_reference


@pytest.fixture(autouse=True)
def _needs_numba():
    if not depthwinograd.numba_available():
        pytest.skip("numba is not installed")


@pytest.mark.parametrize("r", sorted(depthwinograd.POINTS))
def test_transforms_satisfy_the_toom_cook_identity(r):
    """``AT ((G g) * (BT d))`` is the correlation of ``d`` with ``g`` for every ``g``,
    ``d``; ``AT`` and ``BT`` lie on a binary grid (exact in float32)."""
    AT, G, BT = depthwinograd.transforms(r)
    m, alpha = AT.shape
    assert (m, alpha) == (depthwinograd.TILE, m + r - 1) and G.shape == (alpha, r)
    rng = np.random.default_rng(r)
    for _ in range(5):
        d, g = rng.standard_normal(alpha), rng.standard_normal(r)
        np.testing.assert_allclose(
            AT @ ((G @ g) * (BT @ d)), np.correlate(d, g, "valid"), rtol=0, atol=1e-12
        )
    for a in (AT, BT):
        assert np.array_equal(a * 4096, np.round(a * 4096))
        assert np.array_equal(a.astype(np.float32), a)
    assert not AT.flags.writeable  # (cached: callers cannot change them)


@pytest.mark.parametrize("kd", range(2, 13))
def test_chunks_cover_the_kernel_without_single_taps(kd):
    sizes = depthwinograd.chunks(kd)
    assert sum(sizes) == kd and all(s in depthwinograd.POINTS for s in sizes)


def test_chunks_reject_a_one_tap_depth():
    with pytest.raises(ValueError, match="kernel depth >= 2, got 1"):
        depthwinograd.chunks(1)


# name: (x shape, O, kernel, stride, pads, dilation)
GEOMETRIES = {
    # I3D-like: 7 taps as 4 + 3, in-plane stride 2, 9 output planes (a partial tile)
    "i3d-like": ((2, 3, 9, 30, 28), 8, (7, 7, 7), (1, 2, 2), (3, 3, 3), (1, 1, 1)),
    # R3D-like: F(4, 3), odd plane sizes
    "r3d-like": ((3, 3, 6, 25, 23), 16, (3, 7, 7), (1, 2, 2), (1, 3, 3), (1, 1, 1)),
    # two depth taps (F(4, 2)), no depth padding
    "two-taps": ((1, 2, 7, 12, 13), 5, (2, 3, 3), (1, 1, 2), (0, 1, 0), (1, 1, 1)),
    # five taps as 3 + 2, depth padding (3, 1)
    "five-taps": ((1, 2, 11, 12, 13), 5, (5, 3, 3), (1, 1, 1), ((3, 1), 1, 0), (1, 1, 1)),
    # four taps (one F(4, 4)), in-plane dilation and stride 3
    "four-taps-dilated": ((2, 2, 8, 26, 27), 6, (4, 5, 7), (1, 3, 2), (2, 2, 3), (1, 2, 1)),
    # depth padding past the kernel: whole points and tiles read only padding
    "pads-beyond-kernel": ((1, 3, 4, 19, 21), 5, (3, 7, 5), (1, 2, 2), ((5, 4), (3, 1), (0, 4)), 1),
    # a depth-only kernel: the in-plane unfolding is the plane itself (not unfolded)
    "depth-only": ((2, 6, 10, 7, 9), 4, (3, 1, 1), (1, 1, 1), ((1, 2), 0, 0), (1, 1, 1)),
    # eight taps as 4 + 4, one output plane
    "one-plane": ((1, 1, 8, 9, 10), 3, (8, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1)),
}


def _geometry(name):
    x_shape, O, kernel, stride, pads, dilation = GEOMETRIES[name]
    pads = tuple(p if isinstance(p, tuple) else (p, p) for p in pads)
    dilation = (dilation,) * 3 if isinstance(dilation, int) else dilation
    return conv_geometry(x_shape, (1, O, x_shape[1], *kernel), stride, pads, dilation, 1)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_forward_matches_the_reference(name, dtype, bias):
    geom = _geometry(name)
    assert depthwinograd.supports(geom)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(geom.in_shape)
    w = rng.standard_normal(geom.w_shape)
    b = rng.standard_normal(geom.O) if bias else None
    ref = conv3d_reference(x, w, geom)
    if bias:
        ref = ref + b.reshape(1, -1, 1, 1, 1)
    y = depthwinograd.forward(x.astype(dtype), w.astype(dtype), geom, bias=b)
    assert y.dtype == dtype and y.shape == geom.out_shape
    eps = float(np.finfo(dtype).eps)
    scale = float(np.abs(conv3d_reference(np.abs(x), np.abs(w), geom)).max())
    assert np.abs(y - ref).max() <= 4 * eps * np.sqrt(geom.reduction) * scale
    # NDHWC: the same arithmetic in the same order, written as it lies
    x_cl = np.ascontiguousarray(x.astype(dtype).transpose(0, 2, 3, 4, 1))
    y_cl = depthwinograd.forward(x_cl, w.astype(dtype), geom, bias=b, channels_last=True)
    assert y_cl.shape == (geom.N, *geom.spatial_out, geom.O) and y_cl.flags.c_contiguous
    np.testing.assert_array_equal(y_cl, y.transpose(0, 2, 3, 4, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_input_gradient_matches_the_reference(name, dtype):
    """``dx`` against float64 col2im, in NCDHW and NDHWC (its GEMMs take ``dy``
    transposed there: another rounding, held to the same bound)."""
    geom = _geometry(name)
    rng = np.random.default_rng(11)
    w = rng.standard_normal(geom.w_shape)
    dy = rng.standard_normal(geom.out_shape)
    ref = im2col.backward_input(dy, w, geom)
    dx = depthwinograd.backward_input(dy.astype(dtype), w.astype(dtype), geom)
    assert dx.dtype == dtype and dx.shape == geom.in_shape
    eps = float(np.finfo(dtype).eps)
    # |dy| (*)^T |w|: the magnitudes each dx sums
    scale = float(np.abs(im2col.backward_input(np.abs(dy), np.abs(w), geom)).max())
    bound = 4 * eps * np.sqrt(geom.O * geom.taps) * scale
    assert np.abs(dx - ref).max() <= bound
    dy_cl = np.ascontiguousarray(dy.astype(dtype).transpose(0, 2, 3, 4, 1))
    dx_cl = depthwinograd.backward_input(dy_cl, w.astype(dtype), geom, channels_last=True)
    assert dx_cl.shape == (geom.N, *geom.spatial_in, geom.C) and dx_cl.flags.c_contiguous
    assert np.abs(dx_cl.transpose(0, 4, 1, 2, 3) - ref).max() <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_weight_gradient_matches_the_reference(name, dtype):
    """``dw`` against float64 im2col, from NCDHW and from NDHWC (its GEMMs take ``dy``
    transposed there: another rounding, held to the same bound)."""
    geom = _geometry(name)
    rng = np.random.default_rng(13)
    x = rng.standard_normal(geom.in_shape)
    dy = rng.standard_normal(geom.out_shape)
    ref = im2col.backward_weight(x, dy, geom)
    dw = depthwinograd.backward_weight(x.astype(dtype), dy.astype(dtype), geom)
    assert dw.dtype == dtype and dw.shape == geom.w_shape
    eps = float(np.finfo(dtype).eps)
    scale = float(np.abs(im2col.backward_weight(np.abs(x), np.abs(dy), geom)).max())
    bound = 4 * eps * np.sqrt(geom.N * int(np.prod(geom.spatial_out))) * scale
    assert np.abs(dw - ref).max() <= bound
    last = [np.ascontiguousarray(a.astype(dtype).transpose(0, 2, 3, 4, 1)) for a in (x, dy)]
    dw_cl = depthwinograd.backward_weight(*last, geom, channels_last=True)
    assert dw_cl.shape == geom.w_shape
    assert np.abs(dw_cl - ref).max() <= bound


@pytest.mark.parametrize("partials", [1, 2])
def test_weight_gradient_groups_accumulate_their_tiles(partials, monkeypatch):
    """Fewer partial sums than tiles: each group accumulates several tiles' products
    (the suite's stems have 8-16 tiles for 8 groups; the table's geometries one each)."""
    geom = _geometry("i3d-like")
    monkeypatch.setattr(depthwinograd, "WEIGHT_PARTIALS", partials)
    plan = depthwinograd._plan(geom, 8, kind="weight")
    assert plan.partials == partials and plan.tiles > partials
    rng = np.random.default_rng(17)
    x = rng.standard_normal(geom.in_shape)
    dy = rng.standard_normal(geom.out_shape)
    ref = im2col.backward_weight(x, dy, geom)
    np.testing.assert_allclose(depthwinograd.backward_weight(x, dy, geom), ref, rtol=0, atol=1e-10)


def test_non_finite_ndhwc_data_goes_to_the_unfolding():
    """The NDHWC forward and input gradient check for Inf/NaN too (the engine's
    channels-last entry points)."""
    geom = _stem(8)
    assert engine._native_layout(geom, np.dtype(np.float32)) == depthwinograd.NAME
    rng = np.random.default_rng(6)
    w = rng.standard_normal(geom.w_shape).astype(np.float32)
    x = rng.standard_normal((geom.N, *geom.spatial_in, geom.C)).astype(np.float32)
    dy = rng.standard_normal((geom.N, *geom.spatial_out, geom.O)).astype(np.float32)
    x[0, 3, 10, 10, 1] = dy[0, 2, 5, 5, 3] = np.inf
    y = engine.ndhwc_forward(x, w, geom)
    np.testing.assert_array_equal(y, hwunfold.forward(x, w[0], geom, channels_last=True))
    dx = engine.ndhwc_backward_input(dy, w, geom)
    np.testing.assert_array_equal(dx, hwunfold.backward_input(dy, w[0], geom, channels_last=True))
    assert np.isinf(y).any() and np.isinf(dx).any()


def test_non_finite_weight_gradient_is_recomputed_exactly():
    """An Inf in ``x`` makes the transform's ``dw`` non-finite; it is computed again by
    the unfolding, whose IEEE propagation is exact."""
    geom = _stem(8)
    assert engine._weight_gradient_algorithm(geom, np.dtype(np.float32)) == depthwinograd.NAME
    rng = np.random.default_rng(3)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    x[0, 2, 4, 30, 30] = np.inf
    dw = engine.conv3d_backward_weight(x, dy, geom)
    np.testing.assert_array_equal(dw, hwunfold.backward_weight(x, dy, geom).reshape(dw.shape))


def test_non_finite_gradient_goes_to_the_unfolding():
    """An Inf in ``dy`` reaches ``dx`` as direct col2im gives it (the transform would
    spread NaN over its tile)."""
    geom = _stem(8)
    assert engine._input_gradient_route(geom, np.dtype(np.float32))[0] == depthwinograd.NAME
    rng = np.random.default_rng(2)
    w = rng.standard_normal(geom.w_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    dy[0, 3, 2, 5, 5] = np.inf
    dx = engine.conv3d_backward_input(dy, w, geom)
    np.testing.assert_array_equal(dx, hwunfold.backward_input(dy, w[0], geom))
    assert np.isinf(dx).any()


def test_points_in_the_depth_padding_are_skipped(monkeypatch):
    """A tile whose chunk reads only depth padding takes no GEMM for those points (and
    the planes still get their bias)."""
    geom = _geometry("pads-beyond-kernel")
    calls = []
    real = hwunfold._gemm_out
    monkeypatch.setattr(hwunfold, "_gemm_out", lambda *a: calls.append(a) or real(*a))
    x = np.random.default_rng(0).standard_normal(geom.in_shape)
    w = np.random.default_rng(1).standard_normal(geom.w_shape)
    b = np.arange(geom.O, dtype=np.float64)
    y = depthwinograd.forward(x, w, geom, bias=b)
    tiles = -(-geom.spatial_out[0] // depthwinograd.TILE) * geom.N
    assert len(calls) < tiles * 5  # F(4, 3): 6 points a tile, some never taken
    ref = conv3d_reference(x, w, geom) + b.reshape(1, -1, 1, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-10)


def _suite_geometry(name):
    layer = next(item for item in _suite.load_suite() if item["name"] == name)
    x_shape = (layer["N"], layer["Cin"], layer["D"], layer["H"], layer["W"])
    w_shape = (1, layer["Cout"], layer["Cin"], *layer["kernel"])
    pads = tuple((p, p) for p in layer["padding"])
    return conv_geometry(x_shape, w_shape, tuple(layer["stride"]), pads, (1, 1, 1), 1)


@pytest.mark.parametrize(
    "name,dx",
    [
        ("i3d_stem_7x7x7", "depthwinograd"),
        ("r3d18_stem_3x7x7", "depthwinograd"),
        ("c3d_conv1a", "hwunfold"),
    ],
)
def test_the_chooser_takes_it_for_stems_and_first_layers(name, dx):  # dx: both gradients
    """Forward, and both gradients where the in-plane reduction is long (the stems; C3D
    conv1a's 27 keeps the unfolding's gradients)."""
    geom = _suite_geometry(name)
    f32 = np.dtype(np.float32)
    assert engine.choose(geom, f32) == depthwinograd.NAME
    assert depthwinograd.product_share(geom) <= 0.5
    assert geom.C * geom.kernel[1] * geom.kernel[2] >= depthwinograd.MIN_PLANE_REDUCTION
    assert engine._input_gradient_route(geom, f32) == (dx, False)
    assert engine._weight_gradient_algorithm(geom, f32) == dx
    # NDHWC is native: every pass reads and writes it as it lies
    assert engine._native_layout(geom, f32) == depthwinograd.NAME


def test_depth_only_kernels_keep_pointwise_gradients_and_ndhwc():
    """R(2+1)D's temporal layer: the depth transform's forward (its 'unfolding' is the
    plane itself), ``pointwise``'s weight gradient, the input gradient the adjoint's
    forward (the depth transform again: 144 outputs), and NDHWC stays ``pointwise``'s
    GEMMs on the arrays as they lie."""
    geom = _suite_geometry("r2plus1d_temporal")
    f32 = np.dtype(np.float32)
    assert depthwinograd._identity_unfolding(geom)
    assert engine.choose(geom, f32) == depthwinograd.NAME
    assert engine._weight_gradient_algorithm(geom, f32) == "pointwise"
    assert engine._input_gradient_route(geom, f32)[0] == engine._ADJOINT
    assert engine.choose(engine.transposed_geometry(geom), f32) == depthwinograd.NAME
    assert engine._native_layout(geom, f32) == "pointwise"


@pytest.mark.parametrize(
    "name",
    [
        "unet3d_enc1", "c3d_conv3a", "c3d_conv5a", "strided_down_s2",
        "vnet_5x5x5", "r2plus1d_spatial", "pointwise_1x1x1",
    ],
)  # fmt: skip
def test_the_chooser_leaves_other_layers_alone(name):
    """A short in-plane reduction (the U-Net's 1-channel first layer: 9), Winograd's and
    FFT's layers, depth-strided ones and 1-tap depths keep their algorithms."""
    assert engine.choose(_suite_geometry(name), np.dtype(np.float32)) != depthwinograd.NAME


def test_few_output_channels_keep_the_unfolding():
    """The GEMMs' rows are the output channels: the adjoint of a stem (3 outputs) is not
    taken."""
    geom = conv_geometry(
        (1, 16, 8, 48, 48), (1, 3, 16, 3, 7, 7), (1, 1, 1), ((1, 1), (3, 3), (3, 3)), (1, 1, 1), 1
    )
    assert depthwinograd.supports(geom)
    assert not depthwinograd.prefer(geom, np.float32)


def _stem(depth):
    """A small R3D-like stem whose output planes (48 x 48) are too large to batch items."""
    pads = ((1, 1), (3, 3), (3, 3))
    return conv_geometry((1, 3, depth, 96, 96), (1, 16, 3, 3, 7, 7), (1, 2, 2), pads, (1, 1, 1), 1)


def test_non_finite_input_goes_to_the_gemm_family():
    """A transform would spread an Inf over its tile (NaN where direct convolution gives
    Inf); the engine computes such data with the unfolding, IEEE-exact."""
    geom = _stem(8)
    assert engine.choose(geom, np.dtype(np.float32)) == depthwinograd.NAME
    rng = np.random.default_rng(0)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    w = rng.standard_normal(geom.w_shape).astype(np.float32)
    x[0, 1, 3, 10, 10] = np.inf
    y = engine.conv3d_forward(x, w, geom)
    np.testing.assert_array_equal(y, hwunfold.forward(x, w[0], geom))
    assert np.isinf(y).any()


def test_workspace_fits_the_cap_with_fewer_threads(workspace):
    """Each thread holds one point's planes, one unfolding and a chunk's products; a cap
    that holds one thread's runs one, and one that holds none leaves the layer to the
    unfolding."""
    geom = _geometry("i3d-like")
    whole = depthwinograd._plan(geom, 4, 2)
    assert whole.threads == 2 and whole.workspace == depthwinograd.workspace_bytes(geom, 4)
    one = whole.workspace - (whole.workspace - depthwinograd._plan(geom, 4, 1).workspace) // 2
    workspace(one)
    assert depthwinograd._plan(geom, 4, 2).threads == 1
    workspace(1 << 10)
    assert depthwinograd._plan(geom, 4, 2) is None and not depthwinograd.supports(geom)
    with pytest.raises(ValueError, match="cannot hold one thread's scratch"):
        depthwinograd.workspace_bytes(geom, 4)


def test_module_forward_takes_it_end_to_end():
    """Through Conv3d: the stem's forward is the depth transform's, its gradients the
    unfolding's, and they agree with float64."""
    m = volconv.module.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
    geom = _stem(8)
    x = np.random.default_rng(3).standard_normal(geom.in_shape).astype(np.float32)
    assert engine.choose(geom, np.dtype(np.float32)) == depthwinograd.NAME
    y = m(volconv.tensor(x)).numpy()
    w64 = m.weight.numpy().astype(np.float64)
    ref = conv3d_reference(x.astype(np.float64), w64.reshape(geom.w_shape), geom)
    ref += m.bias.numpy().astype(np.float64).reshape(1, -1, 1, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # the input gradient through the tape: the depth transform's, against float64 col2im
    assert engine._input_gradient_route(geom, np.dtype(np.float32))[0] == depthwinograd.NAME
    xt = volconv.tensor(x)
    gm = volconv.autodiff.GradManager().attach([xt, m.weight])
    dy = np.random.default_rng(4).standard_normal(geom.out_shape).astype(np.float32)
    with gm:
        gm.backward(m(xt), volconv.tensor(dy))
    dx_ref = im2col.backward_input(dy.astype(np.float64), w64.reshape(geom.w_shape), geom)
    np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=0, atol=1e-4 * np.abs(dx_ref).max())
    dw_ref = im2col.backward_weight(x.astype(np.float64), dy.astype(np.float64), geom)
    dw = m.weight.grad.numpy().reshape(dw_ref.shape)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=1e-4 * np.abs(dw_ref).max())


def test_threads_do_not_change_a_bit():
    """A depth tile is one task with its arithmetic fixed by the geometry: one thread or
    two give the same bits."""
    import numba

    geom = _geometry("i3d-like")
    rng = np.random.default_rng(5)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    w = rng.standard_normal(geom.w_shape).astype(np.float32)
    dy = rng.standard_normal(geom.out_shape).astype(np.float32)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert depthwinograd._plan(geom, 4).threads == 1
        passes = (
            lambda: depthwinograd.forward(x, w, geom),
            lambda: depthwinograd.backward_input(dy, w, geom),
            lambda: depthwinograd.backward_weight(x, dy, geom),
        )
        one = [p() for p in passes]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = [p() for p in passes]
    finally:
        numba.set_num_threads(saved)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_scratch_memory_is_what_the_plan_counts():
    """Traced scratch of a forward with many input channels (the transformed weight and
    its float64 arithmetic are then the large part) stays within the plan's workspace."""
    from tracing import scratch_bytes

    pads = ((1, 1), (1, 1), (1, 1))
    geom = conv_geometry((1, 64, 6, 48, 48), (1, 32, 64, 3, 3, 3), (1, 2, 2), pads, (1, 1, 1), 1)
    assert depthwinograd.supports(geom)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(geom.in_shape, dtype=np.float32)
    w = rng.standard_normal(geom.w_shape, dtype=np.float32)
    depthwinograd.forward(x, w, geom)  # (compilation allocates too)
    y_bytes = int(np.prod(geom.out_shape)) * 4
    used = scratch_bytes(lambda: depthwinograd.forward(x, w, geom), y_bytes)
    assert used <= depthwinograd.workspace_bytes(geom, 4) + (64 << 10)
    dy = rng.standard_normal(geom.out_shape, dtype=np.float32)
    depthwinograd.backward_input(dy, w, geom)
    used = scratch_bytes(lambda: depthwinograd.backward_input(dy, w, geom), x.nbytes)
    assert used <= depthwinograd._plan(geom, 4, kind="input").workspace + (64 << 10)
    depthwinograd.backward_weight(x, dy, geom)
    used = scratch_bytes(lambda: depthwinograd.backward_weight(x, dy, geom), w.nbytes)
    assert used <= depthwinograd._plan(geom, 4, kind="weight").workspace + (64 << 10)
