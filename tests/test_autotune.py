"""Measured algorithm choice: same answers, cached per shape, off in deterministic mode."""

import numpy as np
import pytest

import volconv
import volconv.functional as F
from volconv.autodiff import GradManager
from volconv.engine import _autotune


@pytest.fixture
def autotune():
    saved = volconv.config.autotune, volconv.config.deterministic
    _autotune.clear()
    volconv.config.autotune = True
    yield
    volconv.config.autotune, volconv.config.deterministic = saved
    _autotune.clear()


def _step(x, w, **kw):
    xp, wp = volconv.Parameter(x), volconv.Parameter(w)
    gm = GradManager().attach([xp, wp])
    with gm:
        y = F.conv3d(xp, wp, **kw)
        gm.backward(y, np.ones(y.shape, y.dtype))
    return y.numpy(), xp.grad.numpy(), wp.grad.numpy()


@pytest.mark.parametrize("stride", [1, 2])
def test_autotuned_results_match_the_heuristic(autotune, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 6, 7, 8))  # 16 channels: stride-1 dx is a forward
    w = rng.standard_normal((4, 16, 3, 3, 3))
    tuned = _step(x, w, padding=1, stride=stride)
    keys = {k[0] for k in _autotune.choices()}
    assert {"forward", "weight"} <= keys
    assert ("input" in keys) == (stride != 1)  # stride 1: dx is a tuned forward
    again = _step(x, w, padding=1, stride=stride)  # second call: from the cache
    volconv.config.autotune = False
    plain = _step(x, w, padding=1, stride=stride)
    for a, b, c in zip(tuned, again, plain, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-10)


def test_deterministic_mode_disables_autotuning(autotune):
    volconv.config.deterministic = True
    F.conv3d(np.ones((1, 2, 4, 4, 4)), np.ones((2, 2, 3, 3, 3)))
    assert _autotune.choices() == {}
