"""conv3d and conv_transpose3d (forward and gradients) against outputs of real MegEngine 1.13.

The fixtures were made by ``tests/fixtures/megengine/make_fixtures.py`` under the
MegEngine oracle; see that folder's README.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import volconv as mge
import volconv.functional as F
from volconv.autodiff import GradManager

HERE = Path(__file__).parent / "fixtures" / "megengine"


def _load(stem):
    cases = json.loads((HERE / f"{stem}.json").read_text())
    return cases, np.load(HERE / f"{stem}.npz")


CONV_CASES, CONV_DATA = _load("conv3d_cases")
T_CASES, T_DATA = _load("conv_transpose3d_cases")


def _tol(y_ref, K):
    # MegEngine sums in float32 sequentially; we sum in another order: scale by sqrt(K).
    return 4 * np.finfo(np.float32).eps * np.sqrt(K) * max(1.0, float(np.abs(y_ref).max()))


def _run(fn, case, data, extra):
    key = case["key"]
    x = mge.Parameter(data[f"{key}_x"])
    w = mge.Parameter(data[f"{key}_w"])
    b = mge.Parameter(data[f"{key}_b"]) if case["has_bias"] else None
    params = [x, w] + ([b] if b is not None else [])
    gm = GradManager().attach(params)
    with gm:
        y = fn(x, w, b, stride=tuple(case["stride"]), padding=tuple(case["padding"]),
               dilation=tuple(case["dilation"]), groups=case["groups"], **extra)  # fmt: skip
        gm.backward(y, mge.tensor(data[f"{key}_dy"]))
    return y, params


def _check(case, data, y, params):
    key = case["key"]
    w = data[f"{key}_w"]
    K = int(np.prod(w.shape[-4:]))
    np.testing.assert_allclose(y.numpy(), data[f"{key}_y"], rtol=0, atol=_tol(data[f"{key}_y"], K))
    names = ["dx", "dw"] + (["db"] if case["has_bias"] else [])
    for name, p in zip(names, params, strict=True):
        ref = data[f"{key}_{name}"]
        assert p.grad.shape == ref.shape and p.grad.dtype == ref.dtype
        np.testing.assert_allclose(p.grad.numpy(), ref, rtol=0, atol=_tol(ref, ref.size))


@pytest.mark.parametrize("case", CONV_CASES, ids=[c["name"] for c in CONV_CASES])
def test_conv3d_matches_megengine(case):
    y, params = _run(F.conv3d, case, CONV_DATA, {})
    _check(case, CONV_DATA, y, params)


@pytest.mark.parametrize("case", T_CASES, ids=[c["name"] for c in T_CASES])
def test_conv_transpose3d_matches_megengine(case):
    extra = {"output_padding": tuple(case.get("output_padding", (0, 0, 0)))}
    y, params = _run(F.conv_transpose3d, case, T_DATA, extra)
    _check(case, T_DATA, y, params)
