"""1x1x1 and depth-only (kd x 1 x 1) convolutions as plain GEMMs on the arrays themselves.

A 1x1x1 kernel with no padding needs no unfolding and no padded block: with ``x[n]``
seen as ``(G, Cg, P)`` (``P`` positions, a free reshape of C-ordered NCDHW),

- forward: ``y[n] (G, Og, P) = W (G, Og, Cg) @ x[n]``, written straight into ``y``
  (through ``_blas.gemm_batch``, the engine's one BLAS);
- input gradient: ``dx[n] = W^T @ dy[n]``;
- weight gradient: ``dW_g += dy[n, g] (Og, P) @ x[n, g]^T (P, Cg)``, accumulated by
  BLAS (``gemm_nt_acc``: the long position axis is the reduction).

So stride 1 allocates nothing besides the result (per-tap GEMM copied the input into
a channel-major block and the output back: two passes over memory for one GEMM).
Depth-only kernels ``(kd, 1, 1)`` (R(2+1)D's temporal layers) without in-plane padding
are ``kd`` such GEMMs per item, each on a column window of the flattened ``x[n]`` and
``y[n]`` (tap ``a`` shifts the planes by ``a*dd - lo``; :func:`_depth_taps`), accumulated
by BLAS into a zeroed ``y``. Measured on r2plus1d_temporal (144 -> 64, 4x16x56x56): dx
62 vs 114 ms and dw 67 vs 103 for the in-plane unfolding, forward level (110 ms).

A stride ``s`` reads every ``s``-th sample: the strided input (or the scattered input
gradient) and the slab's result go through slabs of output planes under the workspace
cap.
"""

from __future__ import annotations

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_batch, gemm_f, gemm_nt_acc
from ._slabs import Slab, plan_slabs

NAME = "pointwise"


def supports(geom: ConvGeometry) -> bool:
    """1x1x1 kernels without padding (any stride, dilation, groups), and depth-only
    kernels ``(kd, 1, 1)`` without in-plane padding (stride 1, one group, any depth
    padding and dilation: see :func:`_depth_taps`)."""
    kd, kh, kw = geom.kernel
    if (kh, kw) != (1, 1) or geom.pads[1:] != ((0, 0), (0, 0)):
        return False
    if kd == 1:
        return geom.pads[0] == (0, 0)
    return geom.stride == (1, 1, 1) and geom.G == 1


def _depth_taps(geom: ConvGeometry):
    """``(tap, z0, z1, zi0)`` per depth tap of a stride-1 ``(kd, 1, 1)`` kernel: output
    planes ``z0 <= z < z1`` read input plane ``z + zi0 - z0``. On items flattened to
    ``(channels, planes*H*W)`` every tap is then one GEMM over a contiguous column
    window of ``x`` and of ``y`` (R(2+1)D's temporal 3x1x1 layers: no copy at all)."""
    D, Do = geom.spatial_in[0], geom.spatial_out[0]
    lo, dd = geom.pads[0][0], geom.dilation[0]
    taps = []
    for a in range(geom.kernel[0]):
        shift = a * dd - lo  # input plane = output plane + shift
        z0, z1 = max(0, -shift), min(Do, D - shift)
        if z1 > z0:
            taps.append((a, z0, z1, z0 + shift))
    return taps


def _ordered_taps(geom: ConvGeometry, planes: int, input_side: bool):
    """``(taps, zero_first)``: the taps with one that covers all ``planes`` output (or,
    for the input gradient, input) planes first, so that its GEMM can overwrite a fresh
    ``np.empty`` result (``beta = 0``) instead of accumulating into a zeroed one (the
    zeros would cost a pass, and first-touch page faults inside BLAS's threads); when no
    tap covers them all the result must be zeroed first."""
    taps = _depth_taps(geom)
    for i, (_, z0, z1, zi0) in enumerate(taps):
        lo, hi = (zi0, zi0 + z1 - z0) if input_side else (z0, z1)
        if lo == 0 and hi == planes:
            return [taps[i]] + taps[:i] + taps[i + 1 :], False
    return taps, True


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


def _depth_gemms(src: np.ndarray, w: np.ndarray, geom: ConvGeometry, adjoint: bool):
    """The forward (``adjoint=False``: ``src = x``, result ``y``) or the input gradient
    (``adjoint=True``: ``src = dy``, result ``dx``) of a depth-only kernel: per item and
    tap ``a`` one GEMM between column windows of the flattened ``src[n]`` and result,
    ``res[:, planes] (+)= W_a @ src[:, planes + shift]`` or ``W_a.T @ ...``."""
    O, C, isz = geom.O, geom.C, src.itemsize
    HW = geom.spatial_in[1] * geom.spatial_in[2]
    D, Do = geom.spatial_in[0], geom.spatial_out[0]
    wt = np.ascontiguousarray(w.reshape(O, C, -1).transpose(2, 0, 1))  # (kd, O, C)
    src = np.ascontiguousarray(src)
    planes, shape, width = (D, geom.in_shape, C) if adjoint else (Do, geom.out_shape, O)
    src_planes, k = (Do, O) if adjoint else (D, C)
    taps, zero_first = _ordered_taps(geom, planes, input_side=adjoint)
    res = (np.zeros if zero_first else np.empty)(shape, dtype=src.dtype)
    for n in range(geom.N):
        for i, (a, z0, z1, zi0) in enumerate(taps):
            s0, r0 = (z0, zi0) if adjoint else (zi0, z0)  # first src / result plane
            # Fortran: res_n[:, r0:]^T (L x width) (+)= src_n[:, s0:]^T (L x k) @ op(W_a)
            # with op(W_a) = W_a^T (C x O) forward, W_a (O x C) for the gradient.
            gemm_f(
                src.dtype, False, adjoint, (z1 - z0) * HW, width, k,
                src[n].ctypes.data + s0 * HW * isz, src_planes * HW,
                wt[a].ctypes.data, C,
                res[n].ctypes.data + r0 * HW * isz, planes * HW,
                1.0 if i or zero_first else 0.0,
            )  # fmt: skip
    return res


def _depth_backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    O, C, isz = geom.O, geom.C, x.itemsize
    HW = geom.spatial_in[1] * geom.spatial_in[2]
    D, Do = geom.spatial_in[0], geom.spatial_out[0]
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    o_rows = O <= C  # the operand with fewer rows goes second (see gemm_nt_acc)
    kd = geom.kernel[0]
    acc = np.zeros((kd, C, O) if o_rows else (kd, O, C), dtype=x.dtype)
    for n in range(geom.N):
        for a, z0, z1, zi0 in _depth_taps(geom):
            xs = (x[n].ctypes.data + zi0 * HW * isz, D * HW)
            ds = (dy[n].ctypes.data + z0 * HW * isz, Do * HW)
            first, second = (xs, ds) if o_rows else (ds, xs)
            rows = (C, O) if o_rows else (O, C)
            # dW_a += dy_n[:, z0:z1] (O x L) @ x_n[:, zi0:].T (L x C), in either orientation
            gemm_nt_acc(
                x.dtype, first[0], first[1], second[0], second[1],
                acc[a].ctypes.data, rows[0], rows[1], (z1 - z0) * HW,
            )  # fmt: skip
    dw = acc.transpose(2, 1, 0) if o_rows else acc.transpose(1, 2, 0)  # (O, C, kd)
    return np.ascontiguousarray(dw).reshape(geom.w_shape)


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    if geom.kernel[0] > 1:
        return _depth_gemms(x, w, geom, adjoint=False)
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
    if geom.kernel[0] > 1:
        return _depth_gemms(dy, w, geom, adjoint=True)
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
    if geom.kernel[0] > 1:
        return _depth_backward_weight(x, dy, geom)
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


# --------------------------------------------------------------------- channels last
#
# In NDHWC ("channels-last") a dense, stride-1, unpadded 1x1x1 layer is one GEMM on the
# arrays exactly as they are, ``(positions, C) @ (C, O)``, and a depth-only ``(kd, 1, 1)``
# layer (stride 1, no in-plane padding) is ``kd`` GEMMs per item on row windows of the
# flattened ``(planes*H*W, channels)`` arrays (tap ``a`` shifts the planes, as in NCDHW's
# column windows): no transpose in or out, so a chain of such layers (with Winograd's
# 3x3x3 / 1x3x3 layers: R(2+1)D's blocks) in NDHWC never changes layout. (Other layers
# are computed in NCDHW, between two transposes: see volconv/functional/_padding.py.)


def channels_last(geom: ConvGeometry) -> bool:
    """Whether the layer's NDHWC form is computed here without a transpose: dense
    stride-1 layers with a 1x1x1 kernel and no padding, or a ``(kd, 1, 1)`` kernel
    without in-plane padding (any depth padding and dilation)."""
    one = (1, 1, 1)
    if geom.G != 1 or geom.stride != one or geom.kernel[1:] != (1, 1):
        return False
    if geom.pads[1:] != ((0, 0), (0, 0)):
        return False
    return geom.kernel[0] > 1 or geom.pads[0] == (0, 0)


def _rows(a: np.ndarray, channels: int) -> np.ndarray:
    """``a (N, D, H, W, channels)`` as a C-ordered ``(positions, channels)`` matrix."""
    return np.ascontiguousarray(a).reshape(-1, channels)


def _depth_gemms_channels_last(src: np.ndarray, w: np.ndarray, geom: ConvGeometry, adjoint: bool):
    """:func:`_depth_gemms` in NDHWC: per item and tap ``a`` one GEMM between row windows
    of the flattened ``src[n] (planes*H*W, k)`` and result, ``res[planes] (+)= src[planes +
    shift] @ W_a^T`` (forward) or ``@ W_a`` (input gradient)."""
    O, C = geom.O, geom.C
    HW = geom.spatial_in[1] * geom.spatial_in[2]
    D, Do = geom.spatial_in[0], geom.spatial_out[0]
    wt = np.ascontiguousarray(w.reshape(O, C, -1).transpose(2, 0, 1), dtype=src.dtype)
    planes, width = (D, C) if adjoint else (Do, O)
    src_planes, k = (Do, O) if adjoint else (D, C)
    src = np.ascontiguousarray(src).reshape(geom.N, src_planes * HW, k)
    taps, zero_first = _ordered_taps(geom, planes, input_side=adjoint)
    res = (np.zeros if zero_first else np.empty)((geom.N, planes * HW, width), dtype=src.dtype)
    for n in range(geom.N):
        for i, (a, z0, z1, zi0) in enumerate(taps):
            s0, r0 = (z0, zi0) if adjoint else (zi0, z0)  # first src / result plane
            rows = (z1 - z0) * HW
            op = wt[a] if adjoint else wt[a].T
            gemm_batch(
                src[n, s0 * HW : s0 * HW + rows][None],
                op[None],
                res[n, r0 * HW : r0 * HW + rows][None],
                beta=1.0 if i or zero_first else 0.0,
            )
    return res


def _channels_last_gemms(src: np.ndarray, w: np.ndarray, geom: ConvGeometry, adjoint: bool):
    """The forward (``src = x``) or input gradient (``adjoint``: ``src = dy``) in NDHWC, as
    ``(positions, channels)`` rows: one GEMM ``src @ W^T`` (or ``@ W``) for a 1x1x1
    kernel, one per depth tap and item for a depth-only one."""
    if geom.kernel[0] > 1:
        return _depth_gemms_channels_last(src, w, geom, adjoint)
    k, width = (geom.O, geom.C) if adjoint else (geom.C, geom.O)
    rows = _rows(src, k)
    w2 = np.ascontiguousarray(w.reshape(geom.O, geom.C), dtype=src.dtype)
    res = np.empty((rows.shape[0], width), dtype=src.dtype)
    gemm_batch(rows[None], (w2 if adjoint else w2.T)[None], res[None])
    return res


def forward_channels_last(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias=None
) -> np.ndarray:
    """``y (N, D, H, W, O) = x (N, D, H, W, C) @ W^T (+ bias)``: one GEMM, or one per depth
    tap and item."""
    y = _channels_last_gemms(x, w, geom, adjoint=False)
    if bias is not None:
        y += np.asarray(bias, dtype=x.dtype).reshape(geom.O)
    return y.reshape(geom.N, *geom.spatial_out, geom.O)


def backward_input_channels_last(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dx (N, D, H, W, C) = dy (N, D, H, W, O) @ W``: one GEMM, or one per depth tap and
    item."""
    dx = _channels_last_gemms(dy, w, geom, adjoint=True)
    return dx.reshape(geom.N, *geom.spatial_in, geom.C)


def backward_weight_channels_last(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dW (O, C) = dy^T @ x`` over every position: one GEMM, or per depth tap ``a`` the
    sum over items of ``dy[planes]^T @ x[planes + shift]``; shape ``geom.w_shape``."""
    kd = geom.kernel[0]
    if kd == 1:
        x2 = _rows(x, geom.C)
        dy2 = _rows(dy, geom.O).astype(x.dtype, copy=False)
        dw = np.empty((geom.O, geom.C), dtype=x.dtype)
        gemm_batch(dy2.T[None], x2[None], dw[None])
        return dw.reshape(geom.w_shape)
    HW = geom.spatial_in[1] * geom.spatial_in[2]
    D, Do = geom.spatial_in[0], geom.spatial_out[0]
    x3 = np.ascontiguousarray(x).reshape(geom.N, D * HW, geom.C)
    dy3 = np.ascontiguousarray(dy, dtype=x.dtype).reshape(geom.N, Do * HW, geom.O)
    acc = np.zeros((kd, geom.O, geom.C), dtype=x.dtype)
    for n in range(geom.N):
        for a, z0, z1, zi0 in _depth_taps(geom):
            rows = (z1 - z0) * HW
            d = dy3[n, z0 * HW : z0 * HW + rows]
            gemm_batch(d.T[None], x3[n, zi0 * HW : zi0 * HW + rows][None], acc[a][None], 1.0)
    return np.ascontiguousarray(acc.transpose(1, 2, 0)).reshape(geom.w_shape)
