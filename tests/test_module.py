"""The module layer against MegEngine 1.13 fixtures: repr, state_dict, loading, training step."""

from __future__ import annotations

import json
import logging
import pathlib
from collections import OrderedDict

import numpy as np
import pytest
from networks import Net

import volconv as mge
import volconv.functional as F
import volconv.module as M
from volconv.autodiff import GradManager

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "megengine"
MODULES = json.loads((FIXTURES / "modules.json").read_text())


# ---- the networks named in modules.json ---------------------------------------------------------
def ReprNet():  # noqa: N802 - the name used in modules.json
    class Net(M.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = M.Conv3d(1, 2, 3)
            self.conv2 = M.ConvTranspose3d(2, 1, 3, bias=False)

        def forward(self, x):
            return self.conv2(self.conv1(x))

    return Net()


def build(construct: str) -> M.Module:
    """Evaluate a ``construct`` expression from modules.json (comments stripped)."""
    expression = construct.split("#")[0].strip()
    return eval(expression, {"M": M, "Net": Net, "ReprNet": ReprNet})


# ---- repr, state_dict keys/shapes/dtypes, named_parameters: every fixture entry -----------------
@pytest.mark.parametrize("entry", MODULES["modules"], ids=lambda e: e["construct"][:60])
def test_repr_matches_megengine(entry):
    m = build(entry["construct"])
    assert repr(m) == entry["repr"]
    assert (str(m) == repr(m)) is entry["str_equals_repr"]


@pytest.mark.parametrize("entry", MODULES["modules"], ids=lambda e: e["construct"][:60])
def test_state_dict_matches_megengine(entry):
    m = build(entry["construct"])
    sd = m.state_dict()
    assert isinstance(sd, OrderedDict)
    got = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sd.items()]
    assert got == entry["state_dict"]
    assert [name for name, _ in m.named_parameters()] == entry["named_parameters"]
    assert [p.shape for p in m.parameters()] == [tuple(e["shape"]) for e in entry["state_dict"]]


def test_conv3d_vars_order_and_values():
    spec = MODULES["conv3d_vars"]
    m = build(spec["construct"])
    assert list(vars(m)) == spec["names"]
    for name, expected in spec["public"]:
        value = getattr(m, name)
        shown = f"Parameter{value.shape}" if isinstance(value, mge.Parameter) else repr(value)
        assert shown == expected, name


def test_conv_transpose3d_vars_order_and_values():
    spec = MODULES["conv_transpose3d_vars"]
    m = build(spec["construct"])
    assert list(vars(m)) == spec["names"]
    for name, expected in spec["public"]:
        value = getattr(m, name)
        if name == "output_padding":  # deviation: normalised to a 3-tuple (MegEngine keeps 1)
            assert value == (1, 1, 1)
            continue
        shown = f"Parameter{value.shape}" if isinstance(value, mge.Parameter) else repr(value)
        assert shown == expected, name
    assert M.ConvTranspose3d.output_padding == 0
    assert not hasattr(m, "calc_conv") and hasattr(M.Conv3d(1, 1, 1), "calc_conv")


# ---- the seed example ---------------------------------------------------------------------------
def test_seed_example_prints_shape(capsys):
    import numpy as np

    import volconv as mge
    import volconv.module as M

    m = M.Conv3d(in_channels=3, out_channels=1, kernel_size=3)
    inp = mge.tensor(np.arange(0, 384).astype("float32").reshape(2, 3, 4, 4, 4))
    oup = m(inp)
    print(oup.numpy().shape)
    assert capsys.readouterr().out == "(2, 1, 2, 2, 2)\n"


# ---- construction: signatures, shapes, argument errors ------------------------------------------
@pytest.mark.parametrize(
    ("module", "weight", "bias"),
    [
        (M.Conv3d(2, 4, (1, 2, 3)), (4, 2, 1, 2, 3), (1, 4, 1, 1, 1)),
        (M.Conv3d(4, 6, 3, groups=2), (2, 3, 2, 3, 3, 3), (1, 6, 1, 1, 1)),
        (M.Conv3d(3, 6, 1, groups=3), (3, 2, 1, 1, 1, 1), (1, 6, 1, 1, 1)),
        (M.ConvTranspose3d(2, 4, (1, 2, 3)), (2, 4, 1, 2, 3), (1, 4, 1, 1, 1)),
        (M.ConvTranspose3d(4, 8, 3, groups=2), (2, 2, 4, 3, 3, 3), (1, 8, 1, 1, 1)),
        (M.Linear(4, 3), (3, 4), (3,)),
    ],
)
def test_parameter_shapes(module, weight, bias):
    assert module.weight.shape == weight and module.weight.dtype == np.float32
    assert module.bias.shape == bias and module.bias.dtype == np.float32
    assert isinstance(module.weight, mge.Parameter) and isinstance(module.bias, mge.Parameter)


def test_bias_false_and_normalised_arguments():
    m = M.Conv3d(2, 4, [1, 2, 3], stride=np.array([1, 2, 1]), padding=(0, 1, 0), bias=False)
    assert m.bias is None and list(m.state_dict()) == ["weight"]
    assert m.kernel_size == (1, 2, 3) and m.stride == (1, 2, 1) and m.padding == (0, 1, 0)
    assert all(type(v) is int for v in m.kernel_size + m.stride + m.padding + m.dilation)
    assert m.output_padding == 0 and m.conv_mode == "cross_correlation"
    assert M.Conv3d(1, 1, 1, conv_mode="CROSS_CORRELATION").conv_mode == "CROSS_CORRELATION"
    assert M.ConvTranspose3d(
        1, 1, 3, stride=(2, 3, 1), output_padding=(1, 2, 0)
    ).output_padding == (
        1,
        2,
        0,
    )
    empty = M.Conv3d(2, 0, 3)  # accepted, as in MegEngine
    assert empty(np.zeros((1, 2, 3, 3, 3), np.float32)).shape == (1, 0, 1, 1, 1)


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: M.Conv3d(2, 4, (3, 3)), ValueError, ["kernel_size", "3"]),
        (lambda: M.Conv3d(2, 4, 0), ValueError, ["kernel_size", ">= 1"]),
        (lambda: M.Conv3d(2, 4, 3, stride=0), ValueError, ["stride", "(0, 0, 0)"]),
        (lambda: M.Conv3d(2, 4, 3, stride=(1, 0, 1)), ValueError, ["stride", "(1, 0, 1)"]),
        (lambda: M.Conv3d(2, 4, 3, padding=-1), ValueError, ["padding", "(-1, -1, -1)"]),
        (lambda: M.Conv3d(2, 4, 3, dilation=0), ValueError, ["dilation"]),
        (lambda: M.Conv3d(2, 4, None), TypeError, ["kernel_size", "None"]),
        (lambda: M.Conv3d(3, 4, 3, groups=2), ValueError, ["in_channels", "groups", "3", "2"]),
        (lambda: M.Conv3d(4, 6, 3, groups=4), ValueError, ["out_channels", "groups", "6", "4"]),
        (lambda: M.Conv3d(2, 4, 3, groups=0), ValueError, ["groups", "0"]),
        (lambda: M.Conv3d(2, 4, 3, groups=-1), ValueError, ["groups", "-1"]),
        (lambda: M.Conv3d(0, 4, 3), ValueError, ["in_channels", "0"]),
        (lambda: M.Conv3d(2, -1, 3), ValueError, ["out_channels", "-1"]),
        (lambda: M.Conv3d(4.0, 4, 3), TypeError, ["in_channels", "float"]),
        (lambda: M.Conv3d(2, 4, 3, conv_mode="convolution"), ValueError, ["conv_mode"]),
        (lambda: M.Conv3d(2, 4, 3, conv_mode=None), ValueError, ["conv_mode"]),
        (lambda: M.ConvTranspose3d(2, 4, 3, output_padding=1), ValueError, ["output_padding"]),
        (
            lambda: M.ConvTranspose3d(2, 4, 3, stride=(2, 2, 1), output_padding=(1, 1, 1)),
            ValueError,
            ["output_padding", "(1, 1, 1)", "(2, 2, 1)"],
        ),
        (lambda: M.ConvTranspose3d(2, 4, 3, output_padding=(1, 1)), ValueError, ["output_padding"]),
        (lambda: M.Linear(0, 3), ValueError, ["in_features", "0"]),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: M.Conv3d(2, 4, 3, compute_mode="default"),
        lambda: M.Conv3d(2, 4, 3, padding_modes="zeros"),
        lambda: M.Conv3d(2, 4, 3, name="c"),
        lambda: M.ConvTranspose3d(2, 4, 3, conv_mode="cross_correlation"),
    ],
)
def test_no_extra_keyword_arguments(make):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        make()


def test_module_is_abstract_and_name_is_checked():
    with pytest.raises(TypeError):
        M.Module()
    assert M.ReLU(name="act").name == "act"
    with pytest.raises(ValueError, match="non-empty string"):
        M.ReLU(name=" ")


# ---- forward ------------------------------------------------------------------------------------
def test_forward_accepts_numpy_and_matches_functional(rng):
    m = M.Conv3d(4, 6, (1, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1), groups=2)
    x = rng.standard_normal((2, 4, 3, 5, 4)).astype(np.float32)
    y_np = m(x)
    y_t = m(mge.tensor(x))
    expected = F.conv3d(x, m.weight, m.bias, (1, 2, 1), (1, 0, 1), 1, 2)
    assert isinstance(y_np, mge.Tensor)
    np.testing.assert_array_equal(y_np.numpy(), y_t.numpy())
    np.testing.assert_array_equal(y_np.numpy(), expected.numpy())
    np.testing.assert_array_equal(
        m.calc_conv(x, m.weight, None).numpy() + m.bias.numpy(), y_np.numpy()
    )


def test_conv_transpose3d_groups_work(rng):
    """MegEngine's module fails with groups > 1; here it equals the per-group dense op."""
    m = M.ConvTranspose3d(4, 6, 2, stride=2, padding=(0, 1, 0), groups=2)
    x = rng.standard_normal((2, 4, 3, 3, 3)).astype(np.float32)
    y = m(x).numpy()
    w = m.weight.numpy()
    parts = [
        F.conv_transpose3d(x[:, 2 * g : 2 * g + 2], w[g], None, 2, (0, 1, 0)).numpy()
        for g in range(2)
    ]
    np.testing.assert_allclose(y, np.concatenate(parts, axis=1), rtol=1e-5, atol=1e-6)


def test_conv_transpose3d_output_padding_shape():
    m = M.ConvTranspose3d(
        3, 5, (3, 5, 2), stride=(3, 2, 2), padding=(0, 4, 2), output_padding=(2, 1, 1)
    )
    assert m(np.zeros((2, 3, 4, 6, 5), np.float32)).shape == (2, 5, 14, 8, 7)


@pytest.mark.parametrize("name", ["conv3d_state", "conv3d_grouped_state"])
def test_megengine_checkpoints_reproduce_outputs(name):
    sd = mge.load(FIXTURES / f"{name}.mge")
    io = np.load(FIXTURES / f"{name}_io.npz")
    if name == "conv3d_state":
        m = M.Conv3d(2, 4, 3)
    else:
        m = M.Conv3d(4, 6, (1, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1), groups=2)
    m.load_state_dict(sd)
    np.testing.assert_allclose(m(io["x"]).numpy(), io["y"], rtol=1e-5, atol=1e-5)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, sd[key])


def test_trained_net_checkpoint_reproduces_logits():
    io = np.load(FIXTURES / "trained_net_io.npz")
    net = Net()
    net.load_state_dict(mge.load(FIXTURES / "trained_net.mge"))
    assert list(net.state_dict()) == list(io["state_keys"])
    np.testing.assert_allclose(net(io["x"]).numpy(), io["logits"], rtol=1e-5, atol=1e-5)


def test_trained_net_one_sgd_step_matches_megengine():
    """Forward, cross-entropy, backward and ``p - 0.1 * grad`` against MegEngine's step."""
    io = np.load(FIXTURES / "trained_net_io.npz")
    net = Net()
    net.load_state_dict({k: io[f"init_{k}"] for k in io["state_keys"]})
    assert [n for n, _ in net.named_parameters()] == list(io["param_names"])
    gm = GradManager().attach(net.parameters())
    with gm:
        logits = net(io["x"])
        loss = F.nn.cross_entropy(logits, io["labels"])
        gm.backward(loss)
    np.testing.assert_allclose(logits.numpy(), io["logits_before"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss.numpy(), io["loss_before"], rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), io[f"grad_{name}"], rtol=1e-4, atol=1e-6)
        p.set_value(p.numpy() - 0.1 * p.grad.numpy())
        np.testing.assert_allclose(p.numpy(), io[f"final_{name}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net(io["x"]).numpy(), io["logits"], rtol=1e-5, atol=1e-5)


# ---- state_dict ---------------------------------------------------------------------------------
def test_state_dict_values_are_read_only_views():
    m = M.Conv3d(2, 4, 3)
    sd = m.state_dict()
    for key, value in sd.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32
        assert not value.flags.writeable and not value.flags.owndata
        np.testing.assert_array_equal(value, getattr(m, key).numpy())
    with pytest.raises(ValueError, match="read-only"):
        sd["bias"][:] = 7
    assert not m.bias.numpy().any()


def test_state_dict_snapshot_survives_an_optimizer_step():
    from volconv.optimizer import SGD

    m = M.Conv3d(1, 2, 2)
    sd = m.state_dict()
    before = {k: np.array(v) for k, v in sd.items()}
    gm = GradManager().attach(m.parameters())
    with gm:
        gm.backward(m(np.ones((1, 1, 2, 2, 2), np.float32)).sum())
    SGD(m.parameters(), lr=0.1).step()
    assert not np.array_equal(m.weight.numpy(), before["weight"])
    for key, value in sd.items():
        np.testing.assert_array_equal(value, before[key])


def test_state_dict_prefix_and_rst():
    m = M.Conv3d(1, 2, 2)
    rst = OrderedDict(first=np.zeros(1))
    assert m.state_dict(rst, "enc.") is rst
    assert list(rst) == ["first", "enc.bias", "enc.weight"]


def test_state_dict_keep_var_returns_parameters():
    m = M.Conv3d(2, 4, 3)
    sd = m.state_dict(keep_var=True)
    assert sd["weight"] is m.weight and sd["bias"] is m.bias


def test_nested_containers_and_shared_parameters():
    class Holder(M.Module):
        def __init__(self):
            super().__init__()
            self.layers = [M.Conv3d(1, 1, 1), M.Linear(2, 2, bias=False)]
            self.table = {"b": M.ReLU(), "a": M.Conv3d(1, 1, 1, bias=False)}
            self.own = mge.Parameter(np.ones(2, np.float32))
            self.alias = self.own  # shared: listed once

        def forward(self, x):
            return x

    h = Holder()
    assert list(h.state_dict()) == [
        "alias",
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.weight",
        "table.a.weight",
    ]
    assert len(list(h.parameters())) == 5
    assert len(list(h.parameters(recursive=False))) == 1
    assert repr(h).splitlines()[1:] == [
        "  (layers.0): Conv3d(1, 1, kernel_size=(1, 1, 1))",
        "  (layers.1): Linear(in_features=2, out_features=2, bias=False)",
        "  (table.a): Conv3d(1, 1, kernel_size=(1, 1, 1), bias=False)",
        "  (table.b): ReLU()",
        ")",
    ]


def test_children_and_modules_traversal():
    net = Net()
    assert [n for n, _ in net.named_children()] == ["conv1", "conv2", "fc", "up"]
    assert list(net.children()) == [net.conv1, net.conv2, net.fc, net.up]
    assert [n for n, _ in net.named_modules()] == ["", "conv1", "conv2", "fc", "up"]
    assert [n for n, _ in net.named_modules(prefix="net")][:2] == ["net", "net.conv1"]
    assert next(net.modules()) is net
    seen = []
    net.apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["Net", "Conv3d", "Conv3d", "Linear", "ConvTranspose3d"]
    assert net.conv1._short_name == "conv1" and net.conv1._name == "conv1"


def test_reassigning_and_deleting_children_updates_repr():
    net = ReprNet()
    net.conv2 = M.ReLU()
    assert "(conv2): ReLU()" in repr(net)
    del net.conv1
    assert repr(net) == "Net(\n  (conv2): ReLU()\n)"
    net.conv2 = 3  # no longer a module
    assert repr(net) == "Net()" and list(net.state_dict()) == []


def test_train_eval_recursive():
    net = Net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.train(False, recursive=False)
    assert not net.training and net.conv1.training


def test_forward_hooks():
    m = M.ReLU()
    calls = []
    pre = m.register_forward_pre_hook(lambda mod, inputs: calls.append("pre") or (inputs[0] - 1,))
    post = m.register_forward_hook(lambda mod, inputs, out: out * 10)
    out = m(np.array([0.5, 3.0], np.float32))
    np.testing.assert_array_equal(out.numpy(), [0.0, 20.0])
    pre.remove()
    post.remove()
    np.testing.assert_array_equal(m(np.array([0.5], np.float32)).numpy(), [0.5])
    assert calls == ["pre"]
    assert list(m.state_dict()) == []


def test_zero_grad_is_deprecated_and_zeroes_in_place():
    m = M.Conv3d(1, 2, 2)
    gm = GradManager().attach(m.parameters())
    with gm:
        gm.backward(m(np.ones((1, 1, 2, 2, 2), np.float32)).sum())
    grad = m.weight.grad
    assert grad.numpy().any()
    with pytest.warns(DeprecationWarning):
        m.zero_grad()
    assert m.weight.grad is grad and not grad.numpy().any() and not m.bias.grad.numpy().any()


# ---- load_state_dict: MegEngine's messages, but atomic ------------------------------------------
def _conv():
    mge.random.seed(3)
    return M.Conv3d(2, 4, (3, 3, 2))


def _snapshot(m):
    return {k: np.array(v) for k, v in m.state_dict().items()}


def test_load_state_dict_shape_mismatch_is_atomic():
    m = _conv()
    before = _snapshot(m)
    bad = {"bias": np.full((1, 4, 1, 1, 1), 5, np.float32), "weight": np.zeros((4, 2, 3, 3, 3))}
    with pytest.raises(ValueError) as info:
        m.load_state_dict(bad)
    assert str(info.value) == (
        "param `weight` shape mismatch, should be (4, 2, 3, 3, 2), get (4, 2, 3, 3, 3)"
    )
    for key, value in m.state_dict().items():  # bias untouched (MegEngine overwrites it)
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_flat_bias_is_not_reshaped():
    m = _conv()
    sd = dict(_snapshot(m), bias=np.zeros(4, np.float32))
    with pytest.raises(
        ValueError, match=r"param `bias` shape mismatch, should be \(1, 4, 1, 1, 1\), get \(4,\)"
    ):
        m.load_state_dict(sd)


def test_load_state_dict_unused_and_missing_keys():
    m = _conv()
    before = _snapshot(m)
    changed = {k: v + 1 for k, v in before.items()}
    with pytest.raises(KeyError) as info:
        m.load_state_dict(dict(changed, extra=np.zeros(1)))
    assert info.value.args[0] == "Unused params violate `strict=True`, unused={'extra'}"
    with pytest.raises(KeyError) as info:
        m.load_state_dict({"weight": changed["weight"]})
    assert info.value.args[0] == "Missing params violate `strict=True`, missing={'bias'}"
    for key, value in m.state_dict().items():  # both failures changed nothing
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_non_strict_logs_and_keeps_missing(caplog):
    m = _conv()
    before = _snapshot(m)
    new_weight = before["weight"] * 2
    with caplog.at_level(logging.WARNING):
        m.load_state_dict({"weight": new_weight, "extra": np.zeros(1)}, strict=False)
    messages = [r.getMessage() for r in caplog.records]
    assert "Missing params in `strict=False` mode, missing={'bias'}" in messages
    assert "Unused params in `strict=False` mode, unused={'extra'}" in messages
    np.testing.assert_array_equal(m.weight.numpy(), new_weight)
    np.testing.assert_array_equal(m.bias.numpy(), before["bias"])


@pytest.mark.parametrize(
    "value", [lambda m: mge.tensor(m.weight.numpy()), lambda m: m.weight.numpy().tolist()]
)
def test_load_state_dict_rejects_non_arrays(value):
    m = _conv()
    before = _snapshot(m)
    sd = dict(before, weight=value(m))
    with pytest.raises(TypeError, match=r"closure should return a `np.ndarray`, now `weight` get"):
        m.load_state_dict(sd)
    np.testing.assert_array_equal(m.bias.numpy(), before["bias"])


def test_load_state_dict_rejects_non_dict():
    with pytest.raises(ValueError) as info:
        _conv().load_state_dict([1, 2])
    assert str(info.value) == "`state_dict` must load a dict or callable, got <class 'list'>"


def test_load_state_dict_callable_and_skip():
    m = _conv()
    before = _snapshot(m)
    seen = []

    def closure(key, tensor):
        seen.append((key, tensor.shape))
        return None if key == "bias" else np.ones(tensor.shape, np.float32)

    m.load_state_dict(closure, strict=False)
    assert seen == [("bias", (1, 4, 1, 1, 1)), ("weight", (4, 2, 3, 3, 2))]
    assert (m.weight.numpy() == 1).all()
    np.testing.assert_array_equal(m.bias.numpy(), before["bias"])
    with pytest.raises(KeyError, match="Missing params"):
        m.load_state_dict(closure)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_load_state_dict_keeps_parameter_dtype_and_copies(dtype):
    m = _conv()
    src = {k: np.ones(v.shape, dtype) for k, v in m.state_dict().items()}
    m.load_state_dict(src)
    src["weight"][...] = 5  # the module holds a copy
    for p in m.parameters():
        assert p.dtype == np.float32
        assert (p.numpy() == 1).all()


def test_load_state_dict_rejects_non_numeric_arrays():
    m = _conv()
    sd = dict(_snapshot(m), bias=np.zeros((1, 4, 1, 1, 1), dtype=object))
    with pytest.raises(TypeError, match="bias"):
        m.load_state_dict(sd)


def test_state_dict_round_trip_between_modules():
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


# ---- Sequential, Linear, ReLU, Identity ---------------------------------------------------------
def test_sequential_positional_and_ordered_dict(rng):
    layers = [M.Conv3d(1, 2, 3, padding=1), M.ReLU(), M.Conv3d(2, 1, 1)]
    seq = M.Sequential(*layers)
    assert repr(seq) == (
        "Sequential(\n  (0): Conv3d(1, 2, kernel_size=(3, 3, 3), padding=(1, 1, 1))\n"
        "  (1): ReLU()\n  (2): Conv3d(2, 1, kernel_size=(1, 1, 1))\n)"
    )
    assert list(seq.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert len(seq) == 3 and list(seq) == layers and seq[1] is layers[1]
    x = rng.standard_normal((1, 1, 4, 4, 4)).astype(np.float32)
    expected = layers[2](layers[1](layers[0](x)))
    np.testing.assert_array_equal(seq(x).numpy(), expected.numpy())

    named = M.Sequential(OrderedDict([("conv", layers[0]), ("act", layers[1])]))
    assert [n for n, _ in named.named_children()] == ["act", "conv"]
    assert repr(named).splitlines()[1].startswith("  (conv): Conv3d")
    assert list(named.state_dict()) == ["conv.bias", "conv.weight"]

    head = seq[:2]
    assert isinstance(head, M.Sequential) and head.layer_keys == ["0", "1"]
    del seq[1]
    assert seq.layer_keys == ["0", "2"] and len(seq) == 2
    seq[1] = M.Identity()
    assert isinstance(seq[1], M.Identity)
    with pytest.raises(TypeError, match="Sequential takes Modules"):
        M.Sequential(M.ReLU(), 3)


def test_sequential_sorts_state_keys_as_strings():
    seq = M.Sequential(*[M.Linear(1, 1, bias=False) for _ in range(11)])
    assert list(seq.state_dict())[:3] == ["0.weight", "1.weight", "10.weight"]


def test_linear_forward_and_init():
    mge.random.seed(0)
    m = M.Linear(400, 300)
    w = m.weight.numpy()
    assert abs(w.std() - np.sqrt(1 / 400)) < 0.03 * np.sqrt(1 / 400)
    assert not m.bias.numpy().any()
    x = np.random.default_rng(1).standard_normal((5, 400)).astype(np.float32)
    np.testing.assert_allclose(m(x).numpy(), x @ w.T, rtol=1e-5, atol=1e-5)
    assert repr(M.Linear(3, 2, bias=False)) == "Linear(in_features=3, out_features=2, bias=False)"
    with pytest.raises(ValueError, match="compute_mode"):
        M.Linear(3, 2, compute_mode="fast")


def test_relu_and_identity():
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    np.testing.assert_array_equal(M.ReLU()(x).numpy(), [0.0, 0.0, 3.0])
    assert M.Identity()(x) is x
    assert repr(M.ReLU()) == "ReLU()" and repr(M.Identity()) == "Identity()"
