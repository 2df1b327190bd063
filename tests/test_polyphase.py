"""The ``polyphase`` input gradient of strided dense layers, against float64 im2col (itself
checked against finite differences in test_conv_backward.py), with and without numba,
in one or many slabs, and on whatever thread count; and the chooser's use of it."""

from __future__ import annotations

import numpy as np
import pytest

from volconv import engine
from volconv.engine import _numba_runtime, im2col, polyphase

# name: x shape, weight shape (G, Og, C, k...), stride, pads, dilation
CASES = {
    "k3-s2-p1": ((2, 3, 7, 8, 9), (1, 4, 3, 3, 3, 3), (2, 2, 2), ((1, 1),) * 3, (1, 1, 1)),
    "k2-s3-empty-phases": (
        (1, 2, 8, 7, 6),
        (1, 2, 2, 2, 2, 2),
        (3, 3, 3),
        ((0, 0),) * 3,
        (1, 1, 1),
    ),
    "k1-s2-shortcut": ((2, 5, 6, 7, 5), (1, 3, 5, 1, 1, 1), (2, 2, 2), ((0, 0),) * 3, (1, 1, 1)),
    "k7-s2-p3": ((1, 2, 9, 10, 11), (1, 3, 2, 7, 7, 7), (2, 2, 2), ((3, 3),) * 3, (1, 1, 1)),
    "mixed-strides-dilated": (
        (2, 3, 10, 9, 11),
        (1, 4, 3, 3, 2, 3),
        (2, 3, 1),
        ((0, 2), (1, 1), (2, 0)),
        (2, 1, 2),
    ),
    "in-plane-stride-only": (
        (1, 4, 5, 9, 8),
        (1, 3, 4, 3, 3, 3),
        (1, 2, 2),
        ((1, 1),) * 3,
        (1, 1, 1),
    ),
    "large-padding": (
        (1, 2, 5, 6, 5),
        (1, 3, 2, 3, 3, 3),
        (2, 2, 3),
        ((4, 3), (3, 4), (5, 2)),
        (1, 1, 1),
    ),
    "negative-padding": (
        (1, 3, 9, 8, 9),
        (1, 2, 3, 3, 3, 3),
        (2, 2, 2),
        ((-1, 1), (0, -2), (1, 0)),
        (1, 1, 1),
    ),
    "stride-beyond-kernel": (
        (2, 2, 9, 9, 9),
        (1, 3, 2, 2, 2, 2),
        (4, 3, 5),
        ((1, 1),) * 3,
        (1, 1, 1),
    ),
    "one-output-plane": (
        (1, 16, 3, 6, 6),
        (1, 8, 16, 3, 3, 3),
        (2, 2, 2),
        ((0, 0),) * 3,
        (1, 1, 1),
    ),
}


def _geometry(name):
    x_shape, w_shape, stride, pads, dilation = CASES[name]
    return engine.conv_geometry(x_shape, w_shape, stride, pads, dilation, w_shape[0])


def _arrays(geom, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(geom.out_shape), rng.standard_normal(geom.w_shape)


@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Run with the numba copy kernels, or with numpy's slicing (no numba)."""
    if request.param == "numba":
        if not _numba_runtime.numba_available():
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(polyphase, "numba_available", lambda: False)
    return request.param


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_im2col(name, dtype, kernels):
    geom = _geometry(name)
    assert polyphase.supports(geom)
    dy, w = _arrays(geom, len(name))
    ref = im2col.backward_input(dy, w, geom)
    got = polyphase.backward_input(dy.astype(dtype), w.astype(dtype), geom)
    assert got.dtype == dtype and got.shape == geom.in_shape
    eps = float(np.finfo(dtype).eps)
    bound = 4 * eps * np.sqrt(geom.O * geom.taps) * max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() <= bound


@pytest.mark.parametrize("name", ["k3-s2-p1", "mixed-strides-dilated", "negative-padding"])
def test_slabs_and_threads(name, kernels, monkeypatch):
    """One thread gives the bits of two (each element has one GEMM order, set by the
    geometry and the cap); one phase plane per slab (the last slab of an item shorter)
    agrees to rounding (BLAS may order a narrower GEMM's sums differently)."""
    geom = _geometry(name)
    dy, w = (a.astype(np.float32) for a in _arrays(geom, 7))
    default = polyphase.backward_input(dy, w, geom)
    monkeypatch.setattr(polyphase, "engine_threads", lambda: 1)
    np.testing.assert_array_equal(polyphase.backward_input(dy, w, geom), default)
    monkeypatch.setattr(polyphase, "SLAB_TARGET_BYTES", 1)
    assert polyphase._planes_per_slab(geom, [polyphase._axis(geom, a) for a in range(3)], 4) == 1
    np.testing.assert_allclose(polyphase.backward_input(dy, w, geom), default, rtol=0, atol=1e-5)


def test_inputs_are_not_mutated():
    geom = _geometry("k3-s2-p1")
    dy, w = _arrays(geom, 3)
    dy_copy, w_copy = dy.copy(), w.copy()
    polyphase.backward_input(dy, w, geom)
    np.testing.assert_array_equal(dy, dy_copy)
    np.testing.assert_array_equal(w, w_copy)


def test_chooser_takes_it_for_strided_dense_layers_with_channels(monkeypatch):
    calls = []
    real = polyphase.backward_input

    def spy(dy, w, geom):
        calls.append(geom)
        return real(dy, w, geom)

    monkeypatch.setattr(polyphase, "backward_input", spy)
    pads, one = ((1, 1),) * 3, (1, 1, 1)
    s2 = (2, 2, 2)
    big = (1, 16, 32, 32, 32)  # 113 MFLOP an item: enough work
    taken = engine.conv_geometry(big, (1, 32, 16, 3, 3, 3), s2, pads, one, 1)
    assert taken.flops() >= polyphase.MIN_ITEM_FLOPS * taken.N
    small = engine.conv_geometry((2, 16, 8, 8, 8), (1, 32, 16, 3, 3, 3), s2, pads, one, 1)
    stem = engine.conv_geometry((1, 3, 64, 64, 64), (1, 32, 3, 3, 3, 3), s2, pads, one, 1)
    in_plane = engine.conv_geometry(big, (1, 32, 16, 3, 3, 3), (1, 2, 2), pads, one, 1)
    grouped = engine.conv_geometry((1, 32, 32, 32, 32), (2, 32, 16, 3, 3, 3), s2, pads, one, 2)
    for geom in (taken, small, stem, in_plane, grouped):
        dy, w = (a.astype(np.float32) for a in _arrays(geom, 5))
        engine.conv3d_backward_input(dy, w, geom)
    assert calls == [taken]


def test_chooser_declines_planes_over_the_cap(workspace):
    """One phase plane per thread must fit half the workspace cap, else the in-plane
    unfolding's col2im (which walks planes itself) takes the layer."""
    pads, one = ((1, 1),) * 3, (1, 1, 1)
    geom = engine.conv_geometry((1, 16, 8, 128, 128), (1, 32, 16, 3, 3, 3), (2, 2, 2), pads, one, 1)
    assert polyphase.prefer(geom)
    workspace(16 << 20)
    assert not polyphase.prefer(geom)
