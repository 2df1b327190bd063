"""1x1x1 convolutions as plain GEMMs on the arrays themselves.

A 1x1x1 kernel with no padding needs no unfolding and no padded block: with ``x[n]``
seen as ``(G, Cg, P)`` (``P`` positions, a free reshape of C-ordered NCDHW),

- forward: ``y[n] (G, Og, P) = W (G, Og, Cg) @ x[n]``, written straight into ``y``
  (SciPy's BLAS through ``_blas.gemm_batch``, like the rest of the engine);
- input gradient: ``dx[n] = W^T @ dy[n]``;
- weight gradient: ``dW_g += dy[n, g] (Og, P) @ x[n, g]^T (P, Cg)``, accumulated by
  BLAS (``gemm_nt_acc``: the long position axis is the reduction).

So stride 1 allocates nothing besides the result (per-tap GEMM copied the input into
a channel-major block and the output back: two passes over memory for one GEMM).
A stride ``s`` reads every ``s``-th sample: the strided input (or the scattered input
gradient) and the slab's result go through slabs of output planes under the workspace
cap.
"""

from __future__ import annotations

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_batch, gemm_nt_acc
from ._slabs import Slab, plan_slabs

NAME = "pointwise"


def supports(geom: ConvGeometry) -> bool:
    """1x1x1 kernels without padding (any stride, dilation, groups)."""
    return geom.kernel == (1, 1, 1) and all(p == (0, 0) for p in geom.pads)


def _strided(geom: ConvGeometry) -> bool:
    return geom.stride != (1, 1, 1)


def _slabs(geom: ConvGeometry, itemsize: int):
    """Slabs of output planes whose gathered strided input fits the cap."""
    plane = (geom.C + geom.O) * geom.spatial_out[1] * geom.spatial_out[2] * itemsize
    return plan_slabs(geom, lambda nb, dz: nb * dz * plane, config.workspace_bytes)


def _gather(x: np.ndarray, geom: ConvGeometry, slab: Slab) -> np.ndarray:
    """``(nb, G, Cg, positions)``: the input samples the slab's outputs read."""
    sd, sh, sw = geom.stride
    Ho, Wo = geom.spatial_out[1:]
    part = x[slab.n0 : slab.n1, :, slab.d0 * sd : slab.d1 * sd : sd, : Ho * sh : sh, : Wo * sw : sw]
    return np.ascontiguousarray(part).reshape(slab.nb, geom.G, geom.Cg, -1)


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    G, Og, Cg = geom.G, geom.Og, geom.Cg
    wg = np.ascontiguousarray(w.reshape(G, Og, Cg))
    y = np.empty(geom.out_shape, dtype=x.dtype)
    if not _strided(geom):
        x = np.ascontiguousarray(x)
        for n in range(geom.N):
            gemm_batch(wg, x[n].reshape(G, Cg, -1), y[n].reshape(G, Og, -1))
        return y
    Ho, Wo = geom.spatial_out[1:]
    for slab in _slabs(geom, x.itemsize):
        xs = _gather(x, geom, slab)
        for i in range(slab.nb):
            res = np.empty((G, Og, xs.shape[3]), dtype=x.dtype)
            gemm_batch(wg, xs[i], res)
            y[slab.n0 + i, :, slab.d0 : slab.d1] = res.reshape(geom.O, slab.dz, Ho, Wo)
            del res
        del xs
    return y


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    G, Og, Cg = geom.G, geom.Og, geom.Cg
    wt = np.ascontiguousarray(w.reshape(G, Og, Cg).transpose(0, 2, 1))  # (G, Cg, Og)
    dy = np.ascontiguousarray(dy)
    if not _strided(geom):
        dx = np.empty(geom.in_shape, dtype=dy.dtype)
        for n in range(geom.N):
            gemm_batch(wt, dy[n].reshape(G, Og, -1), dx[n].reshape(G, Cg, -1))
        return dx
    # Stride s: only every s-th input sample is read, so only those get a gradient.
    dx = np.zeros(geom.in_shape, dtype=dy.dtype)
    sd, sh, sw = geom.stride
    Ho, Wo = geom.spatial_out[1:]
    for slab in _slabs(geom, dy.itemsize):
        for i in range(slab.nb):
            n = slab.n0 + i
            part = np.ascontiguousarray(dy[n, :, slab.d0 : slab.d1]).reshape(G, Og, -1)
            cols = np.empty((G, Cg, part.shape[2]), dtype=dy.dtype)
            gemm_batch(wt, part, cols)
            dx[n, :, slab.d0 * sd : slab.d1 * sd : sd, : Ho * sh : sh, : Wo * sw : sw] = (
                cols.reshape(geom.C, slab.dz, Ho, Wo)
            )
            del cols
    return dx


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    G, Og, Cg = geom.G, geom.Og, geom.Cg
    isz = x.itemsize
    dy = np.ascontiguousarray(dy)
    o_rows = Og <= Cg  # the operand with fewer rows goes second (see gemm_nt_acc)
    acc = np.zeros((G, Cg, Og) if o_rows else (G, Og, Cg), dtype=x.dtype)

    def accumulate(xs_n: np.ndarray, dy_n: np.ndarray) -> None:
        """``acc_g += dy_n[g] @ xs_n[g].T`` for every group (both ``(G, rows, P)``)."""
        P = xs_n.shape[2]
        for g in range(G):
            a, b = (xs_n[g], dy_n[g]) if o_rows else (dy_n[g], xs_n[g])
            gemm_nt_acc(
                x.dtype, a.ctypes.data, P, b.ctypes.data, P,
                acc[g].ctypes.data, a.shape[0], b.shape[0], P,
            )  # fmt: skip

    if not _strided(geom):
        x = np.ascontiguousarray(x)
        for n in range(geom.N):
            accumulate(x[n].reshape(G, Cg, -1), dy[n].reshape(G, Og, -1))
    else:
        for slab in _slabs(geom, isz):
            xs = _gather(x, geom, slab)
            for i in range(slab.nb):
                part = np.ascontiguousarray(dy[slab.n0 + i, :, slab.d0 : slab.d1])
                accumulate(xs[i], part.reshape(G, Og, -1))
            del xs
    dw = acc.transpose(0, 2, 1) if o_rows else acc  # (G, Og, Cg)
    return np.ascontiguousarray(dw).reshape(geom.w_shape)
