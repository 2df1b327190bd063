"""Unfold H and W only, plane by plane; the depth taps stack into the GEMM.

Full im2col copies every input sample ``kd*kh*kw`` times. Unfolding only the two
in-plane axes copies it ``kh*kw`` times: ``col_q (C*kh*kw, P)`` is the in-plane unfolding
of input plane ``q`` (``P`` = the output positions of one plane of the slab's items).
Two orders let one GEMM still reduce over all three kernel axes:

*Tap columns* (``K = kd*C*kh*kw``). With the planes stored one after another, the
unfoldings of the ``kd`` consecutive planes that output plane ``z`` reads form one
``(kd*C*kh*kw) x P`` operand without a copy::

    y[:, z] (O x P) = W' (O x kd*C*kh*kw) @ col[z*sd - lo : z*sd - lo + kd]

written by BLAS straight into NCDHW (``ldc = Do*Ho*Wo``). Any depth stride (it only
moves the window); with depth dilation each tap is its own GEMM, accumulated.

*Tap rows* (``M = kd*O``), for depth stride and dilation 1 and a long enough
``C*kh*kw`` (:data:`TAP_ROWS_MIN_K`): input plane ``q`` feeds the consecutive output
planes ``z = q + lo - a``, so with the output slab kept plane-major (``acc (dz, O,
P)``) the rows of all its taps are one block::

    acc[q+lo-kd+1 : q+lo+1] (kd*O x P) += W'' (kd*O x C*kh*kw) @ col_q

Each input plane is unfolded right before its one GEMM (into one reused buffer, in
cache); each output plane is zeroed just before its first GEMM and copied out to NCDHW
just after its last. With ``O = 64`` BLAS runs the tap-columns GEMMs of a 3-channel
7x7 stem (``M = 64``) at ~140 GFLOP/s, the tap-rows ones (``M = 448``) at 260-290.

Taps that would read depth padding are skipped in both (their weights are columns /
rows of ``W'`` / ``W''``; the windows start and end later). The forward uses tap rows
where :func:`_tap_rows`, the weight gradient where also ``C >= 8``, the input gradient
always tap columns (measured, see the constants below):

- tap rows: ``dW''[block] += dy[planes fed] @ col_q.T``, with ``dy`` copied plane-major
  a plane at a time;
- tap columns: ``dW' += dy[:, z] @ window.T`` and ``window += W'.T @ dy[:, z]``
  in plane order, the planes of the windows held in a ring of the depth taps' extent
  (:class:`_PlaneRing`): an input plane is unfolded when the first output plane reads
  it, and its in-plane col2im is added to ``dx`` when the last one has.

*Channels-last* (``channels_last=True``, NDHWC arrays): the output side -- ``y``, and
``dy`` in the gradients -- is used as it lies, because every GEMM that touches it can take
its transpose. A plane ``(P, O)`` is then Fortran ``(O x P)``: the forward computes ``y_z
= W' @ window`` (both operands transposed) into it, tap rows accumulate position-major
``(P, dz, O)`` (a block of consecutive planes is still one strided matrix, rows ``dz*O``
apart), and the gradients flip the transpose flag of ``dy``. The unfolding reads ``x``,
and col2im writes ``dx``, in NCDHW: those are transposed, the small side of the first
layers this serves (C3D conv1a: 4.8 MB of input, 103 MB of output). Measured NDHWC
forward before -> after (the whole call transposed in and out; NCDHW in brackets, ms):
c3d_conv1a 103-120 -> 46-50 (42-51), unet3d_enc1 84-88 -> 33-38 (39-40), r3d18_stem
113-125 -> 80-99 (75-93), i3d_stem 87-95 -> 76-85 (72-73).

The unfolding and its adjoint are numba kernels (a strided view copied by numpy, and
numpy adds, without numba). A kernel step copies the input rows a band of output rows
reads into a zero-padded *polyphase* buffer ``buf[p_h, p_w, i, j] = x[i*sh + p_h - loh,
j*sw + p_w - low]``, where every tap ``(b, e)`` reads unit-stride runs (phase ``(b*dh %
sh, e*dw % sw)``, offset ``(b*dh // sh, e*dw // sw)``): in-plane stride 2 costs no
strided access (the unfolding ran 2.7x faster than with strided reads). A col2im step
owns a band of rows of one ``dx`` plane and adds its taps in a fixed order, so no
result depends on the thread count. Plane-by-plane kernels run on one thread: after
each GEMM OpenBLAS's idle thread spins ~0.1 s on the other core (measured), and a
second numba thread only competed with it.

Measured (2 cores, ms, interleaved in one process with 0.25 s pauses; before = the
previous hwunfold, one GEMM per depth tap with ``K = C*kh*kw`` accumulated into a
``(positions x O)`` buffer, or im2col where the chooser took it)::

    layer                 forward        dx             dw
    i3d_stem_7x7x7        132.6 -> 58.4  132.3 -> 60.1  109.9 -> 64.7
    r3d18_stem_3x7x7      135.5 -> 86.1  108.8 -> 75.3   97.6 -> 74.9
    c3d_conv1a (im2col)    69.4 -> 49.3   65.2 -> 36.1   75.2 -> 39.4
    unet3d_enc1 (im2col)   61.5 -> 40.3   55.1 -> 26.9   59.8 -> 32.9

and the other layers that take hwunfold, without pauses: c3d_conv5a forward 101 -> 88,
dw 129 -> 73; dw of vnet_5x5x5 293 -> 117, unet3d_enc2 249 -> 167, unet3d_deep 71 ->
57, dilated_d2 214 -> 182.
"""

from __future__ import annotations

import numpy as np

from .. import config
from . import _numba_runtime
from ._args import ConvGeometry
from ._blas import gemm_f, own_threads, single_threaded_blas
from ._layout import layout_shape, transpose_channels
from ._numba_runtime import compile_once, numba_available, run_shares, run_tasks
from ._slabs import (
    Slab,
    copy_parallel,
    gather_block,
    parallel_copy,
    plan_slabs,
    scatter_block_add,
)

NAME = "hwunfold"

#: Batch items share one GEMM only while a plane of the slab has fewer positions than
#: this; above it every item is its own slab (tap columns write the output directly).
_BATCH_POSITIONS = 2048

#: Shortest in-plane reduction ``C*kh*kw`` for which the forward stacks the depth taps
#: into the GEMM's rows (see :func:`_tap_rows`). Measured forward, tap rows vs tap
#: columns (ms, 2 cores): i3d stem (K 147) 60 vs 95, R3D stem (K 147) 89 vs 118; C3D
#: conv1a (K 27) 72 vs 51, U-Net enc1 (K 9) 78 vs 43 (short reductions leave the
#: plane-major accumulator's traffic and copy-out uncovered).
TAP_ROWS_MIN_K = 64

#: Fewest input channels for which the weight gradient stacks tap rows too. Measured
#: (ms, rows vs columns): vnet_5x5x5 (C 16) 116 vs 270, unet3d_enc2 (C 32) 163 vs 221,
#: c3d_conv5a (C 512) 76 vs 153; the 3-channel stems do better with columns (R3D 75-76
#: vs 65-67, i3d 62-65 vs 61-62): their plane-by-plane unfolding is the larger share.
_TAP_ROWS_MIN_C_WEIGHT = 8

#: Threads of the unfold / col2im kernels when they alternate with BLAS plane by
#: plane: OpenBLAS's threads spin for a while after each GEMM and take the other core,
#: so a second numba thread only competes with them (measured: slightly slower).
_INTERLEAVED_THREADS = 1


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


# --------------------------------------------------------------------------- planning


def _tap_rows(geom: ConvGeometry) -> bool:
    """Whether the depth taps go into the GEMM's rows (``M = kd*O``) rather than its
    reduction (``K = kd*C*kh*kw``); see the module notes."""
    kd, kh, kw = geom.kernel
    return (
        kd > 1
        and geom.stride[0] == 1
        and geom.dilation[0] == 1
        and geom.C * kh * kw >= TAP_ROWS_MIN_K
    )


def _plane_range(geom: ConvGeometry, d0: int, d1: int) -> tuple[int, int]:
    """Input planes ``[q0, q1)`` read by output planes ``d0:d1`` (padding excluded)."""
    sd, dd, kd = geom.stride[0], geom.dilation[0], geom.kernel[0]
    lo, D = geom.pads[0][0], geom.spatial_in[0]
    q0 = max(0, d0 * sd - lo)
    q1 = min(D, (d1 - 1) * sd - lo + (kd - 1) * dd + 1)
    return q0, max(q0, q1)


def _max_batch(geom: ConvGeometry) -> int:
    """Most items per slab: enough for ``_BATCH_POSITIONS`` positions, 1 on large planes."""
    plane = max(1, geom.spatial_out[1] * geom.spatial_out[2])
    return 1 if plane >= _BATCH_POSITIONS else -(-_BATCH_POSITIONS // plane)


def _cost(geom: ConvGeometry, itemsize: int, rows: bool, ring: bool = False):
    """Scratch bytes of a slab. Tap rows: one plane's unfolding and the slab's output or
    ``dy`` plane-major. Tap columns: the unfolding of every input plane of the slab (with
    ``ring``, of the depth taps' extent: :class:`_PlaneRing`), and for batched slabs one
    plane of output or ``dy`` gathered."""
    kd, kh, kw = geom.kernel
    sd, dd = geom.stride[0], geom.dilation[0]
    _, Ho, Wo = geom.spatial_out
    K2 = geom.C * kh * kw
    D = geom.spatial_in[0]
    nb_max = _max_batch(geom)
    numpy_block = 0 if numba_available() else geom.C * _padded_plane(geom)

    def cost(nb: int, dz: int) -> int:
        if nb > nb_max:
            return 1 << 62
        P = nb * Ho * Wo
        if rows:
            planes = 1
        else:
            planes = min(D, (0 if ring else (dz - 1) * sd) + (kd - 1) * dd + 1)
        extra = geom.O * P * (dz if rows else (nb > 1))
        return itemsize * (planes * K2 * _leading_dim(P, itemsize) + extra + nb * numpy_block)

    return cost


def _padded_plane(geom: ConvGeometry) -> int:
    (kh, kw), (dh, dw), (sh, sw) = geom.kernel[1:], geom.dilation[1:], geom.stride[1:]
    _, Ho, Wo = geom.spatial_out
    return ((Ho - 1) * sh + (kh - 1) * dh + 1) * ((Wo - 1) * sw + (kw - 1) * dw + 1)


def _slabs(geom: ConvGeometry, itemsize: int, rows: bool, ring: bool = False):
    return plan_slabs(geom, _cost(geom, itemsize, rows, ring), config.workspace_bytes)


def _runs(geom: ConvGeometry, z: int):
    """Tap columns: output plane ``z``'s depth taps as ``(a0, a1, q)``: taps ``a0:a1``
    read the consecutive input planes ``q, q+1, ...`` (one run; one run per tap when
    dilated). Taps that would read depth padding are left out (their products are 0)."""
    sd, dd, kd = geom.stride[0], geom.dilation[0], geom.kernel[0]
    lo, D = geom.pads[0][0], geom.spatial_in[0]
    base = z * sd - lo
    valid = [a for a in range(kd) if 0 <= base + a * dd < D]
    if not valid:
        return []
    if dd == 1:
        return [(valid[0], valid[-1] + 1, base + valid[0])]
    return [(a, a + 1, base + a * dd) for a in valid]


def _row_block(geom: ConvGeometry, q: int, d0: int, d1: int) -> tuple[int, int, int]:
    """Tap rows: the output planes ``[z0, z1)`` of ``d0:d1`` that input plane ``q``
    feeds (tap ``a = q + lo - z``), and the first row of their block of ``W''``."""
    kd, lo = geom.kernel[0], geom.pads[0][0]
    z0, z1 = max(d0, q + lo - kd + 1), min(d1, q + lo + 1)
    return z0, z1, (kd - 1 - q - lo + z0) * geom.O


def _plane_weights(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``W' (O, kd*C*kh*kw)``, columns ordered ``(a, c, b, e)``: tap ``a``'s block first.
    (Copied on the engine's threads, as is ``W''``: c3d_conv5a's 28 MB 4.0 -> 2.1 ms.)"""
    kd, kh, kw = geom.kernel
    w5 = w.reshape(geom.O, geom.C, kd, kh, kw).transpose(0, 2, 1, 3, 4)
    return parallel_copy(w5, axis=0).reshape(geom.O, kd * geom.C * kh * kw)


def _row_weights(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``W'' (kd*O, C*kh*kw)``, rows ordered ``(kd-1-a, o)``: the taps that carry one
    input plane to output planes ``z, z+1, ...`` are consecutive row blocks."""
    kd, kh, kw = geom.kernel
    w5 = w.reshape(geom.O, geom.C, kd, kh, kw)[:, :, ::-1].transpose(2, 0, 1, 3, 4)
    return parallel_copy(w5, axis=1).reshape(kd * geom.O, geom.C * kh * kw)


#: Tap rows hold the re-laid ``W''`` whole only while it takes at most the cap divided
#: by this (16 MiB of the default 64); a larger one is re-laid one depth tap at a time,
#: right before that tap's GEMM (C3D conv5a, 512 channels: 28 MB whole, 9.4 MB a tap;
#: forward peak 46.9 -> 28.9 MiB, PyTorch's 33.2, but 97 -> 108 ms: its four tap copies
#: take ~6 ms like the whole one, while GEMMs of 512 rows run at 146 GFLOP/s against 173
#: for the 1024 rows of two taps at once).
ROW_WEIGHTS_SHARE = 4


def _whole_row_weights(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether tap rows re-lay ``W''`` whole (see ROW_WEIGHTS_SHARE)."""
    return geom.O * geom.C * geom.taps * itemsize <= config.workspace_bytes // ROW_WEIGHTS_SHARE


def _tap_weights(w: np.ndarray, geom: ConvGeometry, a: int, scratch) -> np.ndarray:
    """Depth tap ``a``'s rows of ``W''``, ``w[:, :, a]`` as ``(O, C*kh*kw)``, re-laid into
    the scratch buffer ``"tap"`` on the engine's threads."""
    kd, kh, kw = geom.kernel
    buf = scratch.get("tap", (geom.O, geom.C * kh * kw))
    src = w.reshape(geom.O, geom.C, kd, kh * kw)[:, :, a]
    copy_parallel(buf.reshape(geom.O, geom.C, kh * kw), src, axis=0)
    return buf


def _geo(geom: ConvGeometry, nb: int) -> np.ndarray:
    """Integer parameters of the numba kernels."""
    _, H, W = geom.spatial_in
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel[1:], geom.stride[1:], geom.dilation[1:]
    _, Ho, Wo = geom.spatial_out
    loh, low = geom.pads[1][0], geom.pads[2][0]
    vals = (geom.C, H, W, kh, kw, sh, sw, dh, dw, loh, low, Ho, Wo, nb)
    return np.array(vals, dtype=np.int64)


# ----------------------------------------------------------------- kernels (numba)


def _phase_columns(W, Wq, sw, pw, low):  # pragma: no cover - compiled (inlined)
    """The columns ``[j0, j1)`` of polyphase row ``pw`` that lie inside the input:
    ``0 <= j*sw + pw - low < W`` (the others are padding)."""
    j0 = min(Wq, max(0, (sw - 1 + low - pw) // sw))
    j1 = j0
    if W - 1 + low - pw >= 0:
        j1 = max(j0, min(Wq, (W - 1 + low - pw) // sw + 1))
    return j0, j1


def _unfold_worker(task, ntasks, x, col, n0, q0, geo, band):  # pragma: no cover - compiled
    """``col[qi, (c, b, e), (n, h, w)] = x[n0 + n, c, q0 + qi, h*sh + b*dh - loh,
    w*sw + e*dw - low]`` (zero in the padding). A step is a band of ``band`` output rows
    of one ``(plane, item, c)``: it fills the polyphase buffer of the input rows they
    read, then copies each tap's unit-stride runs (one per output row). Steps run the
    items fastest: a column row's segments of consecutive items are then written one
    after another (c3d_conv5a's 7x7 planes: 5.5 -> 3.3 ms a plane), not in 16 visits of
    196 bytes each."""
    C, H, W, kh, kw, sh, sw, dh, dw, loh, low, Ho, Wo, nb = (
        geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6],
        geo[7], geo[8], geo[9], geo[10], geo[11], geo[12], geo[13],
    )  # fmt: skip
    nq = col.shape[0]
    Wq = ((Wo - 1) * sw + (kw - 1) * dw) // sw + 1
    ohm = ((kh - 1) * dh) // sh
    R = band + ohm  # phase rows a band reads
    buf = np.empty((sh, sw, R * Wq), dtype=col.dtype)
    nbands = (Ho + band - 1) // band
    for item in range(task, nq * nb * C * nbands, ntasks):
        r = item % nbands
        n = (item // nbands) % nb
        c = (item // (nbands * nb)) % C
        qi = item // (nbands * C * nb)
        src = x[n0 + n, c, q0 + qi]
        h0 = r * band
        hb = min(Ho, h0 + band) - h0
        for ph in range(sh):
            for pw in range(sw):
                j0, j1 = _phase_columns(W, Wq, sw, pw, low)
                bp = buf[ph, pw]
                for i in range(hb + ohm):
                    iy = (h0 + i) * sh + ph - loh
                    dst = bp[i * Wq : (i + 1) * Wq]
                    # j with 0 <= j*sw + pw - low < W: columns j0*sw + pw - low, then
                    # every sw-th
                    if iy < 0 or iy >= H or j1 <= j0:
                        dst[:] = 0
                        continue
                    dst[:j0] = 0
                    dst[j1:] = 0
                    part = dst[j0:j1]
                    srow = src[iy, j0 * sw + pw - low :]
                    if sw == 1:  # (a unit stride the compiler knows vectorises)
                        for j in range(j1 - j0):
                            part[j] = srow[j]
                    else:
                        for j in range(j1 - j0):
                            part[j] = srow[j * sw]
        for b in range(kh):
            ph = (b * dh) % sh
            oh = (b * dh) // sh
            for e in range(kw):
                # (slices first: a loop index known to be >= 0 vectorises)
                row = col[qi, (c * kh + b) * kw + e, (n * Ho + h0) * Wo :]
                s = buf[ph, (e * dw) % sw, oh * Wq + (e * dw) // sw :]
                for hr in range(hb):
                    d = row[hr * Wo : (hr + 1) * Wo]
                    t = s[hr * Wq : hr * Wq + Wo]
                    for j in range(Wo):
                        d[j] = t[j]


def _fold_worker(task, ntasks, dx, col, n0, q0, geo, band):  # pragma: no cover - compiled
    """The adjoint of :func:`_unfold_worker`: ``dx[n0 + n, c,
    q0 + qi] +=`` every column entry that came from it. A step owns a band of ``band``
    phase rows (every phase) of one ``dx`` plane: it sums their entries in a polyphase
    buffer, taps ``(b, e)`` in order, then adds the buffer into ``dx``. Items run
    fastest, as in the unfolding."""
    C, H, W, kh, kw, sh, sw, dh, dw, loh, low, Ho, Wo, nb = (
        geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6],
        geo[7], geo[8], geo[9], geo[10], geo[11], geo[12], geo[13],
    )  # fmt: skip
    nq = col.shape[0]
    Wq = ((Wo - 1) * sw + (kw - 1) * dw) // sw + 1
    Hq = Ho + ((kh - 1) * dh) // sh  # phase rows read
    buf = np.empty((sh, sw, band * Wq), dtype=col.dtype)
    nbands = (Hq + band - 1) // band
    for item in range(task, nq * nb * C * nbands, ntasks):
        r = item % nbands
        n = (item // nbands) % nb
        c = (item // (nbands * nb)) % C
        qi = item // (nbands * C * nb)
        i0 = r * band
        ib = min(Hq, i0 + band) - i0
        for ph in range(sh):
            for pw in range(sw):
                t = buf[ph, pw]
                for k in range(ib * Wq):
                    t[k] = 0
        for b in range(kh):
            ph = (b * dh) % sh
            oh = (b * dh) // sh
            h0 = max(0, i0 - oh)
            h1 = min(Ho, i0 + ib - oh)
            for e in range(kw):
                row = col[qi, (c * kh + b) * kw + e]
                t = buf[ph, (e * dw) % sw]
                ow = (e * dw) // sw
                for h in range(h0, h1):
                    k0 = (h + oh - i0) * Wq + ow
                    s0 = (n * Ho + h) * Wo
                    d = t[k0 : k0 + Wo]
                    v = row[s0 : s0 + Wo]
                    for j in range(Wo):
                        d[j] += v[j]
        dst = dx[n0 + n, c, q0 + qi]
        for ph in range(sh):
            for i in range(ib):
                iy = (i0 + i) * sh + ph - loh
                if iy < 0 or iy >= H:
                    continue
                for pw in range(sw):
                    j0, j1 = _phase_columns(W, Wq, sw, pw, low)
                    if j1 > j0:
                        d = dst[iy, j0 * sw + pw - low :]
                        t = buf[ph, pw, i * Wq + j0 : i * Wq + j1]
                        if sw == 1:  # (a unit stride the compiler knows vectorises)
                            for j in range(j1 - j0):
                                d[j] += t[j]
                        else:
                            for j in range(j1 - j0):
                                d[j * sw] += t[j]


@compile_once
def _kernels() -> dict:
    """Compile (or load from numba's cache) the kernels, once per process."""
    import numba

    # fastmath off: the col2im sums keep the order written here.
    global _phase_columns
    _phase_columns = numba.njit(inline="always", cache=True)(_phase_columns)
    jit = numba.njit(cache=True, fastmath=False, nogil=True)
    return {"numba": numba, "unfold": jit(_unfold_worker), "fold": jit(_fold_worker)}


def _band(rows: int, planes: int, nw: int) -> int:
    """Rows per kernel step: whole planes when there are enough of them for the threads'
    tasks, else bands of rows (set by the geometry and thread count only)."""
    want = -(-_numba_runtime.TASKS_PER_THREAD * nw // max(1, planes)) if nw > 1 else 1
    return max(1, -(-rows // max(1, want)))


def _threads(interleaved: bool) -> int:
    if interleaved:
        return _INTERLEAVED_THREADS
    return int(_kernels()["numba"].get_num_threads())


# ------------------------------------------------------------------ unfold / fold


class _Scratch:
    """Buffers reused by the slabs of one call (the slabs of a plan have the same sizes
    but at the edges, so every slab after the first one writes to memory in cache rather
    than to freshly mapped pages)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.buffers: dict = {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        size = int(np.prod(shape))
        flat = self.buffers.get(name)
        if flat is None or flat.size < size:
            self.buffers[name] = flat = None  # free the old one before allocating
            self.buffers[name] = flat = np.empty(size, dtype=self.dtype)
        return flat[:size].reshape(shape)


def _column_buffer(geom: ConvGeometry, slab: Slab, dtype, planes: int | None = None, scratch=None):
    """``(planes, C*kh*kw, ld)`` (by default the slab's input planes), and ``(q0, P, ld)``."""
    q0, q1 = _plane_range(geom, slab.d0, slab.d1)
    P = slab.nb * geom.spatial_out[1] * geom.spatial_out[2]
    ld = _leading_dim(P, np.dtype(dtype).itemsize)
    K2 = geom.C * geom.kernel[1] * geom.kernel[2]
    shape = (q1 - q0 if planes is None else planes, K2, ld)
    col = np.empty(shape, dtype=dtype) if scratch is None else scratch.get("col", shape)
    return col, q0, P, ld


def _plane_view(block: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``(C, kh, kw, nb, Ho, Wo)`` strided view of a padded ``(nb, C, 1, Hp, Wp)`` block."""
    sN, sC, _, sH, sW = block.strides
    (kh, kw), (dh, dw), (sh, sw) = geom.kernel[1:], geom.dilation[1:], geom.stride[1:]
    _, Ho, Wo = geom.spatial_out
    shape = (geom.C, kh, kw, block.shape[0], Ho, Wo)
    strides = (sC, sH * dh, sW * dw, sN, sH * sh, sW * sw)
    return np.lib.stride_tricks.as_strided(block, shape, strides, writeable=True)


def _plane_window(geom: ConvGeometry, q: int):
    _, Ho, Wo = geom.spatial_out
    (kh, kw), (dh, dw), (sh, sw) = geom.kernel[1:], geom.dilation[1:], geom.stride[1:]
    starts = (q, -geom.pads[1][0], -geom.pads[2][0])
    lengths = (1, (Ho - 1) * sh + (kh - 1) * dh + 1, (Wo - 1) * sw + (kw - 1) * dw + 1)
    return starts, lengths


def _unfold(x: np.ndarray, geom: ConvGeometry, slab: Slab):
    """The slab's input planes, unfolded: ``(col, q0, P, ld)``."""
    col, q0, P, ld = _column_buffer(geom, slab, x.dtype)
    _unfold_into(col, x, geom, slab, q0, interleaved=False)
    return col, q0, P, ld


def _unfold_into(col, x, geom: ConvGeometry, slab: Slab, q0: int, interleaved: bool):
    """``col[i]`` = the in-plane unfolding of input plane ``q0 + i`` of the slab's items."""
    if col.shape[0] == 0:
        return
    if numba_available():
        nw = _threads(interleaved)
        band = _band(geom.spatial_out[1], col.shape[0] * slab.nb * geom.C, nw)
        geo = _geo(geom, slab.nb)
        run_tasks(_kernels()["unfold"], nw, x, col, slab.n0, q0, geo, band)
        return
    P = slab.nb * geom.spatial_out[1] * geom.spatial_out[2]
    block = None
    for qi in range(col.shape[0]):
        starts, lengths = _plane_window(geom, q0 + qi)
        block = gather_block(x, slab.n0, slab.n1, starts, lengths, out=block)
        view = _plane_view(block, geom)
        dst = col[qi, :, :P].reshape(view.shape)
        assert np.shares_memory(dst, col)
        np.copyto(dst, view)


def _fold(dx, col, geom: ConvGeometry, slab: Slab, q0: int, interleaved: bool):
    """``dx += col2im(col)`` for input planes ``q0, q0 + 1, ...``."""
    if col.shape[0] == 0:
        return
    if numba_available():
        nw = _threads(interleaved)
        (kh, dh, sh), Ho = (geom.kernel[1], geom.dilation[1], geom.stride[1]), geom.spatial_out[1]
        band = _band(Ho + (kh - 1) * dh // sh, col.shape[0] * slab.nb * geom.C, nw)
        geo = _geo(geom, slab.nb)
        run_tasks(_kernels()["fold"], nw, dx, col, slab.n0, q0, geo, band)
        return
    P = slab.nb * geom.spatial_out[1] * geom.spatial_out[2]
    kh, kw = geom.kernel[1:]
    block = None
    for qi in range(col.shape[0]):
        starts, lengths = _plane_window(geom, q0 + qi)
        if block is None:
            block = np.zeros((slab.nb, geom.C, *lengths), dtype=dx.dtype)
        else:
            block[...] = 0
        view = _plane_view(block, geom)
        cols = col[qi, :, :P].reshape(view.shape)
        # One in-plane tap at a time: within a tap the windows never overlap.
        for b in range(kh):
            for e in range(kw):
                view[:, b, e] += cols[:, b, e]
        scatter_block_add(dx, block, slab.n0, slab.n1, starts)


#: Shortest in-plane reduction ``C*kh*kw`` whose planes the gradients hold in a ring of
#: the depth taps' extent; shorter ones keep a slot for every plane of the slab (no run
#: wraps). A wrapped run is two GEMMs of ``K2``-wide column blocks: with ``K2 = 9`` (the
#: U-Net's 1-channel layer) those ran slowly, backward 85-99 ms against 70-82 without
#: the ring (interleaved fresh processes); with 27 (C3D conv1a) 81-84 against 77-111.
RING_MIN_K = 16


def _ring(geom: ConvGeometry) -> bool:
    """Whether :class:`_PlaneRing` holds the depth taps' extent (else every plane)."""
    return geom.C * geom.kernel[1] * geom.kernel[2] >= RING_MIN_K


class _PlaneRing:
    """The unfoldings of a slab's input planes, the depth taps' extent ``R`` of them at a
    time. Output planes are visited in order and their windows only move forward, so input
    plane ``q`` is held in slot ``(q - q0) % R`` from the first output plane that reads
    it until the last one has: a slab needs ``R`` planes of scratch, not one per input
    plane it reads (the I3D stem's 7x7x7 kernel: 7 planes of 1.8 MB, not 16 per item). A run
    of taps whose planes wrap past the last slot is two GEMMs (:meth:`pieces`). Where
    :func:`_ring` is False ``R`` is all of the slab's planes (slot ``q - q0``): nothing
    wraps, the planes still enter and leave one by one.

    ``enter(slab, slot, q)`` fills a slot as plane ``q`` comes in, ``leave(slab, slot,
    q)`` (if given) takes it out when no later output plane reads it (``slot`` a ``(1, K2,
    ld)`` view); every plane that enters leaves once, in plane order, by :meth:`finish` at
    the latest. :meth:`plan` gives a ring per slab of the gradients' plan.
    """

    @classmethod
    def plan(cls, geom: ConvGeometry, dtype, enter, leave=None):
        """A ring for each slab of the gradients' plan (whose cost counts the ring's
        planes, :func:`_ring`), each made when the previous one is done with."""
        for slab in _slabs(geom, np.dtype(dtype).itemsize, rows=False, ring=_ring(geom)):
            yield cls(geom, slab, dtype, enter, leave)

    def __init__(self, geom: ConvGeometry, slab: Slab, dtype, enter, leave):
        kd, dd = geom.kernel[0], geom.dilation[0]
        q0, q1 = _plane_range(geom, slab.d0, slab.d1)
        self.geom, self.slab, self.q0 = geom, slab, q0
        self.R = max(1, min(q1 - q0, (kd - 1) * dd + 1) if _ring(geom) else q1 - q0)
        self.col, _, self.P, self.ld = _column_buffer(geom, slab, dtype, planes=self.R)
        self.step = geom.C * geom.kernel[1] * geom.kernel[2] * self.ld * self.col.itemsize
        self.enter, self.leave = enter, leave
        self.sd, self.pad = geom.stride[0], geom.pads[0][0]
        self.lo = self.hi = q0  # the live planes, [lo, hi)

    def _leave(self, q: int) -> None:
        if self.leave is not None:
            self.leave(self.slab, self._slot(q), q)

    def _slot(self, q: int) -> np.ndarray:
        i = (q - self.q0) % self.R
        return self.col[i : i + 1]

    def advance(self, z: int, runs) -> None:
        """Make live the planes output plane ``z`` reads (its ``runs``, :func:`_runs`),
        after retiring the live ones below its window: no later window reaches them. (Not
        below its first plane read: with depth dilation and padding a later window can
        read lower planes, e.g. a kernel of 3 dilated by 2 with 3 planes of padding: plane
        0 reads input plane 1, plane 1 reads 0 and 2.)"""
        start = z * self.sd - self.pad  # the window, padding included
        last = runs[-1][2] + runs[-1][1] - runs[-1][0]  # one past the last plane read
        while self.lo < min(self.hi, start):
            self._leave(self.lo)
            self.lo += 1
        if self.hi < start:  # planes no window reads (a depth stride past the taps)
            self.lo = self.hi = start
        for q in range(self.hi, last):
            self.enter(self.slab, self._slot(q), q)
        self.hi = max(self.hi, last)

    def pieces(self, a0: int, a1: int, q: int):
        """The run of taps ``a0:a1`` (planes ``q, q+1, ...``) as ``(a0, a1, pointer)``
        pieces whose planes are consecutive slots."""
        i = (q - self.q0) % self.R
        m = min(a1 - a0, self.R - i)
        base = self.col.ctypes.data
        yield a0, a0 + m, base + i * self.step
        if m < a1 - a0:
            yield a0 + m, a1, base

    def finish(self) -> None:
        """Retire every live plane."""
        for q in range(self.lo, self.hi):
            self._leave(q)
        self.lo = self.hi

    def windows(self, dy: np.ndarray, cl: bool):
        """The gradients' walk over the slab: for each output plane that reads an input
        plane, in order, ``(g_ptr, ldg, pieces)`` -- its ``dy`` plane (:func:`_dy_plane`)
        and its runs of taps as :meth:`pieces`, the planes they read live -- and then
        every plane retired."""
        geom, slab = self.geom, self.slab
        buf = _batch_buffer(slab, self.P, geom.O, dy.dtype, cl)
        for z in range(slab.d0, slab.d1):
            runs = _runs(geom, z)
            if runs:
                self.advance(z, runs)
                g_ptr, ldg = _dy_plane(dy, slab, z, buf, cl)
                yield g_ptr, ldg, [p for run in runs for p in self.pieces(*run)]
        self.finish()


# --------------------------------------------------------------------- entry points


def _plane_major(a: np.ndarray, slab: Slab, z: int, cl: bool = False) -> np.ndarray:
    """Plane ``z`` of an output-side array for the slab's items, as a view in the order
    of its GEMM matrix: ``(O, nb, Ho, Wo)`` of NCDHW ``a``, ``(nb, Ho, Wo, O)`` of NDHWC."""
    if cl:
        return a[slab.n0 : slab.n1, z]
    return a[slab.n0 : slab.n1, :, z].transpose(1, 0, 2, 3)


def _slab_buffer(scratch: _Scratch, name: str, geom: ConvGeometry, slab: Slab, cl: bool):
    """A slab's planes of output or ``dy``: plane-major ``(dz, O, P)``, or with ``cl``
    position-major ``(P, dz, O)`` (a block of consecutive planes is then still one
    strided matrix, ``(z, o)`` rows ``dz*O`` apart)."""
    P = slab.nb * geom.spatial_out[1] * geom.spatial_out[2]
    return scratch.get(name, (P, slab.dz, geom.O) if cl else (slab.dz, geom.O, P))


def _slab_plane(acc: np.ndarray, geom: ConvGeometry, slab: Slab, zi: int, cl: bool = False):
    """Plane ``zi`` of a :func:`_slab_buffer` as :func:`_plane_major` orders it."""
    if cl:
        return acc[:, zi].reshape(slab.nb, *geom.spatial_out[1:], geom.O)
    return acc[zi].reshape(geom.O, slab.nb, *geom.spatial_out[1:])


def _slab_block(acc: np.ndarray, z0: int, z1: int, cl: bool) -> np.ndarray:
    """Planes ``z0:z1`` (slab-relative) of a :func:`_slab_buffer`."""
    return acc[:, z0:z1] if cl else acc[z0:z1]


def _slab_ptr(acc: np.ndarray, zi: int, cl: bool) -> tuple[int, int]:
    """Pointer and leading dimension of the ``(plane, channel)`` rows from slab-relative
    plane ``zi`` on, of a :func:`_slab_buffer`, as a GEMM matrix: Fortran ``(P x rows)``
    plane-major, ``(rows x P)`` position-major (``cl``)."""
    if cl:
        _, dz, O = acc.shape
        return acc.ctypes.data + zi * O * acc.itemsize, dz * O
    _, O, P = acc.shape
    return acc.ctypes.data + zi * O * P * acc.itemsize, P


def _batch_buffer(slab: Slab, P: int, O: int, dtype, cl: bool):
    """A slab's plane of output or ``dy`` gathered for batched items (``(O, P)``, or
    ``(P, O)`` with ``cl``: the order :func:`_plane_major` gives); None for one item."""
    return np.empty((P, O) if cl else (O, P), dtype=dtype) if slab.nb > 1 else None


#: The forward adds a bias itself (each output plane starts from it, in cache).
FUSED_BIAS = True


def forward(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias=None, channels_last: bool = False
) -> np.ndarray:
    """The forward convolution, ``(N, O, Do, Ho, Wo)``; with ``channels_last``, ``(N, Do,
    Ho, Wo, O)`` from ``x (N, D, H, W, C)``: the GEMMs write the output as it lies (``x``
    is transposed in, the unfolding reading NCDHW: cheap on the few-channel first layers
    whose outputs are the large side)."""
    x = _input_side(x, channels_last)
    w = w.astype(x.dtype, copy=False)
    out = np.empty(layout_shape(geom.out_shape, channels_last), dtype=x.dtype)
    column = None if bias is None else np.asarray(bias, dtype=x.dtype).reshape(-1, 1)
    cl = channels_last
    if _tap_rows(geom):
        _forward_tap_rows(x, w, geom, out, column, cl)
    elif threaded_columns(geom, x.itemsize):
        _forward_tap_columns_threaded(x, w, geom, out, column, cl)
    else:
        _forward_tap_columns(x, w, geom, out, column, cl)
    return out


def _input_side(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """``x`` as the unfolding reads it: C-contiguous NCDHW (transposed from NDHWC)."""
    if channels_last:
        return transpose_channels(x, to_last=False)
    return np.ascontiguousarray(x)


def _gemm_out(dtype, cl: bool, P: int, O: int, K: int, col_ptr, ld, w_ptr, ldw, c_ptr, ldc, beta):
    """An output plane (or a block of ``O`` rows of one) ``(+)= W (O x K) @ window (K x P)``,
    ``W`` stored ``(O, K)`` C-order (leading dimension ``ldw``), the window as unfolded
    (``(K, P)``, ``ld``). NCDHW: the plane ``(O, P)`` C-order, Fortran ``y^T (P x O) =
    window^T @ W^T``; channels-last: ``(P, O)`` C-order, Fortran ``y (O x P) = W @
    window`` (both operands transposed)."""
    if cl:
        gemm_f(dtype, True, True, O, P, K, w_ptr, ldw, col_ptr, ld, c_ptr, ldc, beta)
    else:
        gemm_f(dtype, False, False, P, O, K, col_ptr, ld, w_ptr, ldw, c_ptr, ldc, beta)


def _plane_ptr(a: np.ndarray, n: int, z: int, cl: bool) -> tuple[int, int]:
    """Pointer and leading dimension of plane ``z`` of item ``n`` of an output-side array
    (``y`` or ``dy``): NCDHW ``(O, P)`` rows ``Do*P`` apart, NDHWC ``(P, O)``."""
    if cl:
        _, Do, Ho, Wo, O = a.shape
        return a.ctypes.data + (n * Do + z) * Ho * Wo * O * a.itemsize, O
    _, O, Do, Ho, Wo = a.shape
    return a.ctypes.data + ((n * O) * Do + z) * Ho * Wo * a.itemsize, Do * Ho * Wo


def _channel_column(column: np.ndarray, ndim: int, cl: bool) -> np.ndarray:
    """A bias ``column (O, 1)`` broadcastable over an ``ndim``-D output plane block: over
    its first axis (NCDHW) or its last (channels-last)."""
    return column.reshape(-1) if cl else column.reshape((-1,) + (1,) * (ndim - 1))


#: Column-buffer bytes of one slab of :func:`_forward_tap_columns_threaded` (c3d_conv1a,
#: unet3d_enc1, strided_down_s2 measured flat from 4 to 8 MiB; 2 MiB slower).
THREADED_SLAB_BYTES = 8 << 20


def _threaded_planes(geom: ConvGeometry, itemsize: int) -> int:
    """Output planes per slab of :func:`_forward_tap_columns_threaded` (its column buffer
    under ``min(THREADED_SLAB_BYTES, cap / 2)``: one per thread), 0 where even one output
    plane's input planes do not fit."""
    kd, sd, dd = geom.kernel[0], geom.stride[0], geom.dilation[0]
    Do, Ho, Wo = geom.spatial_out
    plane_bytes = geom.C * geom.kernel[1] * geom.kernel[2] * _leading_dim(Ho * Wo, itemsize)
    plane_bytes *= itemsize
    cap = min(THREADED_SLAB_BYTES, config.workspace_bytes // 2)
    dz = 0
    while dz < Do and (dz * sd + (kd - 1) * dd + 1) * plane_bytes <= cap:
        dz += 1
    return dz


#: Fewest flops of one output plane's GEMMs for the threaded tap columns: below it the
#: per-slab calls cost more than they save (the demo's 16^3 layers, 0.1-1.8 MFLOP a
#: plane: forward 1.0-2.5 ms plane by plane against 1.6-5.3 threaded; from 2.7 MFLOP on,
#: threaded won: 27 vs 28, 12 vs 14, 6.3 vs 8.5).
THREADED_MIN_PLANE_FLOPS = 2_000_000


def threaded_columns(geom: ConvGeometry, itemsize: int = 4) -> bool:
    """Whether the forward runs tap columns in slabs on the engine's threads (with numba,
    where one output plane's unfolding fits the slab size and its GEMMs are large enough
    to pay for a slab's calls)."""
    Do, Ho, Wo = geom.spatial_out
    plane_flops = 2 * Ho * Wo * geom.O * geom.reduction
    return (
        numba_available()
        and supports(geom)
        and not _tap_rows(geom)
        and plane_flops >= THREADED_MIN_PLANE_FLOPS
        and _threaded_planes(geom, itemsize) > 0
    )


class _ItemSlabs:
    """The threaded tap-columns plan: slabs of one item and a few output planes (see
    :func:`_threaded_planes`), each unfolded on the thread that works on it."""

    def __init__(self, geom: ConvGeometry, x: np.ndarray):
        self.geom, self.x = geom, x
        kd, kh, kw = geom.kernel
        Do, Ho, Wo = geom.spatial_out
        self.P = Ho * Wo
        self.ld = _leading_dim(self.P, x.itemsize)
        self.K2 = geom.C * kh * kw
        dz = _threaded_planes(geom, x.itemsize)
        self.slabs = [
            Slab(n, n + 1, d0, min(Do, d0 + dz)) for n in range(geom.N) for d0 in range(0, Do, dz)
        ]
        sd, dd = geom.stride[0], geom.dilation[0]
        self.planes = min(geom.spatial_in[0], (dz - 1) * sd + (kd - 1) * dd + 1)
        self._geo = _geo(geom, 1)
        self._kernel = _kernels()["unfold"]

    def buffer(self) -> np.ndarray:
        """A column buffer for one slab (one per thread)."""
        return np.empty((self.planes, self.K2, self.ld), dtype=self.x.dtype)

    def unfold(self, slab: Slab, col: np.ndarray) -> int:
        """Unfold the slab's input planes into ``col`` on this thread; the first plane."""
        q0, q1 = _plane_range(self.geom, slab.d0, slab.d1)
        Ho = self.geom.spatial_out[1]
        self._kernel(0, 1, self.x, col[: q1 - q0], slab.n0, q0, self._geo, Ho)
        return q0


def _forward_tap_columns_threaded(x, w, geom: ConvGeometry, out, column=None, cl=False) -> None:
    """Tap columns in slabs of one item and a few output planes, each slab unfolded and
    multiplied by one thread with a single-threaded BLAS (no OpenBLAS thread left
    spinning into the next unfolding), its GEMMs writing NCDHW directly. A bias is the
    plane's starting value (its GEMMs then accumulate, ``beta = 1``): OpenBLAS clears
    ``C`` in a pass of its own before a ``beta = 0`` GEMM, so the fill takes that pass's
    place, where adding the bias after the GEMMs was one more (c3d_conv1a forward with
    bias, interleaved fresh processes: 48-49 -> 43-44 ms; the fill takes the plane's
    page faults on the thread that computes it). Against unfolding all of a slab's planes
    on both threads and then running multithreaded GEMMs: c3d_conv1a 49 -> 40 ms,
    unet3d_enc1 40 -> 32, strided_down_s2 98 -> 64 (0.1 s pauses between calls). Every
    output plane is one fixed sequence of GEMMs, whichever thread runs it."""
    O, isz = geom.O, x.itemsize
    plan = _ItemSlabs(geom, x)
    K2, P, ld, kd = plan.K2, plan.P, plan.ld, geom.kernel[0]
    wk = _plane_weights(w, geom)

    def work(task: int, ntasks: int) -> None:
        col = plan.buffer()
        for slab in plan.slabs[task::ntasks]:
            q0 = plan.unfold(slab, col)
            for z in range(slab.d0, slab.d1):
                c_ptr, ldc = _plane_ptr(out, slab.n0, z, cl)
                plane = _plane_major(out, slab, z, cl)
                if column is not None:
                    plane[...] = _channel_column(column, plane.ndim, cl)
                runs = _runs(geom, z)
                for i, (a0, a1, q) in enumerate(runs):
                    # y_z (+)= W'[:, a0:a1] (O x K) @ window (K x P)
                    _gemm_out(
                        x.dtype, cl, P, O, (a1 - a0) * K2,
                        col.ctypes.data + (q - q0) * K2 * ld * isz, ld,
                        wk.ctypes.data + a0 * K2 * isz, kd * K2,
                        c_ptr, ldc,
                        1.0 if i or column is not None else 0.0,
                    )  # fmt: skip
                if not runs and column is None:
                    plane[...] = 0

    with single_threaded_blas():
        run_tasks(work, _threads(interleaved=False))


def _forward_tap_columns(x, w, geom: ConvGeometry, out, column=None, cl=False) -> None:
    """One GEMM per output plane over the window of its input planes (``K = kd*K2``);
    a bias ``column (O, 1)`` is added to each plane right after its GEMMs (starting the
    plane from it with ``beta = 1`` measured slower: the fill took the page faults on one
    thread)."""
    O, isz, dtype = geom.O, x.itemsize, x.dtype
    kd, kh, kw = geom.kernel
    K2 = geom.C * kh * kw
    wk = _plane_weights(w, geom)
    for slab in _slabs(geom, isz, rows=False):
        col, q0, P, ld = _unfold(x, geom, slab)
        tmp = _batch_buffer(slab, P, O, dtype, cl)
        for z in range(slab.d0, slab.d1):
            if tmp is None:
                c_ptr, ldc = _plane_ptr(out, slab.n0, z, cl)
                plane = _plane_major(out, slab, z, cl)
            else:
                c_ptr, ldc, plane = tmp.ctypes.data, tmp.shape[1], tmp
            runs = _runs(geom, z)
            for i, (a0, a1, q) in enumerate(runs):
                # y_z (+)= W'[:, a0:a1] (O x K) @ window (K x P)
                _gemm_out(
                    dtype, cl, P, O, (a1 - a0) * K2,
                    col.ctypes.data + (q - q0) * K2 * ld * isz, ld,
                    wk.ctypes.data + a0 * K2 * isz, kd * K2,
                    c_ptr, ldc,
                    1.0 if i else 0.0,
                )  # fmt: skip
            if not runs:
                plane[...] = 0
            if column is not None:  # right after its GEMMs, while the plane is in cache
                plane += _channel_column(column, plane.ndim, cl)
            if tmp is not None:
                view = _plane_major(out, slab, z, cl)
                view[...] = tmp.reshape(view.shape)
        del col, tmp  # free this slab's scratch before the next slab allocates its own


def _forward_tap_rows(x, w, geom: ConvGeometry, out, column=None, cl=False) -> None:
    """One GEMM per input plane, ``W'' (kd*O x K2)`` at once, accumulating the block of
    the output planes it feeds in a plane-major slab (see :func:`_tap_rows_slab`).

    With numba, on planes too large to batch items, the slabs are smaller
    (``THREADED_SLAB_BYTES``) and run whole on the engine's threads, BLAS
    single-threaded, as in :func:`_forward_tap_columns_threaded`: r3d18_stem 70-76 ->
    55 ms, i3d_stem 54 -> 45 (a slab re-unfolds the ``kd - 1`` input planes it shares
    with the next). Batched small planes keep one slab at a time and multithreaded
    GEMMs (c3d_conv5a: 64 against 77 ms threaded: smaller slabs, narrower GEMMs)."""
    isz, dtype = x.itemsize, x.dtype
    wm = _row_weights(w, geom) if _whole_row_weights(geom, isz) else None
    if not numba_available() or _max_batch(geom) > 1:
        scratch = _Scratch(dtype)  # the slabs' buffers, reused from slab to slab
        for slab in _slabs(geom, isz, rows=True):
            _tap_rows_slab(x, w, wm, geom, out, column, slab, scratch, cl)
        return
    cap = min(THREADED_SLAB_BYTES, config.workspace_bytes // 2)
    slabs = list(plan_slabs(geom, _cost(geom, isz, rows=True), cap))

    def work(task: int, ntasks: int) -> None:
        scratch = _Scratch(dtype)
        for slab in slabs[task::ntasks]:
            _tap_rows_slab(x, w, wm, geom, out, column, slab, scratch, cl)

    with single_threaded_blas():
        run_tasks(work, _threads(interleaved=False))


def _tap_rows_slab(x, w, wm, geom: ConvGeometry, out, column, slab: Slab, scratch, cl) -> None:
    """Tap rows on one slab: each input plane is unfolded (on this thread) just before
    its GEMM; each output plane is zeroed (or set to the bias ``column (O, 1)``) just
    before its first GEMM and copied out just after its last (all three while it is in
    cache). With ``wm`` None (a ``W''`` too large to hold whole), each depth tap's rows
    are re-laid from ``w`` just before its own GEMM. With ``cl`` the slab is held
    position-major (:func:`_slab_buffer`) and copied out to NDHWC as it lies."""
    O, dtype = geom.O, x.dtype
    kd, lo = geom.kernel[0], geom.pads[0][0]
    K2 = geom.C * geom.kernel[1] * geom.kernel[2]
    col, q0, P, ld = _column_buffer(geom, slab, dtype, planes=1, scratch=scratch)
    q1 = _plane_range(geom, slab.d0, slab.d1)[1]
    acc = _slab_buffer(scratch, "acc", geom, slab, cl)
    zeroed = done = slab.d0  # planes before these are zeroed / copied out
    for q in range(q0, q1):
        z0, z1, r0 = _row_block(geom, q, slab.d0, slab.d1)
        if z1 > z0:
            start = 0 if column is None else _channel_column(column, 2, cl)
            _slab_block(acc, zeroed - slab.d0, z1 - slab.d0, cl)[...] = start
            zeroed = max(zeroed, z1)
            _unfold_into(col, x, geom, slab, q, interleaved=True)
            # acc[z0:z1] (rows x P) += W''[r0:] (rows x K2) @ col_q (K2 x P), at once, or
            # tap by tap (z, a = q + lo - z) from each tap's re-laid rows
            for za, zb in [(z0, z1)] if wm is not None else [(z, z + 1) for z in range(z0, z1)]:
                rows = wm[r0:] if wm is not None else _tap_weights(w, geom, q + lo - za, scratch)
                c_ptr, ldc = _slab_ptr(acc, za - slab.d0, cl)
                _gemm_out(
                    dtype, cl, P, (zb - za) * O, K2,
                    col.ctypes.data, ld,
                    rows.ctypes.data, K2,
                    c_ptr, ldc,
                    1.0,
                )  # fmt: skip
        last = slab.d1 if q == q1 - 1 else min(slab.d1, q + lo - kd + 2)
        for z in range(done, last):  # complete: no later input plane feeds them
            if z < zeroed:
                plane = _slab_plane(acc, geom, slab, z - slab.d0, cl)
                _plane_major(out, slab, z, cl)[...] = plane
            else:  # no input plane feeds it (all padding)
                _fill_plane(out, slab, z, column, cl)
        done = max(done, last)
    for z in range(done, slab.d1):  # no input plane at all
        _fill_plane(out, slab, z, column, cl)


def _fill_plane(out: np.ndarray, slab: Slab, z: int, column, cl: bool = False) -> None:
    """An output plane no input reaches: zeros, or the bias."""
    planes = _plane_major(out, slab, z, cl)  # (O, nb, Ho, Wo) / (nb, Ho, Wo, O)
    planes[...] = 0 if column is None else _channel_column(column, 4, cl)


def _dy_plane(dy: np.ndarray, slab: Slab, z: int, buf, cl: bool = False):
    """Pointer and leading dimension of plane ``z`` of ``dy`` for the slab's items, as
    :func:`_plane_ptr` gives it (``(O, P)``, or ``(P, O)`` with ``cl``), through ``buf``
    (that shape) when the slab batches items."""
    if buf is None:
        return _plane_ptr(dy, slab.n0, z, cl)
    view = _plane_major(dy, slab, z, cl)
    buf.reshape(view.shape)[...] = view
    return buf.ctypes.data, buf.shape[1]


class _DyPlanes:
    """``dy`` of a slab in a :func:`_slab_buffer`, each plane copied in when first asked
    for (while the GEMMs that read it are near)."""

    def __init__(self, dy: np.ndarray, geom: ConvGeometry, slab: Slab, scratch: _Scratch, cl):
        self.dy, self.geom, self.slab, self.cl = dy, geom, slab, cl
        self.data = _slab_buffer(scratch, "dy", geom, slab, cl)
        self.ready = slab.d0

    def upto(self, z1: int) -> None:
        """Make planes ``< z1`` ready."""
        slab = self.slab
        for z in range(self.ready, z1):
            plane = _plane_major(self.dy, slab, z, self.cl)
            _slab_plane(self.data, self.geom, slab, z - slab.d0, self.cl)[...] = plane
        self.ready = max(self.ready, z1)


def backward_weight(
    x: np.ndarray, dy: np.ndarray, geom: ConvGeometry, channels_last: bool = False
) -> np.ndarray:
    """The weight gradient, ``geom.w_shape``; with ``channels_last``, from NDHWC ``x`` and
    ``dy`` (``dy`` read as it lies, ``x`` transposed in for the unfolding)."""
    x = _input_side(x, channels_last)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    O, kd, kh, kw = geom.O, *geom.kernel
    cl = channels_last
    if _tap_rows(geom) and geom.C >= _TAP_ROWS_MIN_C_WEIGHT:
        acc = _backward_weight_tap_rows(x, dy, geom, cl)  # (kd*O, K2), rows (kd-1-a, o)
        dw = acc.reshape(kd, O, geom.C, kh, kw)[::-1].transpose(1, 2, 0, 3, 4)
    else:
        if threaded_columns(geom, x.itemsize) and _weight_partials(geom, x.itemsize) >= 2:
            acc = _backward_weight_tap_columns_threaded(x, dy, geom, cl)
        else:
            acc = _backward_weight_tap_columns(x, dy, geom, cl)  # (O, kd*K2), cols (a, c, b, e)
        dw = acc.reshape(O, kd, geom.C, kh, kw).transpose(0, 2, 1, 3, 4)
    return parallel_copy(dw).reshape(geom.w_shape)  # (c3d_conv5a's 28 MB: 5 -> 2.5 ms)


#: Partial weight gradients of :func:`_backward_weight_tap_columns_threaded`: slab ``i``
#: goes to partial ``i % WEIGHT_PARTIALS``, whatever the thread count, and the partials
#: are summed in order (so the bits do not depend on the threads).
WEIGHT_PARTIALS = 8


def _weight_partials(geom: ConvGeometry, itemsize: int) -> int:
    """Partial sums of :func:`_backward_weight_tap_columns_threaded`: ``WEIGHT_PARTIALS``,
    fewer where the slabs are fewer or where they would pass half the workspace cap (a
    large weight: 512 x 512 x 27 is 28 MB a copy)."""
    Do = geom.spatial_out[0]
    dz = max(1, _threaded_planes(geom, itemsize))
    slabs = geom.N * -(-Do // dz)
    room = (config.workspace_bytes // 2) // max(1, geom.O * geom.C * geom.taps * itemsize)
    return int(min(WEIGHT_PARTIALS, slabs, room))


def _backward_weight_tap_columns_threaded(x, dy, geom: ConvGeometry, cl=False) -> np.ndarray:
    """Tap columns in the forward's slabs on the engine's threads, each slab unfolded and
    multiplied by one thread (BLAS single-threaded) into one of ``WEIGHT_PARTIALS``
    accumulators ``(K, O)``, summed at the end. Returns ``(O, kd*K2)``. Against the
    plane-by-plane path (ms, 0.1 s pauses): strided_down_s2 63 vs 88-92 (im2col 80),
    c3d_conv1a 34 vs 43, unet3d_enc1 26 vs 37, r3d18_stem 58 vs 72."""
    O, isz, dtype = geom.O, x.itemsize, x.dtype
    plan = _ItemSlabs(geom, x)
    K2, P, ld = plan.K2, plan.P, plan.ld
    parts = _weight_partials(geom, isz)
    acc = np.zeros((parts, geom.kernel[0] * K2, O), dtype=dtype)

    def work(g0: int, g1: int) -> None:
        col = plan.buffer()
        for g in range(g0, g1):
            for slab in plan.slabs[g::parts]:
                q0 = plan.unfold(slab, col)
                for z in range(slab.d0, slab.d1):
                    g_ptr, ldg = _plane_ptr(dy, slab.n0, z, cl)
                    for a0, a1, q in _runs(geom, z):
                        # acc[g, a0*K2 : a1*K2] (kr x O) += window (kr x P) @ dy_z.T (P x O)
                        # (Fortran: dy_z stored (P x O), transposed; (O x P) with cl)
                        gemm_f(
                            dtype, not cl, False, O, (a1 - a0) * K2, P,
                            g_ptr, ldg,
                            col.ctypes.data + (q - q0) * K2 * ld * isz, ld,
                            acc[g].ctypes.data + a0 * K2 * O * isz, O,
                            1.0,
                        )  # fmt: skip

    with single_threaded_blas():
        run_shares(work, parts, _threads(interleaved=False), per_thread=1)
    total = acc[0]
    for g in range(1, parts):
        total += acc[g]
    return total.T


def _backward_weight_tap_columns(x, dy, geom: ConvGeometry, cl=False) -> np.ndarray:
    """``dW' += dy_z @ window.T`` per output plane, each input plane unfolded (on one
    thread, between the GEMMs) as it enters a :class:`_PlaneRing`. Against unfolding all
    of a slab's planes first on both threads: the I3D and R3D stems' weight-gradient
    scratch 28.5 -> 12.6 and 28.4 -> 5.4 MiB, their backward pass the same time within
    the noise (interleaved fresh processes, ms: i3d 180-208 against 183-208, R3D 185-239
    against 178-181)."""
    O, isz, dtype = geom.O, x.itemsize, x.dtype
    kd, kh, kw = geom.kernel
    K2 = geom.C * kh * kw
    K = kd * K2
    o_rows = O <= K  # the operand with fewer rows goes second (see _blas.gemm_nt_acc)
    acc = np.zeros((K, O) if o_rows else (O, K), dtype=dtype)

    def unfold(slab, slot, q):
        _unfold_into(slot, x, geom, slab, q, interleaved=True)

    for ring in _PlaneRing.plan(geom, dtype, unfold):
        P, ld = ring.P, ring.ld
        # dy_z: Fortran (P x O), (O x P) with cl
        for g_ptr, ldg, pieces in ring.windows(dy, cl):
            for a0, a1, w_ptr in pieces:
                kr = (a1 - a0) * K2
                if o_rows:
                    # acc[a0*K2 : a1*K2] (kr x O) += window (kr x P) @ dy_z.T (P x O)
                    c_ptr = acc.ctypes.data + a0 * K2 * O * isz
                    gemm_f(dtype, not cl, False, O, kr, P, g_ptr, ldg, w_ptr, ld, c_ptr, O, 1.0)
                else:
                    # acc[:, a0*K2 : a1*K2] (O x kr) += dy_z (O x P) @ window.T (P x kr)
                    c_ptr = acc.ctypes.data + a0 * K2 * isz
                    gemm_f(dtype, True, cl, kr, O, P, w_ptr, ld, g_ptr, ldg, c_ptr, K, 1.0)
        del ring  # free this slab's scratch before the next slab allocates its own
    return acc.T if o_rows else acc


def _backward_weight_tap_rows(x, dy, geom: ConvGeometry, cl=False) -> np.ndarray:
    """Per input plane: ``dW''[block] += dy[planes it fed] @ col_q.T``."""
    O, isz, dtype = geom.O, x.itemsize, x.dtype
    K2 = geom.C * geom.kernel[1] * geom.kernel[2]
    acc = np.zeros((geom.kernel[0] * O, K2), dtype=dtype)
    scratch = _Scratch(dtype)  # the slabs' buffers, reused from slab to slab
    for slab in _slabs(geom, isz, rows=True):
        col, q0, P, ld = _column_buffer(geom, slab, dtype, planes=1, scratch=scratch)
        q1 = _plane_range(geom, slab.d0, slab.d1)[1]
        dys = _DyPlanes(dy, geom, slab, scratch, cl)
        for q in range(q0, q1):
            z0, z1, r0 = _row_block(geom, q, slab.d0, slab.d1)
            if z1 <= z0:
                continue
            dys.upto(z1)
            _unfold_into(col, x, geom, slab, q, interleaved=True)
            # Fortran: dW''[r0:]^T (K2 x rows) += col_q (K2 x P) @ dy[z0:z1]^T (P x rows)
            # (the block of dy stored (P x rows); with cl (rows x P), rows dz*O apart)
            g_ptr, ldg = _slab_ptr(dys.data, z0 - slab.d0, cl)
            gemm_f(
                dtype, True, cl, K2, (z1 - z0) * O, P,
                col.ctypes.data, ld,
                g_ptr, ldg,
                acc.ctypes.data + r0 * K2 * isz, K2,
                1.0,
            )  # fmt: skip
    return acc


def backward_input(
    dy: np.ndarray, w: np.ndarray, geom: ConvGeometry, channels_last: bool = False
) -> np.ndarray:
    """The input gradient, ``geom.in_shape``; with ``channels_last``, NDHWC from NDHWC
    ``dy`` (``dy`` read as it lies, ``dx`` folded in NCDHW and transposed out)."""
    dy = np.ascontiguousarray(dy)
    w = w.astype(dy.dtype, copy=False)
    dx = np.zeros(geom.in_shape, dtype=dy.dtype)
    cl = channels_last
    # Tap columns even where the forward stacks tap rows: measured faster on the stems
    # (i3d 57-60 vs 70-72 ms, R3D 66-70 vs 75-79), the only such layers that get here
    # (a stride-1 dx with 16+ channels is a forward convolution).
    if threaded_columns(geom, dy.itemsize):
        # The forward and weight gradient of this layer run on the engine's threads with
        # BLAS single-threaded; a multithreaded BLAS here would leave a thread spinning
        # into them. Training step in a loop: c3d_conv1a 146-150 -> 103-108 ms,
        # unet3d_enc1 121-139 -> 97-100. (Not the tap-rows stems: R3D's dx 127 -> 185.)
        with own_threads():
            _backward_input_tap_columns(dy, w, geom, dx, cl)
    else:
        _backward_input_tap_columns(dy, w, geom, dx, cl)
    return transpose_channels(dx, to_last=True) if cl else dx


def _backward_input_tap_columns(dy, w, geom: ConvGeometry, dx, cl=False) -> None:
    """Per output plane: ``window += W'.T @ dy_z`` (accumulated in plane order) into a
    :class:`_PlaneRing` whose planes start at zero and are folded (the in-plane col2im)
    into ``dx`` as soon as no later output plane reaches them. Against holding and
    folding all of a slab's planes at the end: the I3D stem's dx peak 33.1 -> 17.5 MiB,
    time the same."""
    O, isz, dtype = geom.O, dy.itemsize, dy.dtype
    kd, kh, kw = geom.kernel
    K2 = geom.C * kh * kw
    wk = _plane_weights(w, geom)

    def zero(slab, slot, q):
        slot[...] = 0

    # Folds on one thread: right after the multithreaded GEMMs an OpenBLAS thread spins
    # on the other core (c3d_conv5a dw + dx 133-137 -> 124-128 ms)
    def fold(slab, slot, q):
        _fold(dx, slot, geom, slab, q, interleaved=True)

    for ring in _PlaneRing.plan(geom, dtype, zero, fold):
        P, ld = ring.P, ring.ld
        # dy_z: Fortran (P x O), (O x P) with cl
        for g_ptr, ldg, pieces in ring.windows(dy, cl):
            for a0, a1, c_ptr in pieces:
                # Fortran: window^T (P x kr) += dy_z^T (P x O) @ W'[:, a0:a1] (O x kr)
                gemm_f(
                    dtype, cl, True, P, (a1 - a0) * K2, O,
                    g_ptr, ldg,
                    wk.ctypes.data + a0 * K2 * isz, kd * K2,
                    c_ptr, ld,
                    1.0,
                )  # fmt: skip
        del ring
