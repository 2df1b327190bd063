"""The engine's BLAS layer (``_blas.gemm_batch``), GEMM splitting, parallel copies and bias."""

from __future__ import annotations

import numpy as np
import pytest

from volconv.engine._blas import gemm_batch

SHAPES = [(3, 4, 5, 6), (1, 7, 1, 3), (5, 1, 9, 1), (2, 3, 0, 4), (2, 33, 17, 65)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,m,k,n", SHAPES)
def test_matches_matmul_in_every_layout(B, m, k, n, dtype):
    rng = np.random.default_rng(B * 1000 + m * 100 + k * 10 + n)
    a = rng.standard_normal((B, m, k)).astype(dtype)
    b = rng.standard_normal((B, k, n)).astype(dtype)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    tol = 8 * np.finfo(dtype).eps * max(1, k) * max(1.0, float(np.abs(ref).max()))
    c = np.full((B, m, n), np.nan, dtype=dtype)
    gemm_batch(a, b, c)
    np.testing.assert_allclose(c, ref, rtol=0, atol=tol)
    # Column-major operands (transposed views) and accumulation with beta = 1.
    a_t = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)
    b_t = np.ascontiguousarray(b.transpose(0, 2, 1)).transpose(0, 2, 1)
    gemm_batch(a_t, b_t, c, beta=1.0)
    np.testing.assert_allclose(c, 2 * ref, rtol=0, atol=2 * tol)
    # A batch stride of 0 broadcasts one matrix over the stack.
    c0 = np.empty_like(c)
    gemm_batch(np.broadcast_to(a[:1], a.shape), b, c0)
    np.testing.assert_allclose(c0, np.matmul(a[:1].astype(np.float64), b), rtol=0, atol=tol)


def test_row_strided_windows():
    """Sub-matrices of a larger buffer go to BLAS with their leading dimension."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2, 10, 12))
    a, b = big[:, 1:4, 2:7], big[:, 3:8, 1:6]
    c = np.zeros((2, 3, 5))
    gemm_batch(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-12, atol=1e-12)


def test_bad_operands_raise():
    a = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="do not chain"):
        gemm_batch(a, np.ones((2, 5, 6)), np.ones((2, 3, 6)))
    with pytest.raises(ValueError, match="dtypes differ"):
        gemm_batch(a, np.ones((2, 4, 6), np.float32), np.ones((2, 3, 6)))
    with pytest.raises(ValueError, match="unit-stride"):
        gemm_batch(np.ones((2, 6, 8))[:, ::2, ::2], np.ones((2, 4, 6)), np.ones((2, 3, 6)))
    with pytest.raises(ValueError, match="row-major"):
        gemm_batch(a, np.ones((2, 4, 6)), np.ones((2, 6, 3)).transpose(0, 2, 1))


def test_single_threaded_blas_restores_thread_counts():
    from volconv.engine import _blas

    controls = _blas._openblas_controls()
    before = [get() for _, get in controls]
    with _blas.single_threaded_blas() as split:
        assert split == bool(controls)
        assert all(get() == 1 for _, get in controls)
        with _blas.single_threaded_blas():  # nested (phases around Winograd) keeps 1
            pass
        assert all(get() == 1 for _, get in controls)
    assert [get() for _, get in controls] == before


@pytest.mark.parametrize("loader", ["_load_numpy", "_load_scipy"])
def test_both_blas_libraries_compute_the_same_gemm(loader, monkeypatch):
    """numpy's OpenBLAS is preferred, SciPy's is the fallback: both must give C = A @ B."""
    import ctypes

    from volconv.engine import _blas

    for dtype, name, ctype in (
        (np.float32, "sgemm", ctypes.c_float),
        (np.float64, "dgemm", ctypes.c_double),
    ):
        loaded = getattr(_blas, loader)(name, ctype)
        if loaded is None:
            pytest.skip("numpy's BLAS symbol is not exported by this numpy build")
        monkeypatch.setitem(_blas._GEMM, np.dtype(dtype), loaded)
        rng = np.random.default_rng(3)
        a = rng.standard_normal((2, 5, 7)).astype(dtype)
        b = rng.standard_normal((2, 7, 3)).astype(dtype)
        c = np.empty((2, 5, 3), dtype=dtype)
        gemm_batch(a, b, c)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)


def test_parallel_copy_matches_copyto():
    """``_slabs.copy_parallel`` (the im2col unfolding's copy, split over threads) gives
    exactly ``np.copyto``'s result along any axis, strided sources included."""
    from volconv.engine._slabs import PARALLEL_COPY_BYTES, copy_parallel

    rng = np.random.default_rng(3)
    src = rng.standard_normal((6, 40, 80, 90)).astype(np.float32)[:, ::2, 1::3, ::-1]
    assert src.nbytes >= PARALLEL_COPY_BYTES  # the threaded path
    for axis in range(src.ndim):
        dst = np.full(src.shape, np.nan, dtype=np.float32)
        copy_parallel(dst, src, axis=axis)
        np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_split_gemms_match_reference(dtype):
    """im2col with BLAS single-threaded and its GEMMs split over the engine's threads
    (columns in the forward, rows of the weight gradient) against float64."""
    from volconv import engine
    from volconv.engine import im2col
    from volconv.engine.reference import conv3d_reference

    geom = engine.conv_geometry(
        (2, 24, 12, 20, 20), (1, 32, 24, 3, 3, 3), (2, 2, 2), ((1, 1),) * 3, (1, 1, 1), 1
    )
    rng = np.random.default_rng(4)
    x = rng.standard_normal(geom.in_shape).astype(dtype)
    w = rng.standard_normal(geom.w_shape).astype(dtype)
    dy = rng.standard_normal(geom.out_shape).astype(dtype)
    eps = float(np.finfo(dtype).eps)
    ref = conv3d_reference(x, w, geom)
    y = im2col.forward(x, w, geom)
    assert np.abs(y - ref).max() <= 4 * eps * np.sqrt(geom.reduction) * np.abs(ref).max()
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    dw_ref = engine.ALGORITHMS["hwunfold"].backward_weight(x64, dy64, geom)  # independent
    dw = im2col.backward_weight(x, dy, geom)
    positions = geom.N * int(np.prod(geom.spatial_out))
    assert np.abs(dw - dw_ref).max() <= 4 * eps * np.sqrt(positions) * np.abs(dw_ref).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (2, 8, 16, 64, 64), (1, 1, 64, 64, 64)])
def test_channel_bias_and_sums_match_numpy(shape, dtype):
    """The engine's bias add and bias gradient (split over threads by channel for large
    arrays, as in the second and third shapes) against numpy's broadcast and sum."""
    from volconv import engine

    rng = np.random.default_rng(5)
    y = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    expected = y + bias.reshape(-1, 1, 1, 1)
    engine.add_channel_bias(y, bias)
    np.testing.assert_array_equal(y, expected)
    sums = engine.channel_sums(y)
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    ref = y.astype(np.float64).sum(axis=(0, 2, 3, 4))
    tol = 4 * np.finfo(dtype).eps * np.sqrt(y.size // shape[1]) * np.abs(y).sum(axis=(0, 2, 3, 4))
    assert np.all(np.abs(sums - ref) <= tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(300, 140, 37), (140, 300, 37), (130, 5, 9), (3, 4, 5)])
def test_own_threads_split_gemms_match(shape, dtype):
    """Under ``_blas.own_threads`` every GEMM of the calling thread is split in halves of
    its longer side over the engine's threads (BLAS single-threaded): same products, for
    each transpose of the raw ``gemm_f`` and for ``gemm_batch``; nested calls inside the
    tasks do not split again; the thread counts come back afterwards."""
    from volconv.engine import _blas

    m, n, k = shape
    rng = np.random.default_rng(m + n + k)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    tol = 8 * np.finfo(dtype).eps * k * max(1.0, float(np.abs(ref).max()))
    before = [get() for _, get in _blas._openblas_controls()]
    with _blas.own_threads():
        for ta in (False, True):
            for tb in (False, True):
                # row-major C (m x n) = A @ B is Fortran C^T (n x m) = B^T A^T; a
                # transposed operand is stored the other way round (op = T)
                A = np.ascontiguousarray(a.T if ta else a)
                B = np.ascontiguousarray(b.T if tb else b)
                c = np.full((m, n), np.nan, dtype=dtype)
                lda, ldb = A.shape[1], B.shape[1]
                _blas.gemm_f(dtype, tb, ta, n, m, k, B.ctypes.data, ldb, A.ctypes.data, lda,
                             c.ctypes.data, n, 0.0)  # fmt: skip
                np.testing.assert_allclose(c, ref, rtol=0, atol=tol)
        c3 = np.full((2, m, n), np.nan, dtype=dtype)
        _blas.gemm_batch(np.stack([a, a]), np.stack([b, b]), c3)
        np.testing.assert_allclose(c3, np.stack([ref, ref]), rtol=0, atol=tol)
    assert [get() for _, get in _blas._openblas_controls()] == before
