"""NCDHW <-> NDHWC copies: a blocked transpose on the engine's threads.

The engine computes in NCDHW; channels-last data is transposed in and out of it (see
``volconv/functional/_padding.py``). numpy's transposing copy of a large 5-D array walks
one side with a large stride and ran at ~0.5 GB/s here (16 x 8 x 28 x 28 x 256 float32,
100 MB: 197 ms); the same copy in 64 x 64 blocks, each item's ``(positions, channels)``
matrix transposed block by block on both cores, took 34 ms.
"""

from __future__ import annotations

import numpy as np

from ._numba_runtime import compile_once, engine_threads, numba_available, run_tasks

#: Block edge of the transpose (64 x 64 float32 is 16 KiB: both blocks stay in L1).
BLOCK = 64
#: Smaller arrays go through numpy (a thread hand-off costs more than their copy).
MIN_BYTES = 1 << 20


def _transpose_worker(task, ntasks, src, dst, block):  # pragma: no cover - compiled
    """``dst[n, j, i] = src[n, i, j]``, one ``block x block`` tile a step."""
    N, R, S = src.shape
    nbr = (R + block - 1) // block
    nbs = (S + block - 1) // block
    for item in range(task, N * nbr * nbs, ntasks):
        n = item // (nbr * nbs)
        rest = item % (nbr * nbs)
        i0 = (rest // nbs) * block
        j0 = (rest % nbs) * block
        i1 = min(R, i0 + block)
        j1 = min(S, j0 + block)
        s = src[n]
        d = dst[n]
        for j in range(j0, j1):
            row = d[j]
            for i in range(i0, i1):
                row[i] = s[i, j]


@compile_once
def _kernels() -> dict:
    import numba

    return {"transpose": numba.njit(cache=True, nogil=True)(_transpose_worker)}


def layout_shape(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    """An NCDHW ``shape`` as NDHWC when ``channels_last`` (as it is otherwise).

    Examples
    --------
    >>> layout_shape((2, 3, 4, 5, 6), channels_last=True)
    (2, 4, 5, 6, 3)
    """
    return (shape[0], *shape[2:], shape[1]) if channels_last else tuple(shape)


def transpose_channels(a: np.ndarray, to_last: bool, dtype=None) -> np.ndarray:
    """``a`` NCDHW -> NDHWC (``to_last``) or NDHWC -> NCDHW, as a new C-contiguous array
    of ``dtype`` (default ``a.dtype``).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(2 * 3 * 1 * 2 * 2, dtype=np.float32).reshape(2, 3, 1, 2, 2)
    >>> b = transpose_channels(a, to_last=True)
    >>> b.shape, bool((b == a.transpose(0, 2, 3, 4, 1)).all())
    ((2, 1, 2, 2, 3), True)
    >>> transpose_channels(b, to_last=False).shape
    (2, 3, 1, 2, 2)
    """
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    perm = (0, 2, 3, 4, 1) if to_last else (0, 4, 1, 2, 3)
    work = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    if a.nbytes < MIN_BYTES or not numba_available() or a.dtype.kind != "f":
        return np.ascontiguousarray(a.transpose(perm), dtype=dtype)
    a = np.ascontiguousarray(a, dtype=work if a.dtype != work else None)  # (a no-op if so)
    N = a.shape[0]
    C = a.shape[1] if to_last else a.shape[4]
    spatial = a.shape[2:] if to_last else a.shape[1:4]
    out = np.empty((N, *spatial, C) if to_last else (N, C, *spatial), dtype=work)
    positions = int(np.prod(spatial))
    src = a.reshape(N, C, positions) if to_last else a.reshape(N, positions, C)
    dst = out.reshape(N, positions, C) if to_last else out.reshape(N, C, positions)
    run_tasks(_kernels()["transpose"], engine_threads(), src, dst, BLOCK)
    return out if dtype == work else out.astype(dtype)
