"""The extensions beyond MegEngine: 'same'/'valid', padding modes, channels-last, fp16/bf16.

Each result is checked three ways: against a float64 reference built here from ``np.pad``
and :func:`conv3d_reference` (always), against PyTorch outputs and gradients stored in
``tests/fixtures/torch`` (always), and against a live PyTorch when ``import torch`` works
(skipped otherwise). Gradients are checked by directional finite differences in float64,
which are exact up to rounding because the convolution is bilinear and padding is linear.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import volconv as mge
import volconv.functional as F
import volconv.module as M
from volconv import engine
from volconv.autodiff import GradManager
from volconv.engine._args import conv_geometry, triple
from volconv.engine.reference import conv3d_reference
from volconv.functional import _padding

try:
    import ml_dtypes
except ImportError:  # optional dependency
    ml_dtypes = None

NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
TORCH_DIR = Path(__file__).parent / "fixtures" / "torch"


# ---- the float64 reference -----------------------------------------------------------------
def ref_pads(padding, kernel, dilation):
    """(low, high) per axis, written out independently of volconv's resolver."""
    padding = padding.lower() if isinstance(padding, str) else padding
    if padding == "valid":
        return [(0, 0)] * 3
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in triple(padding, "padding", 0)]


def ref_conv(x, w, b, stride=1, padding=0, dilation=1, groups=1, mode="zeros", fmt="NCDHW"):
    """float64 conv3d: ``np.pad`` with the mode, then the direct reference without padding."""
    x = np.asarray(x, np.float64)
    if fmt == "NDHWC":
        x = x.transpose(0, 4, 1, 2, 3)
    w6 = np.asarray(w, np.float64)
    w6 = w6.reshape(1, *w6.shape) if groups == 1 else w6
    stride, dilation = triple(stride, "s", 1), triple(dilation, "d", 1)
    pads = ref_pads(padding, w6.shape[3:], dilation)
    xp = np.pad(x, [(0, 0), (0, 0), *pads], mode=NP_MODES[mode])
    geom = conv_geometry(xp.shape, w6.shape, stride, ((0, 0),) * 3, dilation, groups)
    y = conv3d_reference(xp, w6, geom)
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(1, -1, 1, 1, 1)
    return y.transpose(0, 2, 3, 4, 1) if fmt == "NDHWC" else y


def scale_tol(dtype, K, abs_ref, factor=4.0):
    """``factor * eps * sqrt(K) * max(|x| (*) |w|)``, as in ``cases.tolerance``."""
    return factor * _eps(dtype) * np.sqrt(K) * max(float(np.abs(abs_ref).max()), 1e-30)


def _eps(dtype) -> float:
    if np.dtype(dtype).name == "bfloat16":
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


# ---- the case table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ext:
    name: str
    x_shape: tuple  # NCDHW
    out_channels: int
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    mode: str = "zeros"
    fmt: str = "NCDHW"

    @property
    def w_shape(self):
        C, O, G = self.x_shape[1], self.out_channels, self.groups
        return (O, C, *self.kernel) if G == 1 else (G, O // G, C // G, *self.kernel)

    @property
    def K(self):
        return self.x_shape[1] // self.groups * int(np.prod(self.kernel))

    def arrays(self):
        rng = np.random.default_rng(sum(map(ord, self.name)))
        x = rng.standard_normal(self.x_shape)
        if self.fmt == "NDHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
        w = rng.standard_normal(self.w_shape)
        b = rng.standard_normal((1, self.out_channels, 1, 1, 1)) if self.bias else None
        return x, w, b

    def kwargs(self):
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, padding_mode=self.mode, format=self.fmt,
        )  # fmt: skip

    def ref(self, x, w, b):
        return ref_conv(x, w, b, self.stride, self.padding, self.dilation, self.groups,
                        self.mode, self.fmt)  # fmt: skip

    def geometry(self):
        """The engine geometry volconv runs (for choosing algorithms to force)."""
        w6 = self.w_shape if self.groups > 1 else (1, *self.w_shape)
        s, d = triple(self.stride, "s", 1), triple(self.dilation, "d", 1)
        pads = tuple(ref_pads(self.padding, self.kernel, d))
        if self.mode != "zeros":
            shape = [n + lo + hi for n, (lo, hi) in zip(self.x_shape[2:], pads, strict=True)]
            return conv_geometry((*self.x_shape[:2], *shape), w6, s, ((0, 0),) * 3, d, self.groups)
        return conv_geometry(self.x_shape, w6, s, pads, d, self.groups)


CASES = [
    # 'same' (zeros): odd, even, dilated, asymmetric kernels; passed to the engine as pads
    Ext("same_k3", (2, 3, 5, 6, 7), 4, (3, 3, 3), padding="same"),
    Ext("same_k4_even", (1, 2, 5, 6, 7), 3, (4, 4, 4), padding="same"),
    Ext("same_k2_many_ch", (1, 16, 4, 5, 6), 16, (2, 2, 2), padding="same"),
    Ext("same_k3_dil2", (1, 2, 7, 6, 8), 3, (3, 3, 3), padding="same", dilation=2),
    Ext("same_k2_dil3", (1, 2, 5, 7, 6), 2, (2, 2, 2), padding="SAME", dilation=3),
    Ext("same_asym", (1, 2, 6, 7, 5), 2, (1, 2, 5), padding="same", dilation=(1, 3, 1)),
    Ext("same_depthwise_even", (1, 4, 5, 5, 6), 4, (2, 3, 4), padding="same", groups=4),
    Ext("same_groups2", (1, 4, 5, 5, 6), 6, (2, 3, 2), padding="same", groups=2, bias=False),
    Ext("valid", (1, 2, 5, 6, 7), 3, (3, 2, 3), padding="valid", stride=(1, 2, 1)),
    # padding modes
    Ext("reflect_p1", (2, 2, 5, 6, 7), 3, (3, 3, 3), padding=1, mode="reflect"),
    Ext("reflect_asym_s2", (1, 2, 5, 6, 7), 3, (3, 3, 3), 2, (1, 2, 4), mode="reflect"),
    Ext("reflect_same_even", (1, 2, 5, 6, 7), 3, (4, 2, 3), padding="same", mode="reflect"),
    Ext("replicate_dil2", (1, 2, 5, 6, 7), 2, (3, 3, 3), padding=2, dilation=2, mode="replicate"),
    Ext("replicate_big_pad", (1, 1, 2, 3, 1), 2, (3, 3, 3), padding=(3, 1, 4), mode="replicate"),
    Ext("replicate_same", (1, 2, 7, 6, 8), 2, (3, 2, 3), padding="same", dilation=2,
        mode="replicate"),
    Ext("circular_g2", (1, 4, 5, 6, 7), 4, (3, 3, 3), padding=1, groups=2, mode="circular"),
    Ext("circular_pad_eq_size", (1, 2, 3, 4, 5), 2, (3, 3, 3), (1, 2, 1), (3, 4, 2),
        mode="circular"),
    Ext("circular_pad_gt_size", (1, 1, 2, 3, 2), 2, (3, 3, 3), padding=(3, 4, 5), mode="circular"),
    Ext("circular_same_k2", (1, 2, 4, 5, 6), 3, (2, 2, 2), padding="same", mode="circular"),
    Ext("zeros_explicit_mode", (1, 2, 4, 4, 4), 2, (3, 3, 3), padding=1, mode="zeros"),
    # channels-last
    Ext("ndhwc_p1", (2, 3, 4, 5, 6), 4, (3, 3, 3), padding=1, fmt="NDHWC"),
    Ext("ndhwc_s2_g3", (1, 6, 5, 6, 7), 3, (3, 2, 3), (2, 1, 2), (1, 0, 1), groups=3,
        fmt="NDHWC"),
    Ext("ndhwc_many_ch", (1, 16, 3, 4, 5), 16, (3, 3, 3), padding="same", fmt="NDHWC"),
    Ext("ndhwc_same_reflect", (1, 2, 5, 4, 6), 3, (3, 4, 3), padding="same", mode="reflect",
        fmt="NDHWC"),
    Ext("ndhwc_circular_dil", (1, 3, 4, 5, 6), 2, (2, 3, 2), padding=2, dilation=(2, 1, 2),
        mode="circular", fmt="NDHWC"),
    # channels-last 1x1x1: one GEMM on the NDHWC arrays (engine.channels_last)
    Ext("ndhwc_pointwise", (2, 5, 3, 4, 6), 7, (1, 1, 1), fmt="NDHWC"),
    Ext("ndhwc_pointwise_same_nobias", (1, 4, 2, 3, 5), 3, (1, 1, 1), padding="same",
        bias=False, fmt="NDHWC"),
]  # fmt: skip


def _algorithms(case):
    geom = case.geometry()
    return [a for a in engine.algorithms() if engine._supports(a, geom)]


PARAMS = [
    pytest.param(case, alg, id=f"{case.name}-{alg}") for case in CASES for alg in _algorithms(case)
]


def _run(fn, x, w, b, dy, dtype=np.float64, **kwargs):
    """y and the gradients of <y, dy> for x, w (and b) by GradManager."""
    params = [mge.Parameter(np.asarray(a).astype(dtype)) for a in (x, w, b) if a is not None]
    gm = GradManager().attach(params)
    with gm:
        y = fn(params[0], params[1], params[2] if b is not None else None, **kwargs)
        gm.backward(y, mge.tensor(np.asarray(dy).astype(dtype)))
    return y, [p.grad.numpy() for p in params]


def _directional_check(ref_fn, operands, dy, grads, rng):
    """``<grad_i, v> == d/dh <ref(a_i + h v), dy>`` (central difference, exact for linear ops)."""
    for i, g in enumerate(grads):
        v = rng.standard_normal(operands[i].shape)
        h = 1e-3
        plus, minus = list(operands), list(operands)
        plus[i], minus[i] = operands[i] + h * v, operands[i] - h * v
        fd = ((ref_fn(*plus) - ref_fn(*minus)) * dy).sum() / (2 * h)
        got = (g * v).sum()
        scale = np.abs(g).sum() * np.abs(v).max() + abs(fd) + 1e-12
        assert abs(got - fd) <= 1e-9 * scale, (i, got, fd)


# ---- forward and gradients against the float64 reference ------------------------------------
@pytest.mark.parametrize("case,alg", PARAMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_matches_reference(case, alg, dtype, algorithm):
    algorithm(alg)
    x, w, b = case.arrays()
    bc = None if b is None else b.astype(dtype)
    y = F.conv3d(x.astype(dtype), w.astype(dtype), bc, **case.kwargs())
    ref = case.ref(x, w, b)
    abs_ref = case.ref(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=scale_tol(dtype, case.K, abs_ref))


@pytest.mark.parametrize("case,alg", PARAMS)
def test_gradients_finite_differences(case, alg, algorithm, rng):
    algorithm(alg)
    x, w, b = case.arrays()
    dy = rng.standard_normal(case.ref(x, w, b).shape)
    _, grads = _run(F.conv3d, x, w, b, dy, **case.kwargs())
    operands = [a for a in (x, w, b) if a is not None]
    assert [g.shape for g in grads] == [a.shape for a in operands]
    _directional_check(
        lambda *a: case.ref(a[0], a[1], a[2] if b is not None else None), operands, dy, grads, rng
    )


def test_same_keeps_the_size_and_puts_the_odd_pad_high():
    x = np.zeros((1, 1, 4, 4, 4))
    x[0, 0, 0, 0, 0] = 1.0  # a delta in the low corner
    w = np.ones((1, 1, 2, 2, 2))
    y = F.conv3d(x, w, padding="same").numpy()
    assert y.shape == x.shape
    # pads (0, 1) per axis: output i sums inputs i, i+1 -> only output 0 sees the delta
    expected = np.zeros_like(x)
    expected[0, 0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(y, expected)
    assert F.conv3d(x, np.ones((1, 1, 3, 1, 2)), padding="valid").shape == (1, 1, 2, 4, 3)


def test_ndhwc_is_the_transposed_ncdhw_result():
    """To rounding: this layer's NDHWC GEMMs take their operands transposed (``y^T =
    W @ window`` against ``y = window^T @ W^T``), and BLAS need not sum those in the
    same order (OpenBLAS 0.3.31's dgemm edge kernels differ in the last bit on this
    batched slab). The numba transforms write NDHWC exactly (test_winograd,
    test_depthwinograd)."""
    case = CASES[0]
    x, w, b = case.arrays()
    assert engine.choose(case.geometry(), np.dtype(np.float64)) == "hwunfold"
    y = F.conv3d(x, w, b, padding="same").numpy()
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    y_cl = F.conv3d(x_cl, w, b, padding="same", format="NDHWC").numpy()
    assert y_cl.flags.c_contiguous
    eps = float(np.finfo(np.float64).eps)
    atol = 8 * eps * np.abs(y).max()
    np.testing.assert_allclose(y_cl, y.transpose(0, 2, 3, 4, 1), rtol=0, atol=atol)


# ---- the padding helper is the exact adjoint of np.pad ----------------------------------------
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad_backward_is_the_adjoint_of_pad(mode, rng):
    shape = (2, 1, 3, 4, 5)
    pads = ((2, 1), (0, 3), (4, 0)) if mode == "reflect" else ((4, 1), (0, 5), (7, 2))
    x = rng.standard_normal(shape)
    xp = _padding.pad(x, pads, mode)
    np.testing.assert_array_equal(xp, np.pad(x, [(0, 0), (0, 0), *pads], mode=NP_MODES[mode]))
    g = rng.standard_normal(xp.shape)
    gx = _padding.pad_backward(g, pads, mode)
    assert gx.shape == shape
    np.testing.assert_allclose((xp * g).sum(), (x * gx).sum(), rtol=1e-12)


# ---- against PyTorch: stored fixtures (always) and a live torch (when installed) ----------------
TORCH_META = json.loads((TORCH_DIR / "torch_cases.json").read_text())
TORCH_DATA = np.load(TORCH_DIR / "torch_cases.npz")


@pytest.mark.parametrize("case", TORCH_META, ids=[c["name"] for c in TORCH_META])
def test_torch_fixtures(case):
    key = case["key"]
    x, w, dy = (TORCH_DATA[f"{key}_{n}"] for n in ("x", "w", "dy"))
    b = TORCH_DATA[f"{key}_b"] if case["has_bias"] else None
    padding = case["padding"] if isinstance(case["padding"], str) else tuple(case["padding"])
    y, grads = _run(
        F.conv3d, x, w, b, dy, stride=tuple(case["stride"]), padding=padding,
        dilation=tuple(case["dilation"]), groups=case["groups"],
        padding_mode=case["padding_mode"], format=case["format"],
    )  # fmt: skip
    names = ["y", "dx", "dw"] + (["db"] if b is not None else [])
    for name, got in zip(names, [y.numpy(), *grads], strict=True):
        ref = TORCH_DATA[f"{key}_{name}"]
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c.fmt == "NCDHW"], ids=lambda c: c.name)
def test_live_torch(case):
    torch = pytest.importorskip("torch")
    pads = ref_pads(case.padding, case.kernel, triple(case.dilation, "d", 1))
    if case.mode == "circular" and any(
        max(p) > n for p, n in zip(pads, case.x_shape[2:], strict=True)
    ):
        pytest.skip("PyTorch refuses circular padding larger than the input; volconv repeats")
    x, w, b = case.arrays()
    w_t = w if case.groups == 1 else w.reshape(case.out_channels, *w.shape[2:])
    conv = torch.nn.Conv3d(
        case.x_shape[1], case.out_channels, case.kernel, case.stride,
        case.padding.lower() if isinstance(case.padding, str) else case.padding,
        case.dilation, case.groups, case.bias, padding_mode=case.mode, dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w_t))
        if b is not None:
            conv.bias.copy_(torch.from_numpy(b.ravel()))
    y_t = conv(torch.from_numpy(x)).detach().numpy()
    y = F.conv3d(x, w, b, **case.kwargs()).numpy()
    np.testing.assert_allclose(y, y_t, rtol=1e-10, atol=1e-10)


# ---- conv_transpose3d ---------------------------------------------------------------------------
def test_conv_transpose3d_same_is_the_adjoint_of_conv3d_same(rng):
    x = rng.standard_normal((1, 2, 5, 6, 4))
    w = rng.standard_normal((3, 2, 2, 3, 4))  # conv3d weight (O=3, C=2, k)
    y = F.conv3d(x, w, padding="same", dilation=(2, 1, 1)).numpy()
    u = rng.standard_normal(y.shape)
    # as a conv_transpose3d weight (Cin=3, Cout=2, k) the same array gives the adjoint
    xt = F.conv_transpose3d(u, w, padding="same", dilation=(2, 1, 1)).numpy()
    assert xt.shape == x.shape
    np.testing.assert_allclose((y * u).sum(), (x * xt).sum(), rtol=1e-12)
    assert F.conv_transpose3d(u, w, padding="valid").shape == (1, 2, 6, 8, 7)


def test_conv_transpose3d_ndhwc_forward_and_gradients(rng):
    x = rng.standard_normal((2, 3, 4, 3, 2))
    w = rng.standard_normal((3, 2, 3, 2, 3))  # (Cin, Cout, k)
    b = rng.standard_normal((1, 2, 1, 1, 1))
    kw = dict(stride=(2, 1, 2), padding=(1, 0, 1), output_padding=(1, 0, 0))
    ref = F.conv_transpose3d(x, w, b, **kw).numpy()
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    y = F.conv_transpose3d(x_cl, w, b, format="NDHWC", **kw).numpy()
    np.testing.assert_array_equal(y, ref.transpose(0, 2, 3, 4, 1))
    dy = rng.standard_normal(y.shape)
    _, grads = _run(F.conv_transpose3d, x_cl, w, b, dy, format="NDHWC", **kw)

    def ref_fn(xc, wc, bc):
        nc = np.ascontiguousarray(xc.transpose(0, 4, 1, 2, 3))
        out = F.conv_transpose3d(nc, wc, bc, **kw).numpy()
        return out.transpose(0, 2, 3, 4, 1)

    _directional_check(ref_fn, [x_cl, w, b], dy, grads, rng)


# ---- modules ----------------------------------------------------------------------------------
def test_module_defaults_leave_megengine_attributes_alone():
    m = M.Conv3d(2, 4, 3)
    assert "padding_mode" not in vars(m) and "format" not in vars(m)
    assert (m.padding_mode, m.format) == ("zeros", "NCDHW")
    assert repr(m) == "Conv3d(2, 4, kernel_size=(3, 3, 3))"
    t = M.ConvTranspose3d(2, 4, 3, padding_mode="zeros", format="NCDHW")
    assert "padding_mode" not in vars(t) and "format" not in vars(t)


def test_module_extensions_repr_and_forward(rng):
    m = M.Conv3d(2, 3, (2, 3, 4), padding="Same", padding_mode="circular", format="NDHWC")
    assert m.padding == "same" and m.padding_mode == "circular" and m.format == "NDHWC"
    assert repr(m) == (
        "Conv3d(2, 3, kernel_size=(2, 3, 4), padding='same', padding_mode='circular', "
        "format='NDHWC')"
    )
    x = rng.standard_normal((1, 5, 4, 6, 2)).astype(np.float32)
    y = m(x)
    assert y.shape == (1, 5, 4, 6, 3)
    ref = ref_conv(x, m.weight.numpy(), m.bias.numpy(), padding="same", mode="circular",
                   fmt="NDHWC")  # fmt: skip
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-5)
    assert repr(M.Conv3d(1, 1, 3, padding="valid")).endswith("padding='valid')")
    t = M.ConvTranspose3d(2, 3, 3, stride=2, format="NDHWC")
    assert repr(t) == (
        "ConvTranspose3d(2, 3, kernel_size=(3, 3, 3), stride=(2, 2, 2), format='NDHWC')"
    )
    assert t(np.ones((1, 2, 3, 4, 2), np.float32)).shape == (1, 5, 7, 9, 3)
    assert M.ConvTranspose3d(2, 3, 3, padding="same")(np.ones((1, 2, 3, 4, 5))).shape[2:] == (
        3, 4, 5,
    )  # fmt: skip


# ---- errors -----------------------------------------------------------------------------------
X = np.ones((1, 2, 4, 4, 4), np.float32)
W = np.ones((3, 2, 3, 3, 3), np.float32)
WT = np.ones((2, 3, 3, 3, 3), np.float32)

ERRORS = [
    ("same_stride", lambda: F.conv3d(X, W, stride=(1, 2, 1), padding="same"), ValueError,
     r"padding='same' is not supported for strided convolutions \(stride=\(1, 2, 1\)\)"),
    ("same_stride_transpose", lambda: F.conv_transpose3d(X, WT, stride=2, padding="same"),
     ValueError, r"conv_transpose3d: padding='same' is not supported for strided"),
    ("unknown_padding_string", lambda: F.conv3d(X, W, padding="full"), TypeError,
     r"padding must be an int, a sequence of 3 ints, 'same' or 'valid', got 'full'"),
    ("reflect_too_large", lambda: F.conv3d(X[:, :, :2], W, padding=2, padding_mode="reflect"),
     ValueError, r"reflect.*spatial axis 0 \(D\) has size 2 but padding \(2, 2\)"),
    ("reflect_equal_size", lambda: F.conv3d(X, W, padding=(1, 4, 1), padding_mode="reflect"),
     ValueError, r"spatial axis 1 \(H\) has size 4 but padding \(4, 4\)"),
    ("unknown_mode", lambda: F.conv3d(X, W, padding_mode="symmetric"), ValueError,
     r"padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', got 'symmetric'"),
    ("mode_case", lambda: F.conv3d(X, W, padding_mode="Reflect"), ValueError, r"got 'Reflect'"),
    ("unknown_format", lambda: F.conv3d(X, W, format="NHWDC"), ValueError,
     r"format must be 'NCDHW' or 'NDHWC', got 'NHWDC'"),
    ("format_channels", lambda: F.conv3d(X, W, format="NDHWC"), ValueError,
     r"channel mismatch: inp has 4 channels but the weight expects 2"),
    ("format_ndim", lambda: F.conv3d(X[0], W, format="NDHWC"), ValueError,
     r"inp must be 5-D \(N, D, H, W, C\)"),
    ("transpose_mode", lambda: F.conv_transpose3d(X, WT, padding_mode="reflect"), ValueError,
     r"conv_transpose3d supports only padding_mode='zeros'.*got 'reflect'"),
    ("transpose_unknown_mode", lambda: F.conv_transpose3d(X, WT, padding_mode="mirror"),
     ValueError, r"padding_mode must be one of"),
    ("transpose_format", lambda: F.conv_transpose3d(X, WT, format="ncdhw"), ValueError,
     r"format must be 'NCDHW' or 'NDHWC'"),
    ("positional_extension", lambda: F.conv3d(X, W, None, 1, 0, 1, 1, "cross_correlation",
                                              "reflect"), TypeError, r"positional"),
    ("module_same_stride", lambda: M.Conv3d(2, 3, 3, stride=2, padding="same"), ValueError,
     r"Conv3d: padding='same' is not supported for strided convolutions"),
    ("module_mode", lambda: M.Conv3d(2, 3, 3, padding_mode="wrap"), ValueError,
     r"Conv3d: padding_mode must be one of .* got 'wrap'"),
    ("module_format", lambda: M.Conv3d(2, 3, 3, format="NHWC"), ValueError,
     r"Conv3d: format must be"),
    ("module_transpose_mode", lambda: M.ConvTranspose3d(2, 3, 3, padding_mode="circular"),
     ValueError, r"ConvTranspose3d supports only padding_mode='zeros'"),
    ("module_reflect_at_forward",
     lambda: M.Conv3d(2, 3, 3, padding=4, padding_mode="reflect")(X), ValueError,
     r"spatial axis 0 \(D\) has size 4 but padding \(4, 4\)"),
]  # fmt: skip


@pytest.mark.parametrize("make,error,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---- dtypes -----------------------------------------------------------------------------------
HALF = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes is not None else [])
LAYERS = [  # (x_shape, w_shape, kwargs): a stem, a dense 3^3 layer, a depthwise one
    ((1, 1, 6, 7, 8), (4, 1, 3, 3, 3), dict(padding="same", padding_mode="replicate")),
    ((1, 24, 4, 5, 6), (16, 24, 3, 3, 3), dict(padding=1)),
    ((2, 6, 5, 5, 5), (6, 1, 1, 3, 3, 3), dict(padding=1, groups=6, format="NDHWC")),
]


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_half_precision_error_bounds(dtype, layer, rng):
    if dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        dtype = ml_dtypes.bfloat16
    x_shape, w_shape, kw = LAYERS[layer]
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    if kw.get("format") == "NDHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    xh, wh = x.astype(dtype), w.astype(dtype)
    y = F.conv3d(xh, wh, **kw)
    assert y.dtype == dtype
    got = y.numpy().astype(np.float64)
    K = int(np.prod(w_shape[-4:]))
    eps, eps32 = _eps(dtype), float(np.finfo(np.float32).eps)

    def ref(a, b):
        return ref_conv(a, b.reshape(w_shape), None, groups=kw.get("groups", 1),
                        padding=kw["padding"], mode=kw.get("padding_mode", "zeros"),
                        fmt=kw.get("format", "NCDHW"))  # fmt: skip

    abs_ref = ref(np.abs(x), np.abs(w))
    # 1. the arithmetic: float32 accumulation (random walk, sqrt(K)) + one final rounding
    exact = ref(xh.astype(np.float64), wh.astype(np.float64))
    bound = eps / 2 * np.abs(exact) + scale_tol(np.float32, K, abs_ref)
    assert np.all(np.abs(got - exact) <= bound)
    # 2. end to end against float64 on the unrounded data: input rounding adds eps * |x|(*)|w|
    rel = np.abs(got - ref(x, w)).max() / np.abs(abs_ref).max()
    assert rel <= 1.01 * eps + eps / 2 + 4 * eps32 * np.sqrt(K)
    # 3. the half-precision result is the float32 result on the same values, rounded once
    y32 = F.conv3d(xh.astype(np.float32), wh.astype(np.float32), **kw).numpy()
    np.testing.assert_array_equal(y.numpy(), y32.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_gradients_keep_the_dtype(dtype):
    if dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        dtype = ml_dtypes.bfloat16
    x = mge.Parameter(np.ones((1, 4, 3, 4, 2), dtype))
    w = mge.Parameter(np.ones((3, 2, 2, 2, 2), dtype))
    b = mge.Parameter(np.zeros((1, 3, 1, 1, 1), dtype))
    gm = GradManager().attach([x, w, b])
    with gm:
        y = F.conv3d(x, w, b, padding="same", padding_mode="reflect", format="NDHWC")
        assert y.dtype == dtype
        gm.backward(y.sum())
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    # output (1, 4, 3, 4, 3): the bias and every weight tap (all inputs are ones,
    # padding included) get the number of outputs per channel
    np.testing.assert_array_equal(np.asarray(b.grad.numpy(), np.float64), 4 * 3 * 4)
    np.testing.assert_array_equal(np.asarray(w.grad.numpy(), np.float64), 4 * 3 * 4)
    xt = mge.Parameter(np.ones((1, 2, 3, 3, 3), dtype))
    gm = GradManager().attach([xt])
    with gm:
        yt = F.conv_transpose3d(xt, np.ones((2, 1, 2, 2, 2), dtype), stride=2)
        assert yt.dtype == dtype
        gm.backward(yt.sum())
    assert xt.grad.dtype == dtype


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_bfloat16_dtype_rules():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert F.nn.resolve_dtypes(("inp", bf16), ("weight", bf16)) == (bf16, np.float32)
    assert F.nn.resolve_dtypes(("inp", bf16), ("weight", np.dtype(np.float32))) == (
        np.float32, np.float32,
    )  # fmt: skip
    assert F.nn.resolve_dtypes(("inp", bf16), ("weight", np.dtype(np.float16))) == (
        np.float32, np.float32,
    )  # fmt: skip
    assert F.nn.resolve_dtypes(("inp", bf16), ("weight", np.dtype(np.float64))) == (
        np.float64, np.float64,
    )  # fmt: skip
    # accumulation in float32: 300 ones sum to 300 (bfloat16 itself stops at 256)
    x = np.ones((1, 300, 1, 1, 1), bf16)
    assert float(F.conv3d(x, x).numpy().astype(np.float32).ravel()[0]) == 300.0


# ---- channels-last 1x1x1 without a transpose ----------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5, 1, 1, 1), ()])
def test_ndhwc_pointwise_takes_the_native_path(dtype, bias_shape, monkeypatch, rng):
    """Default chooser: an NDHWC 1x1x1 layer goes through ``engine.ndhwc_*`` (no
    transpose), and its output and gradients equal the NCDHW computation's."""
    calls = []
    for name in ("ndhwc_forward", "ndhwc_backward_input", "ndhwc_backward_weight"):
        real = getattr(engine, name)
        monkeypatch.setattr(
            engine,
            name,
            lambda *a, real=real, name=name, **k: (calls.append(name), real(*a, **k))[1],
        )
    x = rng.standard_normal((2, 3, 4, 5, 6))  # NDHWC, 6 channels
    w = rng.standard_normal((5, 6, 1, 1, 1))
    b = None if bias_shape is None else rng.standard_normal(bias_shape)
    dy = rng.standard_normal((2, 3, 4, 5, 5))
    y, grads = _run(F.conv3d, x, w, b, dy, dtype=dtype, format="NDHWC")
    assert calls == ["ndhwc_forward", "ndhwc_backward_weight", "ndhwc_backward_input"]
    xt, dyt = x.transpose(0, 4, 1, 2, 3), dy.transpose(0, 4, 1, 2, 3)
    y_ref, g_ref = _run(F.conv3d, xt, w, b, dyt, dtype=dtype)  # NCDHW: the engine's path
    assert y.dtype == dtype and y.shape == (2, 3, 4, 5, 5)
    tol = 0 if dtype == np.float64 else (1e-5 if dtype == np.float32 else 1e-2)
    scale = max(1.0, float(np.abs(y_ref.numpy()).max()))
    np.testing.assert_allclose(
        y.numpy(), y_ref.numpy().transpose(0, 2, 3, 4, 1), rtol=tol, atol=tol * scale + 1e-12
    )
    np.testing.assert_allclose(
        grads[0], g_ref[0].transpose(0, 2, 3, 4, 1), rtol=tol, atol=tol * scale * 10 + 1e-12
    )
    for got, want in zip(grads[1:], g_ref[1:], strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 100 + 1e-10)


def test_ndhwc_native_path_only_where_it_applies(algorithm):
    one = (1, 1, 1)
    pw = conv_geometry((1, 6, 3, 4, 5), (1, 5, 6, 1, 1, 1), one, ((0, 0),) * 3, one, 1)
    assert engine.channels_last(pw)
    for stride, pads, groups in [((2, 1, 1), ((0, 0),) * 3, 1), (one, ((1, 1),) * 3, 1),
                                 (one, ((0, 0),) * 3, 2)]:  # fmt: skip
        w_shape = (groups, 6 // groups, 6 // groups, 1, 1, 1)
        geom = conv_geometry((1, 6, 3, 4, 5), w_shape, stride, pads, one, groups)
        assert not engine.channels_last(geom)
    algorithm("im2col")  # a forced algorithm is honoured: NCDHW between transposes
    assert not engine.channels_last(pw)


def test_ndhwc_native_where_winograd_or_the_unfolding_is_chosen(algorithm, monkeypatch):
    """3x3x3 layers are computed channels-last where the forward is Winograd's, or where
    the forward and both gradients are the in-plane unfolding's (few channels; a strided
    layer whose gradients it computes too); not where it is im2col's, nor under a forced
    other algorithm or autotuning."""
    from volconv.engine import _autotune, hwunfold, winograd

    if not winograd.numba_available():
        pytest.skip("numba is not installed")
    one, pads = (1, 1, 1), ((1, 1),) * 3
    dense = conv_geometry((1, 16, 16, 16, 16), (1, 16, 16, 3, 3, 3), one, pads, one, 1)
    few = conv_geometry((1, 3, 12, 12, 12), (1, 16, 3, 3, 3, 3), one, pads, one, 1)
    strided = conv_geometry((1, 16, 12, 12, 12), (1, 16, 16, 3, 3, 3), (2, 2, 2), pads, one, 1)
    algorithm(None)
    assert engine.channels_last(dense, np.float32)
    assert engine.channels_last(dense, np.float64)
    assert engine.choose(few, np.dtype(np.float32)) == hwunfold.NAME
    assert engine.channels_last(few, np.float32)
    assert engine.choose(strided, np.dtype(np.float32)) == "im2col"  # (plane by plane)
    assert not engine.channels_last(strided, np.float32)
    # the unfolding's forward, but polyphase's dx: x and dy would each be transposed twice
    down = conv_geometry((1, 32, 16, 32, 32), (1, 32, 32, 3, 3, 3), (2, 2, 2), pads, one, 1)
    assert engine.choose(down, np.dtype(np.float32)) == hwunfold.NAME
    assert engine._input_gradient_route(down, np.float32)[0] == "polyphase"
    assert not engine.channels_last(down, np.float32)
    algorithm("hwunfold")
    assert engine.channels_last(strided, np.float32)
    algorithm("im2col")
    assert not engine.channels_last(few, np.float32)
    algorithm(None)
    monkeypatch.setattr(_autotune, "active", lambda: True)
    assert not engine.channels_last(dense, np.float32)
    monkeypatch.undo()
    algorithm("im2col")
    assert not engine.channels_last(dense, np.float32)
    algorithm("winograd")
    assert engine.channels_last(dense, np.float32)


@pytest.mark.parametrize("to_last", [True, False])
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(np.float32, None), (np.float64, None), (np.float16, np.float32), (np.float32, np.float16)],
)
@pytest.mark.parametrize("contiguous", [True, False])
def test_blocked_channel_transpose(to_last, dtype, out_dtype, contiguous, monkeypatch, rng):
    """The blocked NCDHW <-> NDHWC copy (every size: the numpy cut-off set to 0) equals
    numpy's transposing copy, on ragged block edges and non-contiguous input too."""
    from volconv.engine import _layout

    monkeypatch.setattr(_layout, "MIN_BYTES", 0)
    base = rng.standard_normal((2, 70, 3, 5, 9)).astype(dtype)  # 70: a ragged 64-block
    a = base if contiguous else base[:, :, :, ::-1]
    got = _layout.transpose_channels(a, to_last=to_last, dtype=out_dtype)
    perm = (0, 2, 3, 4, 1) if to_last else (0, 4, 1, 2, 3)
    want = np.ascontiguousarray(a.transpose(perm), dtype=out_dtype or dtype)
    assert got.dtype == want.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
