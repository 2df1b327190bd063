"""volconv.optimizer: SGD and Adam against hand-computed updates, and the training-loop API."""

from __future__ import annotations

import numpy as np
import pytest

import volconv as mge
import volconv.functional as F
import volconv.optimizer as optim
from volconv.autodiff import GradManager


def _param(values, dtype=np.float32):
    return mge.Parameter(np.asarray(values, dtype=dtype))


def _set_grad(p, g):
    p.grad = mge.tensor(np.asarray(g, dtype=p.dtype))


GRADS = [
    np.array([0.5, -1.0, 2.0]),
    np.array([-0.25, 0.75, 1.0]),
    np.array([1.5, 0.0, -0.5]),
]
P0 = np.array([1.0, -2.0, 0.5])


# ---- SGD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_plain(dtype):
    p = _param(P0, dtype)
    opt = optim.SGD([p], lr=0.1)
    expect = P0.astype(dtype)
    for g in GRADS:
        _set_grad(p, g)
        opt.step()
        expect = expect - dtype(0.1) * g.astype(dtype)
    assert p.dtype == dtype
    np.testing.assert_array_equal(p.numpy(), expect)


def test_sgd_momentum_and_weight_decay():
    lr, mom, wd = 0.05, 0.9, 0.01
    p = _param(P0, np.float64)
    opt = optim.SGD([p], lr=lr, momentum=mom, weight_decay=wd)
    expect, v = P0.copy(), np.zeros(3)
    for g in GRADS:
        _set_grad(p, g)
        opt.step()
        d = g + wd * expect
        v = mom * v + d
        expect = expect - lr * v
    np.testing.assert_allclose(p.numpy(), expect, rtol=1e-12)
    np.testing.assert_allclose(opt.state_dict()["state"][0]["momentum_buffer"], v, rtol=1e-12)


def test_sgd_first_momentum_step_is_plain_step_bit_exact():
    # MegEngine: the buffer starts at zero, so step 1 is exactly p - lr * g (float32)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    p = mge.Parameter(w0)
    _set_grad(p, g)
    optim.SGD([p], lr=0.1, momentum=0.9).step()
    np.testing.assert_array_equal(p.numpy(), w0 - np.float32(0.1) * g)


def test_sgd_nesterov():
    lr, mom = 0.1, 0.9
    p = _param(P0, np.float64)
    opt = optim.SGD([p], lr=lr, momentum=mom, nesterov=True)
    expect, v = P0.copy(), np.zeros(3)
    for g in GRADS:
        _set_grad(p, g)
        opt.step()
        v = mom * v + g
        expect = expect - lr * (g + mom * v)
    np.testing.assert_allclose(p.numpy(), expect, rtol=1e-12)


def test_sgd_argument_checks():
    p = _param(P0)
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD([p], lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.SGD([p], lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="Parameters"):
        optim.SGD([mge.tensor([1.0])], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([p, p], lr=0.1)


# ---- Adam -----------------------------------------------------------------------------------
def _adam_reference(p, grads, lr, b1, b2, eps, wd):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p, m, v


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_reference_float64(wd):
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-6
    p = _param(P0, np.float64)
    opt = optim.Adam([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in GRADS:
        _set_grad(p, g)
        assert opt.step() is opt
    expect, m, v = _adam_reference(P0, GRADS, lr, *betas, eps, wd)
    np.testing.assert_allclose(p.numpy(), expect, rtol=1e-12)
    state = opt.state_dict()["state"][0]
    np.testing.assert_allclose(state["exp_avg"], m, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg_sq"], v, rtol=1e-12)
    assert float(state["step"]) == 3.0


def test_adam_float32_keeps_dtype_and_matches():
    p = _param(P0, np.float32)
    opt = optim.Adam([p], lr=1e-3)
    for g in GRADS:
        _set_grad(p, g)
        opt.step()
    expect, _, _ = _adam_reference(P0, GRADS, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.numpy(), expect, rtol=1e-6)


def test_adam_argument_checks():
    p = _param(P0)
    with pytest.raises(ValueError, match="beta"):
        optim.Adam([p], lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="beta"):
        optim.Adam([p], lr=0.1, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam([p], lr=-0.1)


def test_float16_parameter_updated_in_float32():
    p = _param([1.0, 2.0], np.float16)
    _set_grad(p, [1.0, 1.0])
    optim.SGD([p], lr=0.5).step()
    assert p.dtype == np.float16
    np.testing.assert_array_equal(p.numpy(), np.array([0.5, 1.5], np.float16))


# ---- bit-exact against MegEngine 1.13 -------------------------------------------------------
# Generated with MegEngine 1.13.0 (CPU): 4 steps on a (3, 4) float32 parameter, gradients below.
MGE_P0 = [
    0.0012301534,
    0.29874554,
    -0.27413785,
    -0.89059186,
    -0.4546708,
    -0.9916465,
    0.0601436,
    1.3402152,
    -0.4922065,
    -0.6204749,
    0.48984206,
    0.356887,
]
MGE_GRADS = [
    0.10541425,
    -0.930468,
    -0.029251823,
    0.6953032,
    -1.3442146,
    -0.45761576,
    -1.9012227,
    -1.2895378,
    -1.841735,
    -0.23509113,
    -1.2674465,
    0.27126434,
    0.15675108,
    -0.18693094,
    -2.5167596,
    -0.5386929,
    -0.048500944,
    0.11330899,
    -1.5301358,
    -0.47775328,
    -0.9785191,
    -0.80883723,
    1.0608987,
    -0.8075347,
    -0.032521706,
    0.8843899,
    -0.58360046,
    -0.11170195,
    0.11046414,
    0.063781776,
    -1.2250558,
    0.07614023,
    1.3588234,
    -1.5471447,
    0.8593827,
    0.119354025,
    -0.6414704,
    2.0004165,
    0.7622597,
    -1.1992888,
    0.07451623,
    0.5766896,
    -0.18878213,
    0.68291026,
    -0.06651732,
    0.66724753,
    1.4385226,
    -0.6756623,
]
MGE_SGD = [
    0.042412832,
    0.12200481,
    -0.03740263,
    -0.77515376,
    -0.33389726,
    -1.021263,
    0.54466325,
    1.4410393,
    -0.3394117,
    -0.42809233,
    0.28070626,
    0.46614486,
]
MGE_SGD_M = [
    -0.007175181,
    0.30131602,
    0.45262185,
    -0.84256864,
    -0.0076914653,
    -0.9347667,
    1.3802798,
    1.8304007,
    0.15482008,
    -0.09319946,
    0.3310784,
    0.5273301,
]
MGE_SGD_M_WD = [
    0.0015775003,
    0.27786604,
    0.052510478,
    -0.8537456,
    -0.26242867,
    -0.96852344,
    0.6463345,
    1.5420507,
    -0.21836865,
    -0.37883627,
    0.39607188,
    0.43693358,
]
MGE_SGD_NEST = [
    0.018047463,
    0.21130623,
    0.17136648,
    -0.810701,
    -0.19293612,
    -0.98027664,
    0.89628065,
    1.6103196,
    -0.1244552,
    -0.28667974,
    0.3135035,
    0.4879928,
]
MGE_ADAM = [
    -0.021097954,
    0.31217107,
    -0.24557793,
    -0.8962965,
    -0.42922434,
    -0.9772288,
    0.09805078,
    1.3677547,
    -0.4679072,
    -0.5877279,
    0.49219364,
    0.3601364,
]
MGE_ADAM_WD = [
    -0.04019411,
    0.31948847,
    -0.21677276,
    -0.88982505,
    -0.4046749,
    -0.9529194,
    0.13473397,
    1.3846911,
    -0.44570595,
    -0.5534271,
    0.48786044,
    0.36215627,
]

MGE_CASES = {
    "sgd": (lambda ps: optim.SGD(ps, lr=0.1), MGE_SGD),
    "sgd_momentum": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9), MGE_SGD_M),
    "sgd_momentum_wd": (
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.01),
        MGE_SGD_M_WD,
    ),
    "sgd_nesterov_wd": (
        lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
        MGE_SGD_NEST,
    ),
    "adam": (lambda ps: optim.Adam(ps, lr=0.01), MGE_ADAM),
    "adam_wd": (
        lambda ps: optim.Adam(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        MGE_ADAM_WD,
    ),
}


@pytest.mark.parametrize("name", list(MGE_CASES))
def test_four_steps_bit_exact_against_megengine(name):
    make_opt, expect = MGE_CASES[name]
    p = mge.Parameter(np.array(MGE_P0, dtype=np.float32).reshape(3, 4))
    opt = make_opt([p])
    for g in np.array(MGE_GRADS, dtype=np.float32).reshape(4, 3, 4):
        p.grad = mge.tensor(g)
        opt.step()
    np.testing.assert_array_equal(p.numpy(), np.array(expect, dtype=np.float32).reshape(3, 4))


# ---- the training-loop API ------------------------------------------------------------------
def test_step_returns_optimizer_and_clear_grad_sets_none():
    a, b = _param(P0), _param([1.0])
    for opt in (optim.SGD([a, b], lr=0.1, momentum=0.9), optim.Adam([a, b], lr=0.1)):
        _set_grad(a, GRADS[0])
        assert opt.step() is opt
        assert a.grad is not None
        opt.step().clear_grad()
        assert a.grad is None and b.grad is None
        _set_grad(a, GRADS[0])
        opt.zero_grad()
        assert a.grad is None


def test_params_without_grad_are_skipped():
    a, b = _param(P0), _param([1.0, 2.0])
    opt = optim.Adam([a, b], lr=0.1)
    _set_grad(a, GRADS[0])
    opt.step()
    np.testing.assert_array_equal(b.numpy(), np.array([1.0, 2.0], np.float32))
    assert float(opt.state_dict()["state"][1]["step"]) == 0.0
    assert not np.array_equal(a.numpy(), P0.astype(np.float32))


def test_param_groups_have_their_own_hyperparameters():
    a, b = _param([1.0]), _param([1.0])
    opt = optim.SGD([{"params": [a]}, {"params": b, "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    _set_grad(a, [1.0])
    _set_grad(b, [1.0])
    opt.step()
    np.testing.assert_allclose(a.numpy(), [0.9])
    np.testing.assert_allclose(b.numpy(), [0.5])
    opt.param_groups[0]["lr"] = 1.0  # changing the lr between steps takes effect
    _set_grad(a, [1.0])
    opt.step()
    np.testing.assert_allclose(a.numpy(), [-0.1], rtol=1e-6)


def test_parameter_identity_is_kept_and_old_arrays_do_not_change():
    p = _param(P0)
    before = p.numpy()
    ident = id(p)
    _set_grad(p, GRADS[0])
    optim.SGD([p], lr=0.1).step()
    assert id(p) == ident
    np.testing.assert_array_equal(before, P0.astype(np.float32))


def test_state_dict_round_trip_continues_identically():
    def run(opt_factory, split):
        p = _param(P0, np.float64)
        opt = opt_factory([p])
        for g in GRADS[:split]:
            _set_grad(p, g)
            opt.step()
        state = opt.state_dict()
        q = _param(p.numpy(), np.float64)
        opt2 = opt_factory([q])
        opt2.load_state_dict(state)
        for g in GRADS[split:]:
            _set_grad(q, g)
            opt2.step()
        return q.numpy()

    for factory in (
        lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: optim.Adam(ps, lr=0.1),
    ):
        # one step, save, resume for two more == three uninterrupted steps
        np.testing.assert_array_equal(run(factory, 1), run(factory, 3))


def test_load_state_dict_checks_structure():
    a = optim.SGD([_param([1.0])], lr=0.1)
    b = optim.SGD([_param([1.0]), _param([2.0])], lr=0.1)
    with pytest.raises(ValueError, match="size"):
        a.load_state_dict(b.state_dict())


def test_gradients_accumulate_without_clear_grad():
    w = _param([2.0, -1.0])
    x = mge.tensor(np.array([3.0, 4.0], dtype=np.float32))
    gm = GradManager().attach([w])
    for _ in range(2):
        with gm:
            gm.backward((w * x).sum())
    np.testing.assert_array_equal(w.grad.numpy(), 2 * x.numpy())
    opt = optim.SGD([w], lr=0.1)
    opt.step().clear_grad()
    np.testing.assert_allclose(w.numpy(), np.array([2.0, -1.0]) - 0.1 * 2 * x.numpy())
    assert w.grad is None


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: optim.SGD(ps, lr=1.0, momentum=0.9), lambda ps: optim.Adam(ps, lr=0.01)],
    ids=["sgd", "adam"],
)
def test_training_a_tiny_3d_cnn_reduces_the_loss(make_opt):
    import volconv.module as M

    class Tiny(M.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = M.Conv3d(1, 4, 3, padding=1)
            self.conv2 = M.Conv3d(4, 8, 3, stride=2, padding=1)
            self.fc = M.Linear(8, 2)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            return self.fc(F.mean(x, axis=(2, 3, 4)))

    rng = np.random.default_rng(0)
    # class 1: a bright blob in the first half along W; class 0: in the second half
    label = np.tile(np.array([0, 1], dtype=np.int32), 8)
    x = 0.3 * rng.standard_normal((16, 1, 8, 8, 8)).astype(np.float32)
    for i, c in enumerate(label):
        w0 = 1 if c else 5
        x[i, 0, 2:6, 2:6, w0 : w0 + 2] += 1.5
    mge.random.seed(0)
    net = Tiny()
    gm = GradManager().attach(net.parameters())
    opt = make_opt(net.parameters())
    data, target = mge.tensor(x), mge.tensor(label)
    losses = []
    for _ in range(25):
        with gm:
            loss = F.nn.cross_entropy(net(data), target)
            gm.backward(loss)
        opt.step().clear_grad()
        losses.append(float(loss.numpy()))
    final = float(F.nn.cross_entropy(net(data), target).numpy())
    assert all(np.isfinite(losses))
    assert final < 0.5 * losses[0], losses
