"""Raw BLAS GEMM with accumulation and arbitrary leading dimensions.

``numpy.matmul`` cannot accumulate into its output and copies strided operands;
the per-tap convolution needs ``C += A @ B`` where ``B`` is a window of a larger
buffer. SciPy exports the Fortran ``sgemm``/``dgemm`` of its BLAS through
``scipy.linalg.cython_blas``; we call them through ctypes on raw pointers, so
no operand is ever copied. Every operand is described in Fortran (column-major)
terms: a C-ordered ``(rows, cols)`` block with row stride ``ld`` is a Fortran
``(cols, rows)`` matrix with leading dimension ``ld``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import scipy.linalg.cython_blas as _cython_blas

_INT_MAX = 2**31 - 1


def _load(name: str, ctype):
    capsule = _cython_blas.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    p_int = ctypes.POINTER(ctypes.c_int)
    p_real = ctypes.POINTER(ctype)
    proto = ctypes.CFUNCTYPE(
        None,
        ctypes.c_char_p,
        ctypes.c_char_p,
        p_int,
        p_int,
        p_int,
        p_real,
        ctypes.c_void_p,
        p_int,
        ctypes.c_void_p,
        p_int,
        p_real,
        ctypes.c_void_p,
        p_int,
    )
    return proto(address)


_GEMM = {
    np.dtype(np.float32): (_load("sgemm", ctypes.c_float), ctypes.c_float),
    np.dtype(np.float64): (_load("dgemm", ctypes.c_double), ctypes.c_double),
}


def gemm_f(
    dtype: np.dtype,
    trans_a: bool,
    trans_b: bool,
    m: int,
    n: int,
    k: int,
    a_ptr: int,
    lda: int,
    b_ptr: int,
    ldb: int,
    c_ptr: int,
    ldc: int,
    beta: float,
) -> None:
    """Fortran-order ``C(m, n) = op(A) @ op(B) + beta * C`` on raw addresses.

    The caller keeps the arrays behind the pointers alive and sized; every
    dimension must fit the 32-bit BLAS interface (checked here).
    """
    if max(m, n, k, lda, ldb, ldc) > _INT_MAX:
        raise ValueError(
            f"GEMM dimension exceeds the 32-bit BLAS limit: m={m} n={n} k={k} "
            f"lda={lda} ldb={ldb} ldc={ldc}"
        )
    if m == 0 or n == 0:
        return
    fn, ctype = _GEMM[np.dtype(dtype)]
    c_int = ctypes.c_int
    fn(
        b"T" if trans_a else b"N",
        b"T" if trans_b else b"N",
        ctypes.byref(c_int(m)),
        ctypes.byref(c_int(n)),
        ctypes.byref(c_int(k)),
        ctypes.byref(ctype(1.0)),
        a_ptr,
        ctypes.byref(c_int(lda)),
        b_ptr,
        ctypes.byref(c_int(ldb)),
        ctypes.byref(ctype(beta)),
        c_ptr,
        ctypes.byref(c_int(ldc)),
    )


def gemm_nt_acc(
    dtype: np.dtype, a_ptr: int, lda: int, b_ptr: int, ldb: int, c_ptr: int, m: int, n: int, k: int
) -> None:
    """Row-major ``C (m x n) += A (m x k) @ B (n x k).T`` with row strides ``lda``, ``ldb``.

    This is the shape of every weight gradient: two operands that share their long
    reduction axis. OpenBLAS runs such long-``k`` products several times faster when
    its own ``m`` (here ``n``, the rows of ``B``) is the smaller side, so callers pass
    the operand with fewer rows as ``B`` and transpose the small result afterwards.
    """
    gemm_f(dtype, True, False, n, m, k, b_ptr, ldb, a_ptr, lda, c_ptr, n, 1.0)
