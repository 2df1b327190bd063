"""Per-tap GEMM without im2col, for stride-1 dense convolutions.

The slab's padded input block is laid out channel-major and flat,
``flat (C, L)`` with ``L = nb*Dz*Hb*Wb`` (plus a zero tail). For kernel tap
``(a, b, e)`` the input each output needs is the same flat block shifted by
``off = a*dd*Hb*Wb + b*dh*Wb + e*dw``, so

    grid (O, L) += W[:, :, a, b, e] (O, C) @ flat[:, off : off + L]

computes the output on the block's (Dz, Hb, Wb) grid; the valid outputs are the
first (dz, Ho, Wo) corner of each item. The shifted operand is a window of the
flat buffer, passed to BLAS with leading dimension ``len(flat row)``: nothing is
copied and BLAS accumulates (``beta = 1``). Wasted work is the junk fringe,
``Dz*Hb*Wb / (dz*Ho*Wo) - 1``; the chooser avoids this algorithm where it is large.

Weight gradient per tap: ``dW[:, :, tap] += dy_grid (O, L) @ flat[:, off : off + L].T``
with ``dy_grid`` the output gradient embedded in the same grid (zeros on the fringe).
"""

from __future__ import annotations

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_f, gemm_nt_acc
from ._slabs import Slab, input_window, plan_slabs

NAME = "tapgemm"


def supports(geom: ConvGeometry) -> bool:
    return geom.G == 1 and geom.stride == (1, 1, 1)


def waste(geom: ConvGeometry) -> float:
    """Grid positions computed per useful output, for a whole-item slab."""
    _, lengths = input_window(geom, geom.spatial_out[0], 0)
    useful = geom.spatial_out[0] * geom.spatial_out[1] * geom.spatial_out[2]
    return lengths[0] * lengths[1] * lengths[2] / max(1, useful)


def _tail(geom: ConvGeometry, lengths) -> int:
    (kd, kh, kw), (dd, dh, dw) = geom.kernel, geom.dilation
    Hb, Wb = lengths[1], lengths[2]
    return (kd - 1) * dd * Hb * Wb + (kh - 1) * dh * Wb + (kw - 1) * dw


def _layout(geom: ConvGeometry, slab: Slab):
    starts, lengths = input_window(geom, slab.dz, slab.d0)
    grid = slab.nb * lengths[0] * lengths[1] * lengths[2]
    return starts, lengths, grid, grid + _tail(geom, lengths)


def _slabs(geom: ConvGeometry, itemsize: int, grads: bool = False):
    def cost(nb: int, dz: int) -> int:
        _, _, grid, total = _layout(geom, Slab(0, nb, 0, dz))
        return itemsize * (geom.C * total + geom.O * grid * (2 if grads else 1))

    return plan_slabs(geom, cost, config.workspace_bytes)


def _flat_block(x: np.ndarray, geom: ConvGeometry, slab: Slab):
    """Zero-padded channel-major block ``(C, total)`` and its (C, nb, Dz, Hb, Wb) view."""
    starts, lengths, grid, total = _layout(geom, slab)
    flat = np.zeros((geom.C, total), dtype=x.dtype)
    view = flat[:, :grid].reshape(geom.C, slab.nb, *lengths)
    # Copy the part of x inside the window; everything else stays zero (padding).
    src = [slice(slab.n0, slab.n1), slice(None)]
    dst = [slice(None), slice(None)]
    for axis in range(3):
        a0 = max(starts[axis], 0)
        a1 = min(starts[axis] + lengths[axis], x.shape[2 + axis])
        src.append(slice(a0, max(a0, a1)))
        dst.append(slice(a0 - starts[axis], max(a0, a1) - starts[axis]))
    view[tuple(dst)] = x[tuple(src)].transpose(1, 0, 2, 3, 4)
    return flat, lengths, grid


def _offsets(geom: ConvGeometry, lengths) -> list[int]:
    (kd, kh, kw), (dd, dh, dw) = geom.kernel, geom.dilation
    Hb, Wb = lengths[1], lengths[2]
    return [
        a * dd * Hb * Wb + b * dh * Wb + e * dw
        for a in range(kd)
        for b in range(kh)
        for e in range(kw)
    ]


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, C, isz = geom.O, geom.C, x.itemsize
    out = np.empty(geom.out_shape, dtype=x.dtype)
    # (K, O, C): each tap's (O, C) matrix contiguous = Fortran (C x O), ld = C.
    wt = np.ascontiguousarray(w.reshape(O, C, geom.taps).transpose(2, 0, 1))
    _, Ho, Wo = geom.spatial_out
    for slab in _slabs(geom, isz):
        flat, lengths, grid = _flat_block(x, geom, slab)
        acc = np.empty((O, grid), dtype=x.dtype)
        total = flat.shape[1]
        for t, off in enumerate(_offsets(geom, lengths)):
            # Fortran: acc^T (grid x O) (+)= flat_window^T (grid x C) @ W_t^T (C x O)
            gemm_f(
                x.dtype, False, False, grid, O, C,
                flat.ctypes.data + off * isz, total,
                wt.ctypes.data + t * O * C * isz, C,
                acc.ctypes.data, grid,
                0.0 if t == 0 else 1.0,
            )  # fmt: skip
        res = acc.reshape(O, slab.nb, *lengths)[:, :, : slab.dz, :Ho, :Wo]
        out[slab.n0 : slab.n1, :, slab.d0 : slab.d1] = res.transpose(1, 0, 2, 3, 4)
        del flat, acc, res  # free this slab's scratch before the next slab allocates
    return out


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, C, isz = geom.O, geom.C, x.itemsize
    o_rows = O <= C  # the operand with fewer rows goes second (see gemm_nt_acc)
    acc = np.zeros((geom.taps, C, O) if o_rows else (geom.taps, O, C), dtype=x.dtype)
    _, Ho, Wo = geom.spatial_out
    for slab in _slabs(geom, isz, grads=True):
        flat, lengths, grid = _flat_block(x, geom, slab)
        dyg = np.zeros((O, slab.nb, *lengths), dtype=x.dtype)
        part = dy[slab.n0 : slab.n1, :, slab.d0 : slab.d1]
        dyg[:, :, : slab.dz, :Ho, :Wo] = part.transpose(1, 0, 2, 3, 4)
        total = flat.shape[1]
        for t, off in enumerate(_offsets(geom, lengths)):
            window = (flat.ctypes.data + off * isz, total, C)
            grad = (dyg.ctypes.data, grid, O)
            first, second = (window, grad) if o_rows else (grad, window)
            # dW_t += dy_grid (O x grid) @ window.T (grid x C), in either orientation
            gemm_nt_acc(
                x.dtype, first[0], first[1], second[0], second[1],
                acc.ctypes.data + t * O * C * isz, first[2], second[2], grid,
            )  # fmt: skip
        del flat, dyg  # free this slab's scratch before the next slab allocates its own
    dwt = acc if o_rows else acc.transpose(0, 2, 1)  # (taps, C, O)
    return np.ascontiguousarray(dwt.transpose(2, 1, 0)).reshape(geom.w_shape)
