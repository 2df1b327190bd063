"""Gradients of conv3d / conv_transpose3d: finite differences in float64, float32 vs float64.

Both convolutions are bilinear, so the central difference of ``L = <y, dy>`` along a
random direction is exact up to rounding: the checks are tight, not smoke tests.
"""

import numpy as np
import pytest
from cases import CASES, TRANSPOSE_CASES, reference_forward, reference_transpose

import volconv as mge
import volconv.functional as F
from volconv import engine
from volconv.autodiff import GradManager


def _grads(fn, case, x, w, b, dy, dtype, **extra):
    xs = [mge.Parameter(a.astype(dtype)) for a in (x, w)]
    bt = None if b is None else mge.Parameter(b.astype(dtype))
    params = xs + ([] if bt is None else [bt])
    gm = GradManager().attach(params)
    with gm:
        y = fn(xs[0], xs[1], bt, **case.kwargs(), **extra)
        gm.backward(y, mge.tensor(dy.astype(dtype)))
    return y, [p.grad.numpy() for p in params]


def _directional_check(ref_fn, args, grads, rng):
    """<grad_i, v> == (L(a_i + h v) - L(a_i - h v)) / 2h for each operand a_i."""
    y0_dy = args[-1]
    for i, g in enumerate(grads):
        v = rng.standard_normal(args[i].shape)
        if v.size == 0:
            continue
        h = 1e-3
        plus = list(args[:-1])
        minus = list(args[:-1])
        plus[i] = args[i] + h * v
        minus[i] = args[i] - h * v
        fd = ((ref_fn(*plus) - ref_fn(*minus)) * y0_dy).sum() / (2 * h)
        got = (g * v).sum()
        scale = np.abs(g).sum() * np.abs(v).max() + np.abs(fd) + 1e-12
        assert abs(got - fd) <= 1e-9 * scale, (i, got, fd)


def _algorithms_for(case):
    geom = case.geometry()
    return [name for name in engine.algorithms() if engine._supports(name, geom)]


PARAMS = [
    pytest.param(case, alg, id=f"{case.name}-{alg}")
    for case in CASES
    for alg in _algorithms_for(case)
]


@pytest.mark.parametrize("case,alg", PARAMS)
def test_conv3d_gradients_finite_differences(case, alg, algorithm, rng):
    algorithm(alg)
    x, w, b = case.arrays()
    dy = rng.standard_normal(reference_forward(case, x, w, b).shape)
    y, grads = _grads(F.conv3d, case, x, w, b, dy, np.float64)
    assert [g.shape for g in grads] == [a.shape for a in (x, w, b) if a is not None]
    args = [x, w] + ([] if b is None else [b]) + [dy]
    _directional_check(
        lambda *a: reference_forward(case, *a[:2], a[2] if b is not None else None),
        args,
        grads,
        rng,
    )


@pytest.mark.parametrize("case,alg", PARAMS)
def test_conv3d_gradients_float32_match_float64(case, alg, algorithm, rng):
    algorithm(alg)
    x, w, b = case.arrays()
    dy = rng.standard_normal(reference_forward(case, x, w, b).shape)
    _, g64 = _grads(F.conv3d, case, x, w, b, dy, np.float64)
    _, g32 = _grads(F.conv3d, case, x, w, b, dy, np.float32)
    for a, b_ in zip(g32, g64, strict=True):
        assert a.dtype == np.float32
        # each gradient entry is a sum of at most (#outputs * taps) products
        # a gradient entry sums at most N*Do*Ho*Wo*O products of O(1) terms
        K = max(1, dy.size)
        scale = np.abs(b_).max() if b_.size else 0.0
        atol = 4 * np.finfo(np.float32).eps * np.sqrt(K) * max(scale, 1.0)
        np.testing.assert_allclose(a, b_, rtol=0, atol=atol)


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_conv_transpose3d_gradients_finite_differences(case, rng):
    x, w, b = case.arrays(transpose=True)
    op = case.output_padding
    dy = rng.standard_normal(reference_transpose(case, x, w, b).shape)
    _, grads = _grads(F.conv_transpose3d, case, x, w, b, dy, np.float64, output_padding=op)
    args = [x, w] + ([] if b is None else [b]) + [dy]
    _directional_check(
        lambda *a: reference_transpose(case, *a[:2], a[2] if b is not None else None),
        args,
        grads,
        rng,
    )


def test_gradients_accumulate_and_start_as_none():
    x = mge.tensor(np.ones((1, 1, 3, 3, 3), np.float32))
    w = mge.Parameter(np.ones((1, 1, 2, 2, 2), np.float32))
    gm = GradManager().attach([w])
    assert w.grad is None
    for _ in range(2):
        with gm:
            gm.backward(F.conv3d(x, w).sum())
    np.testing.assert_array_equal(w.grad.numpy(), 16.0)


def test_unattached_input_gets_no_grad():
    x = mge.tensor(np.ones((1, 1, 3, 3, 3), np.float32))
    w = mge.Parameter(np.ones((1, 1, 2, 2, 2), np.float32))
    gm = GradManager().attach([w])
    with gm:
        gm.backward(F.conv3d(x, w).sum())
    assert x.grad is None and w.grad is not None


def test_float16_input_gets_float16_grad():
    x = mge.Parameter(np.ones((1, 2, 3, 3, 3), np.float16))
    w = mge.Parameter(np.ones((1, 2, 2, 2, 2), np.float32))
    gm = GradManager().attach([x, w])
    with gm:
        gm.backward(F.conv3d(x, w).sum())
    assert x.grad.dtype == np.float16 and w.grad.dtype == np.float32


def test_batch_zero_backward():
    x = mge.Parameter(np.ones((0, 2, 3, 3, 3), np.float32))
    w = mge.Parameter(np.ones((4, 2, 2, 2, 2), np.float32))
    gm = GradManager().attach([x, w])
    with gm:
        y = F.conv3d(x, w)
        gm.backward(y.sum())
    assert x.grad.shape == (0, 2, 3, 3, 3)
    np.testing.assert_array_equal(w.grad.numpy(), 0)
