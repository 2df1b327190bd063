"""The demo (``make demo``) in its ``--quick`` form, and its building blocks."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np

import volconv
from volconv import demo


def test_make_volumes_is_deterministic_and_balanced():
    a = demo.make_volumes(5, size=12, rng=np.random.default_rng(3))
    b = demo.make_volumes(5, size=12, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    x, y = a
    assert x.shape == (15, 1, 12, 12, 12) and x.dtype == np.float32
    assert y.dtype == np.int32 and np.bincount(y).tolist() == [5, 5, 5]
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3, 4)), 1, rtol=1e-4)


def test_conv_flops_counts_every_layer():
    net = demo.ShapeNet(width=8)
    # 16^3 -> 16^3 (1->8), 8^3 (8->16), 4^3 (16->32); 27 taps each
    expect = 2 * 27 * (8 * 16**3 * 1 + 16 * 8**3 * 8 + 32 * 4**3 * 16)
    assert demo.conv_flops(net.convolutions(), (16, 16, 16)) == expect


def test_quick_demo_runs_and_writes_a_reloadable_checkpoint(tmp_path, capsys):
    t0 = time.perf_counter()
    rc = demo.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0, out
    assert elapsed < 30, f"--quick took {elapsed:.1f}s"
    assert "epoch  1/1" in out and "GFLOP/s" in out and "summary: held-out accuracy" in out
    assert "reloaded outputs identical" in out

    ckpt = tmp_path / demo.CHECKPOINT_NAME
    assert ckpt.is_file()
    state = volconv.load(str(ckpt))
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    fresh = demo.ShapeNet()
    fresh.load_state_dict(state)
    assert sorted(state) == sorted(fresh.state_dict())

    metrics = json.loads((tmp_path / demo.METRICS_NAME).read_text())
    assert metrics["reload_identical"] is True and len(metrics["history"]) == 1

    png = tmp_path / demo.FIGURE_NAME
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists() and "figure: skipped" in out
