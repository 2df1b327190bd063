"""Unfold H and W only, and accumulate one GEMM per depth tap: dense convolutions of any stride.

Full im2col copies every input sample ``kd*kh*kw`` times. Unfolding only the two
in-plane axes copies it ``kh*kw`` times and lets BLAS walk the depth taps:

    col (C*kh*kw, sd, Q, nb, Ho, Wo)   (input planes grouped by phase z mod sd)
    out (O, dz*nb*Ho*Wo) += W[:, :, a] (O, C*kh*kw) @ col[:, phase(a), q0(a) : q0(a) + dz]

For depth tap ``a`` the output planes ``i = 0..dz-1`` read input planes
``i*sd + a*dd``: all in phase ``(a*dd) mod sd`` at consecutive positions starting at
``(a*dd) // sd``, so with planes stored phase-major the operand is one contiguous
column window of ``col``, handed to BLAS with its leading dimension -- no copy, no
wasted output. Depth stride costs nothing (polyphase along D); H/W stride and dilation
are in the unfolding. The reduction per GEMM is ``K = C*kh*kw``, so this suits
layers with few or middling channels (stems, 5x5x5, dilated, factorised (2+1)D) where
per-tap GEMM (K = C) is too thin and full im2col copies too much.

Gradients use the same windows: ``dW[:, :, a] += dy @ window.T`` and, for the input,
``window += W[:, :, a].T @ dy`` followed by an in-plane col2im.
"""

from __future__ import annotations

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_f, gemm_nt_acc
from ._slabs import Slab, gather_block, input_window, plan_slabs, scatter_block_add

NAME = "hwunfold"


def supports(geom: ConvGeometry) -> bool:
    return geom.G == 1


def _leading_dim(row: int, itemsize: int) -> int:
    """Row stride of the column buffer: ``row`` rounded up to a cache line, and moved off
    multiples of 2 KiB -- rows a large power of two apart (64^3 volumes give 16 KiB)
    map to the same cache sets, and BLAS then runs several times slower."""
    line = 64 // itemsize
    ld = -(-row // line) * line
    if (ld * itemsize) % 2048 == 0:
        ld += line
    return ld


def _layout(geom: ConvGeometry, slab: Slab, itemsize: int = 4):
    """(starts, lengths, Q, row stride, window width) of a slab's column buffer."""
    starts, lengths = input_window(geom, slab.dz, slab.d0)
    sd = geom.stride[0]
    Q = -(-lengths[0] // sd)
    _, Ho, Wo = geom.spatial_out
    plane = slab.nb * Ho * Wo
    return starts, lengths, Q, _leading_dim(sd * Q * plane, itemsize), slab.dz * plane


def _column_buffer(geom: ConvGeometry, slab: Slab, dtype, zero: bool):
    """The ``(C*kh*kw, ld)`` buffer and its ``(C, kh, kw, sd, Q, nb, Ho, Wo)`` view."""
    _, _, Q, ld, _ = _layout(geom, slab, np.dtype(dtype).itemsize)
    kh, kw = geom.kernel[1:]
    _, Ho, Wo = geom.spatial_out
    shape = (geom.C, kh, kw, geom.stride[0], Q, slab.nb, Ho, Wo)
    buf = (np.zeros if zero else np.empty)((geom.C * kh * kw, ld), dtype=dtype)
    row = geom.stride[0] * Q * slab.nb * Ho * Wo
    view = buf[:, :row].reshape(shape)
    assert np.shares_memory(view, buf)
    return buf, view


def _cost(geom: ConvGeometry, itemsize: int):
    kh, kw = geom.kernel[1:]

    def cost(nb: int, dz: int) -> int:
        _, lengths, _, row, width = _layout(geom, Slab(0, nb, 0, dz))
        block = nb * geom.C * lengths[0] * lengths[1] * lengths[2]
        return itemsize * (block + geom.C * kh * kw * row + 2 * geom.O * width)

    return cost


def _slabs(geom: ConvGeometry, itemsize: int):
    return plan_slabs(geom, _cost(geom, itemsize), config.workspace_bytes)


def _phase_views(block: np.ndarray, geom: ConvGeometry, Q: int):
    """Per depth phase ``r``: a strided view ``(C, kh, kw, Q_r, nb, Ho, Wo)`` of the block."""
    sN, sC, sZ, sH, sW = block.strides
    Dz = block.shape[2]
    (kh, kw), (dh, dw) = geom.kernel[1:], geom.dilation[1:]
    sd, sh, sw = geom.stride
    _, Ho, Wo = geom.spatial_out
    nb, C = block.shape[:2]
    views = []
    for r in range(sd):
        Qr = max(0, -(-(Dz - r) // sd))
        shape = (C, kh, kw, Qr, nb, Ho, Wo)
        strides = (sC, sH * dh, sW * dw, sZ * sd, sN, sH * sh, sW * sw)
        base = block[:, :, r:] if Qr else block
        views.append(np.lib.stride_tricks.as_strided(base, shape, strides, writeable=True))
    return views


def _unfold(x: np.ndarray, geom: ConvGeometry, slab: Slab):
    starts, lengths, Q, ld, width = _layout(geom, slab, x.itemsize)
    block = gather_block(x, slab.n0, slab.n1, starts, lengths)
    col, colv = _column_buffer(geom, slab, x.dtype, zero=False)
    for r, view in enumerate(_phase_views(block, geom, Q)):
        np.copyto(colv[:, :, :, r, : view.shape[3]], view)
    return col, ld, width


def _windows(geom: ConvGeometry, slab: Slab):
    """Per depth tap: ``(a, first column of its window, first output column, width)``.

    Output planes whose input plane for this tap lies in the depth padding are left out
    of the window: their products are zeros, so skipping them only saves work (a third
    of all taps on C3D conv5a's two-plane input).
    """
    sd, dd = geom.stride[0], geom.dilation[0]
    lo, D = geom.pads[0][0], geom.spatial_in[0]
    _, Ho, Wo = geom.spatial_out
    plane = slab.nb * Ho * Wo
    Q = -(-input_window(geom, slab.dz, slab.d0)[1][0] // sd)
    for a in range(geom.kernel[0]):
        r, q0 = (a * dd) % sd, (a * dd) // sd
        # output plane d reads input plane d*sd + a*dd - lo, which must lie in [0, D)
        first = max(slab.d0, -(-(lo - a * dd) // sd))
        last = min(slab.d1, (D - 1 + lo - a * dd) // sd + 1)
        if last <= first:
            continue
        i0 = first - slab.d0
        yield a, (r * Q + q0 + i0) * plane, i0 * plane, (last - first) * plane


def _tap_weights(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``(kd, O, C*kh*kw)``: each depth tap's weight matrix, contiguous."""
    kd, kh, kw = geom.kernel
    return np.ascontiguousarray(w.reshape(geom.O, geom.C, kd, kh, kw).transpose(2, 0, 1, 3, 4))


def _dy_slab(dy: np.ndarray, slab: Slab) -> np.ndarray:
    """``dy`` of the slab as ``(O, dz, nb, Ho, Wo)``, the column order of the windows."""
    part = dy[slab.n0 : slab.n1, :, slab.d0 : slab.d1]
    return np.ascontiguousarray(part.transpose(1, 2, 0, 3, 4))


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, isz = geom.O, x.itemsize
    K = geom.C * geom.kernel[1] * geom.kernel[2]
    wa = _tap_weights(w, geom)
    out = np.empty(geom.out_shape, dtype=x.dtype)
    _, Ho, Wo = geom.spatial_out
    for slab in _slabs(geom, isz):
        col, row, width = _unfold(x, geom, slab)
        acc = np.zeros((O, slab.dz, slab.nb, Ho, Wo), dtype=x.dtype)
        for a, start, at, cols in _windows(geom, slab):
            # Fortran: acc^T (cols x O) += window^T (cols x K) @ W_a^T (K x O)
            gemm_f(
                x.dtype, False, False, cols, O, K,
                col.ctypes.data + start * isz, row,
                wa.ctypes.data + a * O * K * isz, K,
                acc.ctypes.data + at * isz, width,
                1.0,
            )  # fmt: skip
        out[slab.n0 : slab.n1, :, slab.d0 : slab.d1] = acc.transpose(2, 0, 1, 3, 4)
        del col, acc  # free this slab's scratch before the next slab allocates its own
    return out


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, isz = geom.O, x.itemsize
    kd, kh, kw = geom.kernel
    K = geom.C * kh * kw
    o_rows = O <= K  # the operand with fewer rows goes second (see gemm_nt_acc)
    acc = np.zeros((kd, K, O) if o_rows else (kd, O, K), dtype=x.dtype)
    for slab in _slabs(geom, isz):
        col, row, width = _unfold(x, geom, slab)
        dys = _dy_slab(dy, slab)
        for a, start, at, cols in _windows(geom, slab):
            window = (col.ctypes.data + start * isz, row, K)
            grad = (dys.ctypes.data + at * isz, width, O)
            first, second = (window, grad) if o_rows else (grad, window)
            # dW_a += dy (O x cols) @ window.T (cols x K), in either orientation
            gemm_nt_acc(
                x.dtype, first[0], first[1], second[0], second[1],
                acc.ctypes.data + a * O * K * isz, first[2], second[2], cols,
            )  # fmt: skip
        del col, dys  # free this slab's scratch before the next slab allocates its own
    dwa = acc if o_rows else acc.transpose(0, 2, 1)  # (kd, K, O)
    dw = dwa.reshape(kd, geom.C, kh, kw, O).transpose(4, 1, 0, 2, 3)
    return np.ascontiguousarray(dw).reshape(geom.w_shape)


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, isz = geom.O, dy.itemsize
    kd, kh, kw = geom.kernel
    K = geom.C * kh * kw
    wa = _tap_weights(w, geom)
    dx = np.zeros(geom.in_shape, dtype=dy.dtype)
    _, Ho, Wo = geom.spatial_out
    for slab in _slabs(geom, isz):
        starts, lengths, Q, row, width = _layout(geom, slab, isz)
        col, colv = _column_buffer(geom, slab, dy.dtype, zero=True)
        dys = _dy_slab(dy, slab)
        for a, start, at, cols in _windows(geom, slab):
            # Fortran: window^T (cols x K) += dy^T (cols x O) @ W_a (O x K)
            gemm_f(
                dy.dtype, False, True, cols, K, O,
                dys.ctypes.data + at * isz, width,
                wa.ctypes.data + a * O * K * isz, K,
                col.ctypes.data + start * isz, row,
                1.0,
            )  # fmt: skip
        block = np.zeros((slab.nb, geom.C, *lengths), dtype=dy.dtype)
        for r, view in enumerate(_phase_views(block, geom, Q)):
            # One in-plane tap at a time: within a tap the windows never overlap.
            for b in range(kh):
                for e in range(kw):
                    view[:, b, e] += colv[:, b, e, r, : view.shape[3]]
        scatter_block_add(dx, block, slab.n0, slab.n1, starts)
        del col, colv, block, dys
    return dx
