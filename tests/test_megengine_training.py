"""Replay MegEngine 1.13's one-step training fixture (``trained_net*``) in volconv.

The fixture (see ``tests/fixtures/megengine/README.md``) holds a small Net's initial
parameters, one batch, the loss and gradients MegEngine computed, the parameters after one
``SGD(lr=0.1, momentum=0.9)`` step, the logits after the step, and the saved checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from networks import Net

import volconv as mge
import volconv.functional as F
import volconv.optimizer as optim
from volconv.autodiff import GradManager

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megengine")
IO = os.path.join(HERE, "trained_net_io.npz")
CKPT = os.path.join(HERE, "trained_net.mge")
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def io():
    with np.load(IO) as data:
        return {k: data[k] for k in data.files}


def _names(io):
    return [str(n) for n in io["param_names"]]


def _module_net():
    return Net()


class _FunctionalNet:
    """The same Net written with ``volconv.functional`` only (no module layer)."""

    def __init__(self, params: dict):
        self.p = {k: mge.Parameter(v) for k, v in params.items()}

    def named_parameters(self):
        return sorted(self.p.items())

    def parameters(self):
        return [v for _, v in self.named_parameters()]

    def __call__(self, x):
        p = self.p
        x = F.relu(F.conv3d(x, p["conv1.weight"], p["conv1.bias"], padding=1))
        x = F.relu(F.conv3d(x, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1, groups=2))
        x = F.relu(F.conv_transpose3d(x, p["up.weight"], p["up.bias"], stride=2))
        x = F.mean(x, axis=(2, 3, 4))
        return F.linear(x, p["fc.weight"], p["fc.bias"])


def _build(kind, io):
    init = {n: io[f"init_{n}"] for n in _names(io)}
    if kind == "functional":
        return _FunctionalNet(init)
    net = _module_net()
    net.load_state_dict(init)
    return net


@pytest.mark.parametrize("kind", ["module", "functional"])
def test_one_sgd_step_matches_megengine(io, kind):
    net = _build(kind, io)
    names = _names(io)
    assert [n for n, _ in net.named_parameters()] == names
    x, labels = mge.tensor(io["x"]), mge.tensor(io["labels"])

    gm = GradManager().attach(net.parameters())
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with gm:
        logits = net(x)
        loss = F.nn.cross_entropy(logits, labels)
        gm.backward(loss)
    np.testing.assert_allclose(logits.numpy(), io["logits_before"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss.numpy()), float(io["loss_before"]), rtol=1e-5)
    assert loss.dtype == np.float32

    params = dict(net.named_parameters())
    for n in names:
        assert params[n].grad is not None, n
        assert params[n].grad.dtype == np.float32, n
        np.testing.assert_allclose(params[n].grad.numpy(), io[f"grad_{n}"], **GRAD_TOL, err_msg=n)

    opt.step().clear_grad()
    for n in names:
        assert params[n].grad is None
        assert params[n].dtype == np.float32
        np.testing.assert_allclose(params[n].numpy(), io[f"final_{n}"], rtol=1e-5, atol=1e-7,
                                   err_msg=n)  # fmt: skip

    after = net(x)
    np.testing.assert_allclose(after.numpy(), io["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        float(F.nn.cross_entropy(after, labels).numpy()), float(io["loss_after"]), rtol=1e-4
    )


def test_sgd_step_on_megengine_gradients_is_bit_exact(io):
    """Given MegEngine's gradients, the first momentum step reproduces its parameters exactly."""
    for n in _names(io):
        p = mge.Parameter(io[f"init_{n}"])
        p.grad = mge.tensor(io[f"grad_{n}"])
        optim.SGD([p], lr=0.1, momentum=0.9).step()
        np.testing.assert_array_equal(p.numpy(), io[f"final_{n}"], err_msg=n)


def test_trained_checkpoint_reproduces_logits(io):
    state = mge.load(CKPT)
    assert list(state) == [str(k) for k in io["state_keys"]]
    for n in _names(io):
        np.testing.assert_array_equal(np.asarray(state[n]), io[f"final_{n}"], err_msg=n)
    net = _module_net()
    net.load_state_dict(state)
    np.testing.assert_allclose(net(mge.tensor(io["x"])).numpy(), io["logits"], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
