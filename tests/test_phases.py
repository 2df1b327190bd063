"""Polyphase split of dilated stride-1 layers (``volconv.engine._phases``).

The chooser splits a dilated layer into undilated phase convolutions when Winograd
takes every phase. Each test first asserts that the split is really planned (so a
chooser change cannot turn these into tests of something else), then compares the
forward with the float64 oracle and both gradients with float64 im2col (itself checked
against finite differences in test_conv_backward.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from tracing import scratch_bytes

import volconv
from volconv import engine
from volconv.engine import _phases, winograd
from volconv.engine.reference import conv3d_reference

pytestmark = pytest.mark.skipif(not winograd.numba_available(), reason="needs numba (Winograd)")

#: Winograd F(4, 3)'s error constant, as in tests/test_winograd.py.
C_F4 = 12.0

CASES = {
    "cubic-d2": ((1, 16, 36, 33, 35), 16, ((2, 2),) * 3, (2, 2, 2)),
    "mixed-dilation-asym-pads": ((2, 16, 29, 36, 27), 24, ((1, 3), (0, 2), (2, 1)), (2, 3, 1)),
    "d3-uneven-phases": ((1, 16, 40, 37, 38), 16, ((4, 4), (3, 1), (4, 4)), (3, 3, 3)),
}


def _problem(name, dtype=np.float32):
    x_shape, out_channels, pads, dilation = CASES[name]
    w_shape = (1, out_channels, x_shape[1], 3, 3, 3)
    geom = engine.conv_geometry(x_shape, w_shape, (1, 1, 1), pads, dilation, 1)
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    return geom, x, w, dy


def _assert_close(got, ref, reduction):
    bound = C_F4 * float(np.finfo(np.float32).eps) * np.sqrt(reduction) * np.abs(ref).max()
    assert np.abs(got - ref).max() <= bound


@pytest.mark.parametrize("name", sorted(CASES))
def test_phase_split_matches_references(name, algorithm):
    geom, x, w, dy = _problem(name)
    assert engine._phase_plan(geom, x.dtype) is not None  # the path under test is taken
    x0, w0, dy0 = x.copy(), w.copy(), dy.copy()
    y = engine.conv3d_forward(x, w, geom)
    dx = engine.conv3d_backward_input(dy, w, geom)
    dw = engine.conv3d_backward_weight(x, dy, geom)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    _assert_close(y, conv3d_reference(x, w, geom), geom.reduction)
    algorithm("im2col")
    dx_ref = engine.conv3d_backward_input(dy.astype(np.float64), w.astype(np.float64), geom)
    dw_ref = engine.conv3d_backward_weight(x.astype(np.float64), dy.astype(np.float64), geom)
    _assert_close(dx, dx_ref, geom.O * 27)
    positions = geom.N * int(np.prod(geom.spatial_out))
    _assert_close(dw, dw_ref, positions)
    for before, after in ((x0, x), (w0, w), (dy0, dy)):
        np.testing.assert_array_equal(before, after)  # inputs never mutated


def test_phases_tile_the_output_exactly():
    """Every output sample belongs to exactly one phase, every phase input to x."""
    for name in CASES:
        geom, *_ = _problem(name)
        hits = np.zeros(geom.spatial_out, dtype=int)
        for phase in _phases.split(geom):
            hits[phase.y_index[2:]] += 1
            if phase.geom is not None:
                assert phase.geom.dilation == (1, 1, 1)
                assert phase.geom.spatial_out == hits[phase.y_index[2:]].shape
        assert (hits == 1).all()


def test_empty_phase_input_gives_zeros():
    """A phase whose taps all land on padding (input phase empty) contributes zeros."""
    geom = engine.conv_geometry(
        (1, 2, 1, 6, 6), (1, 2, 2, 3, 3, 3), (1, 1, 1), ((1, 3), (2, 2), (2, 2)), (2, 2, 2), 1
    )
    phases = _phases.split(geom)
    assert any(p.geom is None for p in phases)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(geom.in_shape)
    w = rng.standard_normal(geom.w_shape)
    # Run the split by hand (Winograd would not take these tiny phases).
    y = np.empty(geom.out_shape)
    for phase in phases:
        if phase.geom is None:
            y[phase.y_index] = 0
        else:
            xs = np.ascontiguousarray(x[phase.x_index])
            y[phase.y_index] = engine.conv3d_forward(xs, w, phase.geom)
    np.testing.assert_allclose(y, conv3d_reference(x, w, geom), rtol=1e-12, atol=1e-12)


def test_copies_fit_the_cap(workspace):
    """Under a cap too small for the phase copies the split is not planned."""
    geom, x, *_ = _problem("cubic-d2")
    workspace(2 * _phases.copies_bytes(geom, 4) - 1)
    assert engine._phase_plan(geom, x.dtype) is None


def test_cap_restored_after_split():
    geom, x, w, dy = _problem("cubic-d2")
    saved = volconv.config.workspace_bytes
    engine.conv3d_forward(x, w, geom)
    engine.conv3d_backward_weight(x, dy, geom)
    assert volconv.config.workspace_bytes == saved


def test_split_scratch_under_cap(workspace):
    """Phase copies plus the phases' own workspaces stay under the caller's cap."""
    geom, x, w, dy = _problem("cubic-d2")
    cap = 6 << 20
    workspace(cap)
    assert engine._phase_plan(geom, x.dtype) is not None
    engine.conv3d_forward(x, w, geom)  # warm-up (JIT)
    for run, result_bytes in (
        (lambda: engine.conv3d_forward(x, w, geom), dy.nbytes),
        (lambda: engine.conv3d_backward_weight(x, dy, geom), w.nbytes),
    ):
        assert scratch_bytes(run, result_bytes) <= cap + (256 << 10)
