"""Raw BLAS GEMM with accumulation and arbitrary leading dimensions.

``numpy.matmul`` cannot accumulate into its output and copies strided operands;
the per-tap convolution needs ``C += A @ B`` where ``B`` is a window of a larger
buffer. We call a Fortran ``sgemm``/``dgemm`` through ctypes on raw pointers, so no
operand is ever copied: numpy's own OpenBLAS where its symbol is found (numpy's wheels
export ``scipy_sgemm_64_``, ILP64), else SciPy's through ``scipy.linalg.cython_blas``.
Every operand is described in Fortran (column-major) terms: a C-ordered
``(rows, cols)`` block with row stride ``ld`` is a Fortran ``(cols, rows)`` matrix with
leading dimension ``ld``.

Threads: OpenBLAS's idle threads spin for ~0.1 s after each multithreaded call, taking a
core from whatever the engine runs on its own threads next. :func:`single_threaded_blas`
sets BLAS to one thread for a block (callers then split their GEMM stacks themselves);
:func:`own_threads` does that and also splits every :func:`gemm_f` / :func:`gemm_batch`
of the calling thread in halves over the engine's threads (not again inside those tasks).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.linalg.cython_blas as _cython_blas

_INT_MAX = 2**31 - 1


def _prototype(ctype, int_type):
    """ctypes prototype of a Fortran ``?gemm`` with ``int_type`` integers."""
    p_int = ctypes.POINTER(int_type)
    p_real = ctypes.POINTER(ctype)
    return ctypes.CFUNCTYPE(
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


def _load_scipy(name: str, ctype):
    """SciPy's Fortran ``?gemm`` (LP64) from ``scipy.linalg.cython_blas``."""
    capsule = _cython_blas.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return _prototype(ctype, ctypes.c_int)(address), ctype, ctypes.c_int


def _load_numpy(name: str, ctype):
    """numpy's own OpenBLAS ``?gemm`` (ILP64, as numpy's wheels bundle it), or None.

    Preferred: measured 15-40% faster than SciPy's bundled OpenBLAS on this engine's
    GEMMs (e.g. 221-228 vs 156-168 GFLOP/s at 128 x 1728 x 4096; numpy's is the newer
    build), and it is the library ``np.matmul`` already uses, so the engine drives one
    BLAS thread pool instead of two (see :func:`single_threaded_blas`).
    """
    try:
        try:
            import numpy._core._multiarray_umath as numpy_core
        except ImportError:  # numpy < 2
            import numpy.core._multiarray_umath as numpy_core  # type: ignore[no-redef]
        lib = ctypes.CDLL(numpy_core.__file__)
    except (OSError, ImportError):
        return None
    for symbol in (f"scipy_{name}_64_", f"scipy_{name}64_", f"{name}_64_", f"{name}64_"):
        address = ctypes.cast(getattr(lib, symbol, None) or 0, ctypes.c_void_p).value
        if address:
            return _prototype(ctype, ctypes.c_int64)(address), ctype, ctypes.c_int64
    return None


def _load(name: str, ctype):
    """``(function, real type, integer type)`` of the engine's ``?gemm``."""
    return _load_numpy(name, ctype) or _load_scipy(name, ctype)


_GEMM = {
    np.dtype(np.float32): _load("sgemm", ctypes.c_float),
    np.dtype(np.float64): _load("dgemm", ctypes.c_double),
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
    if _split_here() and max(m, n) >= SPLIT_MIN:
        _split_gemm(dtype, trans_a, trans_b, m, n, k, a_ptr, lda, b_ptr, ldb, c_ptr, ldc, beta)
        return
    fn, ctype, c_int = _GEMM[np.dtype(dtype)]
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


#: Smallest larger side of a GEMM that :func:`own_threads` splits over the threads.
SPLIT_MIN = 128
_split_local = threading.local()


def _split_here() -> bool:
    from ._numba_runtime import in_task

    return getattr(_split_local, "on", False) and not in_task()


@contextmanager
def own_threads() -> Iterator[None]:
    """Run the body with OpenBLAS at one thread and every :func:`gemm_f` of the calling
    thread split in halves over the engine's threads: no OpenBLAS thread is ever woken,
    so none is left spinning into the engine's own parallel work that follows."""
    with single_threaded_blas() as ok:
        saved = getattr(_split_local, "on", False)
        _split_local.on = ok
        try:
            yield
        finally:
            _split_local.on = saved


def _split_gemm(dtype, trans_a, trans_b, m, n, k, a_ptr, lda, b_ptr, ldb, c_ptr, ldc, beta):
    """:func:`gemm_f` in two halves of the longer side of ``C``, one per thread."""
    from ._numba_runtime import engine_threads, run_shares

    isz = np.dtype(dtype).itemsize

    def columns(n0: int, n1: int) -> None:
        b_off = n0 * isz if trans_b else n0 * ldb * isz
        gemm_f(dtype, trans_a, trans_b, m, n1 - n0, k, a_ptr, lda, b_ptr + b_off, ldb,
               c_ptr + n0 * ldc * isz, ldc, beta)  # fmt: skip

    def rows(m0: int, m1: int) -> None:
        a_off = m0 * lda * isz if trans_a else m0 * isz
        gemm_f(dtype, trans_a, trans_b, m1 - m0, n, k, a_ptr + a_off, lda, b_ptr, ldb,
               c_ptr + m0 * isz, ldc, beta)  # fmt: skip

    if n >= m:
        run_shares(columns, n, engine_threads(), per_thread=1)
    else:
        run_shares(rows, m, engine_threads(), per_thread=1)


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


def _operand(m: np.ndarray, isz: int) -> tuple[bool, int]:
    """``(transposed, leading dimension)`` of a matrix stack's last two axes, in the
    Fortran terms of :func:`gemm_f` (a C-ordered ``(rows, cols)`` block is a Fortran
    ``(cols, rows)`` matrix): row-major blocks need no transpose, column-major ones do.
    The stride of a length-1 axis is irrelevant (numpy may report anything there)."""
    rows, cols = m.shape[-2:]
    rs = m.strides[-2] if rows > 1 else max(1, cols) * isz
    cs = m.strides[-1] if cols > 1 else isz
    if cs == isz and rs % isz == 0 and rs >= max(1, cols) * isz:
        return False, rs // isz
    rs = m.strides[-2] if rows > 1 else isz
    cs = m.strides[-1] if cols > 1 else max(1, rows) * isz
    if rs == isz and cs % isz == 0 and cs >= max(1, rows) * isz:
        return True, cs // isz
    raise ValueError(f"GEMM operand with strides {m.strides} has no unit-stride axis")


def gemm_batch(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 0.0) -> None:
    """``c[i] = a[i] @ b[i] + beta * c[i]`` for stacks of row-major matrices.

    ``a (B, m, k)``, ``b (B, k, n)``, ``c (B, m, n)`` of one float dtype; each matrix needs
    one unit-stride axis (so transposed views work), ``c`` row-major; a batch stride of 0
    broadcasts. Unlike ``np.matmul`` it accumulates (``beta``) and takes any leading
    dimension; it calls the same ``?gemm`` as every other GEMM of the engine (one BLAS
    library: two OpenBLAS thread pools alternating measured 10-30x slower small GEMMs on
    2 busy cores). The ctypes arguments are built once per call, not per matrix.
    """
    B, m, k = a.shape
    n = b.shape[2]
    if b.shape != (B, k, n) or c.shape != (B, m, n):
        raise ValueError(f"gemm_batch shapes do not chain: {a.shape} @ {b.shape} -> {c.shape}")
    if _split_here() and max(m, n) >= SPLIT_MIN and k > 0:
        from ._numba_runtime import engine_threads, run_shares

        def share(lo: int, hi: int) -> None:  # columns of c, or rows where it is taller
            if n >= m:
                gemm_batch(a, b[:, :, lo:hi], c[:, :, lo:hi], beta)
            else:
                gemm_batch(a[:, lo:hi], b, c[:, lo:hi], beta)

        run_shares(share, max(m, n), engine_threads(), per_thread=1)
        return
    dtype = c.dtype
    if a.dtype != dtype or b.dtype != dtype:
        raise ValueError(f"gemm_batch dtypes differ: {a.dtype}, {b.dtype}, {c.dtype}")
    if min(B, m, n) == 0:
        return
    isz = dtype.itemsize
    trans_c, ldc = _operand(c, isz)
    if trans_c:
        raise ValueError("gemm_batch writes row-major results only")
    if k == 0:
        c[...] = 0 if beta == 0 else c * beta
        return
    trans_a, lda = _operand(a, isz)
    trans_b, ldb = _operand(b, isz)
    if max(m, n, k, lda, ldb, ldc) > _INT_MAX:
        raise ValueError(f"GEMM dimension exceeds the 32-bit BLAS limit: m={m} n={n} k={k}")
    fn, ctype, c_int = _GEMM[np.dtype(dtype)]
    byref = ctypes.byref
    # Fortran: c^T (n x m) = b^T (n x k) @ a^T (k x m)
    head = (
        b"T" if trans_b else b"N",
        b"T" if trans_a else b"N",
        byref(c_int(n)),
        byref(c_int(m)),
        byref(c_int(k)),
        byref(ctype(1.0)),
    )
    r_ldb, r_lda, r_beta, r_ldc = (
        byref(c_int(ldb)),
        byref(c_int(lda)),
        byref(ctype(beta)),
        byref(c_int(ldc)),
    )
    pa, pb, pc = a.ctypes.data, b.ctypes.data, c.ctypes.data
    sa, sb, sc = a.strides[0], b.strides[0], c.strides[0]
    for i in range(B):
        fn(*head, pb + i * sb, r_ldb, pa + i * sa, r_lda, r_beta, pc + i * sc, r_ldc)


# ------------------------------------------------------------ BLAS thread control
#
# OpenBLAS's worker threads spin for a while (~0.1 s) after every call before they
# sleep. An algorithm that alternates GEMMs with its own multi-threaded numba stages
# (Winograd: transform, GEMMs, transform, per block) therefore runs every transform with
# one core taken by a spinning BLAS thread: measured 20% slower on C3D conv3a than with
# single-threaded BLAS, GEMMs included. Such algorithms instead split their GEMM stacks
# over the engine's own threads, each calling a single-threaded BLAS
# (:func:`single_threaded_blas` around the whole call); every GEMM is then computed by
# one thread, in a fixed order, whichever thread runs it.

_THREAD_CONTROL: list | None = None


def _openblas_controls() -> list:
    """``(set, get)`` thread-count functions of numpy's and SciPy's OpenBLAS (the two
    libraries the engine calls), or ``[]`` when either cannot be controlled (another
    BLAS, an unknown symbol prefix): then nothing is split."""
    global _THREAD_CONTROL
    if _THREAD_CONTROL is not None:
        return _THREAD_CONTROL
    controls = []
    try:
        try:
            import numpy._core._multiarray_umath as numpy_core
        except ImportError:  # numpy < 2
            import numpy.core._multiarray_umath as numpy_core  # type: ignore[no-redef]
        libraries = (ctypes.CDLL(numpy_core.__file__), ctypes.CDLL(_cython_blas.__file__))
        for lib in libraries:
            pair = []
            for verb in ("set", "get"):
                names = [
                    f"{prefix}openblas_{verb}_num_threads{suffix}"
                    for prefix in ("scipy_", "")
                    for suffix in ("64_", "")
                ]
                fn = next((getattr(lib, n) for n in names if hasattr(lib, n)), None)
                if fn is None:
                    raise OSError(f"no openblas_{verb}_num_threads")
                fn.restype = None if verb == "set" else ctypes.c_int
                if verb == "set":
                    fn.argtypes = [ctypes.c_int]
                pair.append(fn)
            controls.append(tuple(pair))
    except (OSError, AttributeError, ImportError):
        controls = []
    _THREAD_CONTROL = controls
    return controls


@contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """Run the body with numpy's and SciPy's OpenBLAS at one thread each, restoring the
    previous counts after; yields whether that was possible (callers split their GEMMs
    over their own threads only then)."""
    controls = _openblas_controls()
    if not controls:
        yield False
        return
    saved = [get() for _, get in controls]
    for set_threads, _ in controls:
        set_threads(1)
    try:
        yield True
    finally:
        for (set_threads, _), n in zip(controls, saved, strict=True):
            set_threads(n)
