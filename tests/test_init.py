"""``volconv.module.init`` and the layers' default initialisation (spec §1.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import volconv as mge
import volconv.module as M
from volconv.module import init


def _param(shape, dtype=np.float32):
    return mge.Parameter(np.zeros(shape, dtype=dtype))


# ---- default initialisation of the convolution layers -------------------------------------------
@pytest.mark.parametrize(
    ("make", "fan_in"),
    [
        (lambda: M.Conv3d(4, 64, 3), 108),
        (lambda: M.Conv3d(4, 64, 3, groups=2), 108),  # not divided by groups
        (lambda: M.Conv3d(8, 64, (1, 2, 3), groups=4), 48),
        (lambda: M.Conv3d(1, 512, 1), 1),
        (lambda: M.ConvTranspose3d(4, 64, 3), 108),
        (lambda: M.ConvTranspose3d(16, 4, 3), 432),  # in_channels, not out_channels
        (lambda: M.ConvTranspose3d(8, 64, (1, 2, 3), groups=4), 48),
    ],
)
def test_conv_init_statistics(make, fan_in):
    mge.random.seed(0)
    samples = np.concatenate([make().weight.numpy().ravel() for _ in range(20)])
    std = math.sqrt(1 / fan_in)
    assert samples.size >= 10_000
    assert abs(samples.std() - std) < 0.03 * std
    assert abs(samples.mean()) < 4 * std / math.sqrt(samples.size)
    excess_kurtosis = np.mean(((samples - samples.mean()) / samples.std()) ** 4) - 3
    assert abs(excess_kurtosis) < 0.2  # normal (0), not uniform (-1.2)


@pytest.mark.parametrize("cls", [M.Conv3d, M.ConvTranspose3d])
def test_conv_init_is_reproducible_and_equals_a_direct_draw(cls):
    mge.random.seed(7)
    a = cls(4, 6, (1, 2, 3), groups=2)
    mge.random.seed(7)
    b = cls(4, 6, (1, 2, 3), groups=2)
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    mge.random.seed(7)
    direct = mge.random.normal(mean=0, std=math.sqrt(1 / 24), size=a.weight.shape).numpy()
    np.testing.assert_array_equal(a.weight.numpy(), direct)
    assert a.bias.numpy().dtype == np.float32 and not a.bias.numpy().any()
    np.random.seed(0)  # noqa: NPY002 - numpy's global seed has no effect
    c = cls(4, 6, (1, 2, 3), groups=2)
    np.random.seed(0)  # noqa: NPY002
    d = cls(4, 6, (1, 2, 3), groups=2)
    assert not np.array_equal(c.weight.numpy(), d.weight.numpy())


# ---- fill / zeros / ones / uniform / normal -----------------------------------------------------
def test_fill_zeros_ones_keep_identity_and_dtype():
    t = _param((2, 3), np.float64)
    data_id = id(t)
    init.fill_(t, 2.5)
    assert id(t) == data_id and t.dtype == np.float64 and (t.numpy() == 2.5).all()
    init.ones_(t)
    assert (t.numpy() == 1).all()
    init.zeros_(t)
    assert not t.numpy().any()
    arr = np.ones(4, np.float32)
    init.zeros_(arr)  # numpy arrays are filled in place too
    assert not arr.any()
    with pytest.raises(TypeError, match="in place"):
        init.zeros_([1.0, 2.0])


def test_uniform_and_normal_statistics_and_seed():
    t = _param((200, 200))
    mge.random.seed(1)
    init.uniform_(t, -2.0, 4.0)
    u = t.numpy()
    assert u.min() >= -2.0 and u.max() < 4.0
    assert abs(u.mean() - 1.0) < 0.05 and abs(u.std() - 6 / math.sqrt(12)) < 0.03
    mge.random.seed(1)
    init.uniform_(t, -2.0, 4.0)
    np.testing.assert_array_equal(t.numpy(), u)

    init.normal_(t, 3.0, 0.5)
    n = t.numpy()
    assert abs(n.mean() - 3.0) < 0.01 and abs(n.std() - 0.5) < 0.01
    assert t.dtype == np.float32


# ---- fans and gains -----------------------------------------------------------------------------
def test_calculate_fan_in_and_fan_out():
    assert init.calculate_fan_in_and_fan_out(M.Linear(3, 5).weight) == (3, 5)
    # MegEngine's own test (test_init.py::test_calculate_fan_in_and_fan_out)
    grouped = M.Conv3d(2, 4, (5, 7, 9), groups=2).weight
    assert init.calculate_fan_in_and_fan_out(grouped) == (1 * 5 * 7 * 9, 2 * 5 * 7 * 9)
    # MegEngine's known wrong answer for a dense Conv3d weight, kept for compatibility
    assert init.calculate_fan_in_and_fan_out(M.Conv3d(2, 3, (5, 7, 9)).weight) == (315, 126)
    assert init.calculate_fan_in_and_fan_out(np.zeros((6, 4, 3))) == (12, 18)
    assert init.calculate_fan_in_and_fan_out(np.zeros((6, 4, 3, 3))) == (36, 54)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.calculate_fan_in_and_fan_out(_param((3,)))


def test_calculate_correct_fan():
    w = M.Linear(3, 5).weight
    assert init.calculate_correct_fan(w, "fan_in") == 3
    assert init.calculate_correct_fan(w, "FAN_OUT") == 5
    with pytest.raises(ValueError, match="Mode fan_avg not supported"):
        init.calculate_correct_fan(w, "fan_avg")


def test_calculate_gain():
    for name in ["linear", "conv3d", "conv_transpose3d", "sigmoid"]:
        assert init.calculate_gain(name) == 1
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01**2)))
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    with pytest.raises(ValueError, match="negative_slope"):
        init.calculate_gain("leaky_relu", True)
    with pytest.raises(ValueError, match="Unsupported nonlinearity"):
        init.calculate_gain("swish")


@pytest.mark.parametrize(
    ("fn", "expected_std"),
    [
        (lambda t: init.xavier_normal_(t), math.sqrt(2 / (300 + 500))),
        (lambda t: init.xavier_uniform_(t, gain=2.0), 2 * math.sqrt(2 / (300 + 500))),
        (lambda t: init.msra_normal_(t, nonlinearity="relu"), math.sqrt(2 / 500)),
        (lambda t: init.msra_uniform_(t, a=0.2), math.sqrt(2 / 1.04 / 500)),
        (
            lambda t: init.msra_normal_(t, mode="fan_out", nonlinearity="tanh"),
            5 / 3 / math.sqrt(300),
        ),
    ],
)
def test_xavier_and_msra_statistics(fn, expected_std):
    mge.random.seed(2)
    t = _param((300, 500))  # Linear weight: fan_in 500, fan_out 300
    fn(t)
    values = t.numpy()
    assert abs(values.std() - expected_std) < 0.02 * expected_std
    assert abs(values.mean()) < 0.01 * expected_std * 10


def test_uniform_variants_stay_in_bounds():
    t = _param((64, 27))
    init.xavier_uniform_(t)
    assert np.abs(t.numpy()).max() <= math.sqrt(6 / (64 + 27))
    init.msra_uniform_(t, nonlinearity="relu")
    assert np.abs(t.numpy()).max() <= math.sqrt(6 / 27)
