"""im2col by bounded output slabs: the general algorithm.

Works for every stride, padding, dilation and group count. For each slab the
input window is unfolded into ``col (G, Cg*K, P)`` (K kernel taps, P output
positions of the slab) and one batched GEMM over the group axis computes
``(G, Og, Cg*K) @ col``. Groups are the leading matmul axis, never a Python loop.

The two gradients reuse the same unfolding:
- weight: ``dW (G, Og, Cg*K) += dy_slab (G, Og, P) @ col.T``;
- input (col2im): ``cols = W.T @ dy_slab``, then each tap's rows are added back
  into the padded block through the same strided view, and the block into dx.

Every GEMM goes through the engine's one BLAS (``_blas.gemm_batch``, see ``_blas.py``):
with two OpenBLAS libraries in play (numpy's and SciPy's), alternating them in a
training step (this weight gradient after the in-plane unfolding's input gradient) left
one pool's threads spinning against the other's work: r2plus1d_spatial dx + dw measured
216-249 ms in a row against 125-140 ms for the two apart.

The forward and the weight gradient run under ``_blas.own_threads``: BLAS at one thread,
each GEMM split in halves over the engine's threads, which also copy the unfolding. No
OpenBLAS thread is then left spinning after a GEMM into the next slab's unfolding
(strided_down_s2 forward 59-62 against 65-68 ms, weight gradient 59-60 against 62-70,
same process).
"""

from __future__ import annotations

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_batch, own_threads
from ._slabs import (
    Slab,
    copy_parallel,
    gather_block,
    input_window,
    plan_slabs,
    scatter_block_add,
    tap_windows,
)

NAME = "im2col"


def _block_elems(geom: ConvGeometry, nb: int, dz: int) -> int:
    _, lengths = input_window(geom, dz, 0)
    return nb * geom.C * lengths[0] * lengths[1] * lengths[2]


def _cost(geom: ConvGeometry, itemsize: int):
    Ho, Wo = geom.spatial_out[1:]

    def cost(nb: int, dz: int) -> int:
        P = nb * dz * Ho * Wo
        return itemsize * (_block_elems(geom, nb, dz) + geom.C * geom.taps * P + 2 * geom.O * P)

    return cost


def _slabs(geom: ConvGeometry, itemsize: int) -> list[Slab]:
    return list(plan_slabs(geom, _cost(geom, itemsize), config.workspace_bytes))


def _col_buffer(geom: ConvGeometry, slabs: list[Slab], dtype) -> np.ndarray:
    """One flat buffer for every slab's im2col matrix (the first slab is the largest).

    Reused rather than allocated per slab: a fresh multi-MiB array is fresh pages from
    the kernel, and faulting them in cost as much as the unfolding itself
    (strided_down_s2: 34 ms of page faults and copy against 17 ms of copy)."""
    _, Ho, Wo = geom.spatial_out
    longest = max(s.nb * s.dz for s in slabs) * Ho * Wo
    return np.empty(geom.C * geom.taps * longest, dtype=dtype)


def _unfold(x: np.ndarray, geom: ConvGeometry, slab: Slab, buf: np.ndarray) -> np.ndarray:
    """The slab's im2col matrix ``(G, Cg*K, P)``, in ``buf``; the copy is split over
    the engine's threads by channel (numpy releases the GIL while copying)."""
    starts, lengths = input_window(geom, slab.dz, slab.d0)
    block = gather_block(x, slab.n0, slab.n1, starts, lengths)
    windows = tap_windows(block, geom, slab.dz)
    col = buf[: windows.size].reshape(windows.shape)
    copy_parallel(col, windows, axis=1)
    return col.reshape(geom.G, geom.Cg * geom.taps, -1)


def _dy_slab(dy: np.ndarray, geom: ConvGeometry, slab: Slab) -> np.ndarray:
    """``dy`` of the slab as ``(G, Og, P)`` with P ordered (n, z, h, w)."""
    part = dy[slab.n0 : slab.n1, :, slab.d0 : slab.d1]
    return np.ascontiguousarray(part.transpose(1, 0, 2, 3, 4)).reshape(geom.G, geom.Og, -1)


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``y = conv3d(x, w)`` for grouped weight ``w (G, Og, Cg, kd, kh, kw)``."""
    out = np.empty(geom.out_shape, dtype=x.dtype)
    w2 = np.ascontiguousarray(w.reshape(geom.G, geom.Og, -1))
    _, Ho, Wo = geom.spatial_out
    slabs = _slabs(geom, x.itemsize)
    buf = _col_buffer(geom, slabs, x.dtype)
    with own_threads():  # see the module docstring
        for slab in slabs:
            col = _unfold(x, geom, slab, buf)
            res = np.empty((geom.G, geom.Og, col.shape[2]), dtype=x.dtype)
            gemm_batch(w2, col, res)
            del col
            res = res.reshape(geom.O, slab.nb, slab.dz, Ho, Wo).transpose(1, 0, 2, 3, 4)
            out[slab.n0 : slab.n1, :, slab.d0 : slab.d1] = res
            del res  # free this slab's scratch before the next slab allocates its own
    return out


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dL/dw`` in grouped form, accumulated slab by slab."""
    # acc (G, CK, Og) += col (CK, P) @ dy_slab.T (P, Og): BLAS's m is Og, the smaller
    # side of a long-k product (see _blas.gemm_nt_acc).
    acc = np.zeros((geom.G, geom.Cg * geom.taps, geom.Og), dtype=x.dtype)
    slabs = _slabs(geom, x.itemsize)
    buf = _col_buffer(geom, slabs, x.dtype)
    with own_threads():
        for slab in slabs:
            col = _unfold(x, geom, slab, buf)
            gemm_batch(col, _dy_slab(dy, geom, slab).transpose(0, 2, 1), acc, beta=1.0)
            del col
    return np.ascontiguousarray(acc.transpose(0, 2, 1)).reshape(geom.w_shape)


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dL/dx`` (the transposed convolution) by GEMM and col2im."""
    dx = np.zeros(geom.in_shape, dtype=dy.dtype)
    wT = np.ascontiguousarray(w.reshape(geom.G, geom.Og, -1)).transpose(0, 2, 1)
    kd, kh, kw = geom.kernel
    for slab in _slabs(geom, dy.itemsize):
        dys = _dy_slab(dy, geom, slab)
        cols = np.empty((geom.G, wT.shape[1], dys.shape[2]), dtype=dy.dtype)
        gemm_batch(wT, dys, cols)
        del dys
        starts, lengths = input_window(geom, slab.dz, slab.d0)
        block = np.zeros((slab.nb, geom.C, *lengths), dtype=dy.dtype)
        windows = tap_windows(block, geom, slab.dz)
        cols = cols.reshape(windows.shape)
        # One tap at a time: within a tap the windows never overlap, so += is exact.
        for a in range(kd):
            for b in range(kh):
                for e in range(kw):
                    windows[:, :, a, b, e] += cols[:, :, a, b, e]
        scatter_block_add(dx, block, slab.n0, slab.n1, starts)
        del cols, block, windows
    return dx
