"""volconv.dask: block-wise convolution of dask arrays and zarr volumes equals F.conv3d."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import volconv.dask as vd  # noqa: E402
import volconv.functional as F  # noqa: E402

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _compare(x, w, chunks, bias=None, dtype=np.float32, seed=0, **kw):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x).astype(dtype)
    w = rng.standard_normal(w).astype(dtype)
    ref = F.conv3d(x, w, bias, **kw).numpy()
    y = vd.conv3d(da.from_array(x, chunks=chunks), w, bias, **kw)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    got = y.compute(scheduler="threads")
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = max(float(np.abs(ref).max()), 1.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL[dtype] * scale)
    return y


# (input shape, weight shape, dask chunks, F.conv3d keyword arguments)
CASES = {
    "odd_chunks": ((1, 2, 10, 11, 12), (3, 2, 3, 3, 3), (1, 2, 4, 5, 3), {"padding": 1}),
    "valid": ((2, 2, 10, 11, 12), (3, 2, 3, 3, 3), (1, 2, 4, 5, 3), {"padding": 0}),
    "stride2": ((1, 2, 10, 11, 12), (3, 2, 3, 3, 3), (1, 2, 4, 4, 6), {"padding": 1, "stride": 2}),
    "stride2_odd_chunks": (
        (1, 2, 10, 11, 12), (3, 2, 3, 3, 3), (1, 2, 5, 3, 7), {"padding": 1, "stride": 2},
    ),
    "stride122_asym": (
        (1, 2, 10, 11, 12), (3, 2, 2, 3, 4), (1, 2, 4, 4, 4),
        {"padding": (1, 2, 0), "stride": (1, 2, 2)},
    ),
    "stride3_big_pad": (
        (1, 2, 9, 9, 9), (2, 2, 3, 3, 3), (1, 2, 3, 3, 6), {"padding": 4, "stride": 3},
    ),
    "dilation_same_even": (
        (1, 2, 13, 11, 12), (3, 2, 2, 4, 3), (1, 2, 4, 4, 5),
        {"padding": "same", "dilation": (2, 1, 3)},
    ),
    "pad_larger_than_chunks": ((1, 1, 7, 7, 7), (2, 1, 3, 3, 3), (1, 1, 2, 2, 2), {"padding": 5}),
    "one_by_one": ((1, 4, 6, 7, 8), (5, 4, 1, 1, 1), (1, 4, 3, 3, 3), {}),
    "groups": ((1, 4, 8, 9, 7), (2, 3, 2, 3, 1, 3), (1, 4, 3, 4, 5), {"padding": 1, "groups": 2}),
    "depthwise": (
        (1, 3, 8, 9, 7), (3, 1, 1, 3, 3, 3), (1, 3, 5, 4, 3), {"padding": 1, "groups": 3},
    ),
    "ndhwc": (
        (2, 8, 9, 7, 4), (5, 4, 3, 3, 3), (1, 3, 4, 5, 4),
        {"padding": (1, 0, 2), "stride": (2, 1, 1), "format": "NDHWC"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_in_memory(case, dtype):
    x, w, chunks, kw = CASES[case]
    _compare(x, w, chunks, dtype=dtype, **kw)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "kw",
    [
        {"padding": (1, 2, 1)},
        {"padding": "same", "dilation": 2},
        {"padding": 1, "stride": (1, 2, 2)},
    ],
    ids=["asym", "same_dil", "strided"],
)
def test_padding_modes(mode, kw):
    _compare((1, 2, 10, 11, 12), (3, 2, 4, 3, 2), (1, 2, 4, 5, 4), padding_mode=mode, **kw)


def test_padding_modes_channels_last_float64():
    for mode in ("reflect", "circular"):
        _compare(
            (1, 9, 8, 7, 2), (3, 2, 3, 3, 3), (1, 4, 3, 3, 2), dtype=np.float64,
            padding=2, padding_mode=mode, format="NDHWC",
        )  # fmt: skip


def test_circular_padding_wider_than_the_volume():
    _compare((1, 1, 5, 4, 6), (2, 1, 3, 3, 3), (1, 1, 2, 2, 3), padding=7, padding_mode="circular")


def test_bias_and_chunked_batch():
    y = _compare((3, 2, 8, 8, 8), (4, 2, 3, 3, 3), (2, 2, 4, 4, 4), bias=np.arange(4.0), padding=1)
    assert y.chunks[0] == (2, 1)
    _compare((1, 2, 6, 6, 6), (4, 2, 3, 3, 3), (1, 2, 3, 3, 3), bias=0.5, padding=1)


def test_output_chunks_follow_the_input_chunks():
    x = da.zeros((1, 1, 12, 12, 12), chunks=(1, 1, 4, 6, 12), dtype=np.float32)
    w = np.ones((2, 1, 3, 3, 3), dtype=np.float32)
    assert vd.conv3d(x, w, padding="same").chunks == ((1,), (2,), (4, 4, 4), (6, 6), (12,))
    assert vd.conv3d(x, w, padding=1, stride=2).chunks[2:] == ((2, 2, 2), (3, 3), (6,))
    assert vd.conv3d(x, w).chunks[2:] == ((4, 4, 2), (6, 4), (10,))


def test_halo():
    assert vd.halo(3, padding=1) == ((1, 1),) * 3
    assert vd.halo((2, 5, 3), padding="same", dilation=(1, 1, 2)) == ((0, 1), (2, 2), (2, 2))
    assert vd.halo(3, stride=2, padding=1) == ((1, 0),) * 3
    assert vd.halo(3, stride=(1, 1, 2), padding=0) == ((0, 2), (0, 2), (0, 1))


def test_threaded_and_sync_schedulers_agree():
    rng = np.random.default_rng(5)
    x = da.from_array(rng.standard_normal((1, 2, 9, 9, 9)), chunks=(1, 2, 4, 4, 4))
    y = vd.conv3d(x, rng.standard_normal((3, 2, 3, 3, 3)), padding=1)
    np.testing.assert_array_equal(
        y.compute(scheduler="threads"), y.compute(scheduler="synchronous")
    )


def test_import_volconv_does_not_import_dask():
    code = "import sys, volconv, volconv.functional, volconv.bench; print('dask' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"


def test_errors():
    w = np.ones((2, 2, 3, 3, 3), dtype=np.float32)
    x = da.zeros((1, 2, 8, 8, 8), chunks=(1, 1, 4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="channel axis .* single chunk"):
        vd.conv3d(x, w)
    with pytest.raises(TypeError, match="dask array"):
        vd.conv3d(np.zeros((1, 2, 8, 8, 8), dtype=np.float32), w)
    x = x.rechunk({1: -1})
    with pytest.raises(ValueError, match="reflect"):
        vd.conv3d(x, w, padding=8, padding_mode="reflect")
    with pytest.raises(ValueError, match="same"):
        vd.conv3d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="channel mismatch"):
        vd.conv3d(x, np.ones((2, 3, 3, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="padding_mode"):
        vd.conv3d(x, w, padding_mode="wrap")


def test_distributed_local_cluster():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 12, 10, 9)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    ref = F.conv3d(x, w, b, padding=1, stride=(2, 1, 1), padding_mode="circular").numpy()
    x2 = rng.standard_normal((1, 16, 6, 7, 5)).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 3, 3, 3)).astype(np.float32)  # shipped as one task
    ref2 = F.conv3d(x2, w2, padding="same").numpy()
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        y = vd.conv3d(
            da.from_array(x, chunks=(1, 2, 4, 5, 4)), w, b, padding=1, stride=(2, 1, 1),
            padding_mode="circular",
        )  # fmt: skip
        y2 = vd.conv3d(da.from_array(x2, chunks=(1, 16, 3, 4, 5)), w2, padding="same")
        got, got2 = client.compute([y, y2], sync=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_allclose(got2, ref2, rtol=0, atol=2e-5 * np.abs(ref2).max())


@pytest.fixture
def zarr_src(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 12, 12, 10)).astype(np.float32)
    src = zarr.open_array(
        str(tmp_path / "in.zarr"), mode="w", shape=x.shape, chunks=(1, 2, 4, 4, 5), dtype="f4"
    )
    src[:] = x
    return src, x


def test_zarr_round_trip(tmp_path, zarr_src):
    zarr = pytest.importorskip("zarr")
    src, x = zarr_src
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 3, 3, 3)).astype(np.float32)
    ref = F.conv3d(x, w, padding=1, stride=(1, 2, 1)).numpy()
    out = vd.conv3d_zarr(
        str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), w, padding=1, stride=(1, 2, 1)
    )
    assert out.chunks == (1, 3, 4, 2, 5)  # the computation's blocks: aligned, lock-free writes
    back = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_allclose(back[:], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_zarr_uneven_blocks_and_delayed(tmp_path, zarr_src):
    src, x = zarr_src
    w = np.ones((2, 2, 3, 3, 3), dtype=np.float32)
    ref = F.conv3d(x, w, padding=2, padding_mode="replicate").numpy()  # last blocks are larger
    writes = vd.conv3d_zarr(
        src, str(tmp_path / "out.zarr"), w, padding=2, padding_mode="replicate",
        chunks=(8, 4, 10), compute=False,
    )  # fmt: skip
    dask.compute(writes, scheduler="threads")
    zarr = pytest.importorskip("zarr")
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.chunks == (1, 2, 8, 4, 12) and out.shape == ref.shape == (1, 2, 14, 14, 12)
    np.testing.assert_allclose(out[:], ref, rtol=0, atol=1e-4)


def test_out_of_core_bench(tmp_path, capsys):
    pytest.importorskip("zarr")
    from volconv.bench import main

    report = tmp_path / "r.json"
    argv = ["--out-of-core", "--size", "20", "--chunk", "8", "--out-channels", "2",
            "--workdir", str(tmp_path), "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(report.read_text())
    assert result["max_rel_err"] < 1e-5 and result["memory"]["tree_peak_gib"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the zarr data are deleted
    assert "peak RSS" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(40))
def test_random_geometries(seed):
    """Random chunkings, kernels, strides, dilations, paddings and modes."""
    rng = np.random.default_rng(1000 + seed)
    kernel = tuple(int(k) for k in rng.integers(1, 4, 3))
    dilation = tuple(int(d) for d in rng.integers(1, 3, 3))
    mode = str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
    if rng.random() < 0.3:
        stride, padding = 1, "same"
    else:
        stride = tuple(int(s) for s in rng.integers(1, 4, 3))
        padding = tuple(int(p) for p in rng.integers(0, 4, 3))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    shape = [int(rng.integers(max(e, 5), 13)) for e in extent]
    chunks = tuple(int(rng.integers(1, n + 1)) for n in shape)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "padding_mode": mode}
    _compare((1, 2, *shape), (3, 2, *kernel), (1, 2, *chunks), seed=seed, **kw)
