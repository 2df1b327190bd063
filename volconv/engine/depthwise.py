"""Direct depthwise / small-group convolution: numba loops, no GEMM, no im2col.

A depthwise 3D convolution (``groups == C``) does ``Cg * kd*kh*kw`` multiply-adds per
output (27 for 3x3x3), far too few for a GEMM: im2col spends its time unfolding and
in tiny per-group matmuls, and PyTorch/oneDNN manage ~7 GF/s forward, ~3 GF/s backward.
The work is nearly bandwidth-bound, so this kernel makes one pass over the input and
the output and keeps everything in between in L1/L2.

Layout. Work items are ``(batch n, group g, output-depth chunk)``. For an item the
input planes its outputs read are copied into a small zero-padded buffer (never a
padded copy of the whole input) in *polyphase* layout::

    buf[c, plane, py, px, r, q] = x_padded[c, plane, r*sh + py, q*sw + px]

with ``(sh, sw)`` the H/W strides. In that layout every kernel tap ``(a, b, e)`` of a
stride-``s``, dilation-``d`` convolution is a *stride-1 shift* of one phase plane:
phase ``(b*dh % sh, e*dw % sw)``, offset ``(b*dh // sh, e*dw // sw)``. Flattening
a phase plane's ``(Hq, Wq)`` grid, a block of output rows is computed on an
``(Ho, Wq)`` grid (``Wq - Wo`` junk columns per row, a few percent) by long contiguous
loops::

    acc[i] = sum over taps t of w[t] * buf[base + off[t] + i],  i < (rows-1)*Wq + Wo

which LLVM vectorises without ``fastmath`` because nothing is reduced over ``i``;
short per-row loops (40 wide here) would spend their time in scalar remainders. Taps
are summed four per pass (``acc`` is loaded and stored once per four taps) and in tap
order, and ``acc`` covers a block of rows that stays in L1. Negative pads (the
engine's transposed geometries) are crops: the buffer simply starts inside the input.

Gradients reuse the same buffers and offsets:

- ``dw``: per item ``(g, block of output channels)``, per-position accumulators
  ``acc[j, t, i] += dy_grid[i] * buf[base + off[t] + i]`` (again no reduction inside
  the vector loop), reduced in float64 over the valid positions at the end of the item.
- ``dx`` (used for strided layers; a stride-1 ``dx`` is a forward convolution on the
  transposed geometry, which is depthwise too): the transpose of the forward loop,
  ``dxbuf[base + off[t] + i] += w[t] * dy_grid[i]``, then the buffer is added into
  ``dx``. Items are ``(n, g)`` with depth chunks done in order, so overlapping chunk
  halos never race.

Channels-last: depthwise layers with multiplier 1 (``G == C == O``) are also computed on
NDHWC arrays as they lie (:func:`forward_channels_last`,
:func:`backward_weight_channels_last`): every tap is one unit-stride loop over the
channels, taps on padding skipped by bounds, no buffer (see the section above the
channels-last kernels below).

Parallelism: ``numba.get_num_threads()`` workers, worker ``w`` taking items
``w, w + nw, ...``, run as Python threads over ``nogil`` kernels (see :func:`_run`).
Every output, ``dx`` and ``dw`` element is summed by one worker in an order fixed by
the geometry: results are bit-for-bit reproducible for any thread count.

numba is an optional extra (``volconv[fast]``). It is imported, and the kernels
compiled (``cache=True``: once per machine, ~8 s of CPU for float32 + float64; ~0.5 s
to load from the cache afterwards), on the first call only; without numba
:func:`supports` is False and the chooser falls back to the GEMM algorithms.
"""

from __future__ import annotations

import math

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._numba_runtime import TASKS_PER_THREAD, compile_once, numba_available, run_tasks

NAME = "depthwise"

#: Channels per group up to which the direct loops are offered. Measured against
#: im2col's batched GEMMs they win 4-10x at Cg = 4, 8, 16 (each output costs Cg*k^3
#: multiply-adds either way, and per-group GEMMs that thin run badly).
MAX_CG = 16

#: Target bytes of one worker's input buffer (a fraction of a 1-2 MiB L2).
_BUFFER_TARGET = 512 << 10
#: Target bytes of one output-row block of the accumulator (well inside a 32-48 KiB L1d).
_ACC_TARGET = 16 << 10
#: Target bytes of the weight-gradient accumulators of one item (L2).
_DW_ACC_TARGET = 256 << 10


def supports(geom: ConvGeometry) -> bool:
    """Direct loops for few channels per group; needs numba."""
    return geom.Cg <= MAX_CG and numba_available()


# --------------------------------------------------------------------------- planning


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _plan(geom: ConvGeometry, itemsize: int, nw: int, items_per_chunk: int) -> dict:
    """Buffer layout, tap offsets and chunking shared by the three kernels."""
    (kd, kh, kw), (dd, dh, dw) = geom.kernel, geom.dilation
    Do, Ho, Wo = geom.spatial_out
    # A stride along an axis with one output is irrelevant: taking it as 1 keeps the
    # polyphase buffer (sh * sw phase planes) small whatever the stride.
    sd, sh, sw = (s if n > 1 else 1 for s, n in zip(geom.stride, geom.spatial_out, strict=True))
    # Padded rows/columns actually read (the padded extent can exceed them when the
    # stride does not divide it), split into sh x sw phases.
    Hu = (Ho - 1) * sh + (kh - 1) * dh + 1
    Wu = (Wo - 1) * sw + (kw - 1) * dw + 1
    Hq, Wq = _ceil_div(Hu, sh), _ceil_div(Wu, sw)
    nph = sh * sw
    plane = nph * Hq * Wq  # one input depth plane in the buffer

    def planes(dz: int) -> int:
        return (dz - 1) * sd + (kd - 1) * dd + 1

    # Largest depth chunk whose buffer fits the cache target and the workspace cap,
    # then smaller if needed so that both cores get several items.
    cap = min(_BUFFER_TARGET, max(1, config.workspace_bytes // (2 * nw)))
    dz = 1
    while dz < Do and geom.Cg * planes(dz + 1) * plane * itemsize <= cap:
        dz += 1
    want = 4 * nw
    if items_per_chunk * _ceil_div(Do, dz) < want:
        dz = max(1, _ceil_div(Do, _ceil_div(want, max(1, items_per_chunk))))
    npl = planes(dz)

    offs = np.empty(geom.Cg * kd * kh * kw, dtype=np.int64)
    t = 0
    for c in range(geom.Cg):
        for a in range(kd):
            for b in range(kh):
                for e in range(kw):
                    phase = (b * dh % sh) * sw + e * dw % sw
                    offs[t] = (
                        ((c * npl + a * dd) * nph + phase) * Hq * Wq
                        + (b * dh // sh) * Wq
                        + e * dw // sw
                    )
                    t += 1
    rows = max(1, min(Ho, _ACC_TARGET // (Wq * itemsize)))
    geo = (sd, sh, sw, geom.pads[0][0], geom.pads[1][0], geom.pads[2][0], Hu, Wu, Hq, Wq, dz, npl)
    return {"geo": geo, "offs": offs, "bufsize": geom.Cg * npl * plane, "rows": rows}


def _threads() -> int:
    return int(_kernels()["numba"].get_num_threads())


# ----------------------------------------------------------------- kernels (numba)


def _fill(dst, value):  # pragma: no cover - compiled
    # Explicit loops over 1-D views (not slice assignment): they vectorise and the
    # non-negative range index needs no wraparound check.
    for i in range(dst.shape[0]):
        dst[i] = value


def _copy(dst, src):  # pragma: no cover - compiled
    for i in range(dst.shape[0]):
        dst[i] = src[i]


def _columns(px, geo, W):  # pragma: no cover - compiled
    """Buffer columns ``[qlo, qhi)`` of phase ``px`` that hold input samples, and the
    input column of ``qlo``: ``0 <= q*sw + px - pwl < W`` and ``q*sw + px < Wu``."""
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    qlo = min(max(0, -((px - pwl) // sw)), Wq)
    qhi = min(-((px - Wu) // sw), -((px - pwl - W) // sw), Wq)
    return qlo, max(qhi, qlo), qlo * sw + px - pwl


def _gather(x, n, c0, cg, zstart, geo, buf):  # pragma: no cover - compiled
    """Copy input planes ``zstart .. zstart+npl`` of channels ``c0 .. c0+cg`` of item
    ``n`` into ``buf`` in padded polyphase layout.

    Only samples inside the input are written (and planes outside it zeroed): the
    padding positions of ``buf`` are the same for every item, so the caller zeroes
    the buffer once and they stay zero.
    """
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    D, H, W = x.shape[2], x.shape[3], x.shape[4]
    PP = Hq * Wq
    nph = sh * sw
    for c in range(cg):
        for p in range(npl):
            zi = zstart + p
            pbase = (c * npl + p) * nph * PP
            if zi < 0 or zi >= D:
                _fill(buf[pbase : pbase + nph * PP], 0)
                continue
            for py in range(sh):
                for r in range(Hq):
                    y = r * sh + py
                    yi = y - phl
                    if y >= Hu or yi < 0 or yi >= H:
                        continue
                    for px in range(sw):
                        row = pbase + ((py * sw + px) * Hq + r) * Wq
                        qlo, qhi, xi = _columns(px, geo, W)
                        src = x[n, c0 + c, zi, yi]
                        if sw == 1:
                            _copy(buf[row + qlo : row + qhi], src[xi:])
                        else:
                            _copy(buf[row + qlo : row + qhi], src[xi::sw])


def _scatter_add(dx, n, c0, cg, zstart, geo, buf):  # pragma: no cover - compiled
    """The adjoint of :func:`_gather`: add the buffer's in-range samples into ``dx``."""
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    D, H, W = dx.shape[2], dx.shape[3], dx.shape[4]
    PP = Hq * Wq
    nph = sh * sw
    for c in range(cg):
        for p in range(npl):
            zi = zstart + p
            if zi < 0 or zi >= D:
                continue
            pbase = (c * npl + p) * nph * PP
            for py in range(sh):
                for r in range(Hq):
                    y = r * sh + py
                    yi = y - phl
                    if y >= Hu or yi < 0 or yi >= H:
                        continue
                    for px in range(sw):
                        row = pbase + ((py * sw + px) * Hq + r) * Wq
                        qlo, qhi, xi = _columns(px, geo, W)
                        src = buf[row + qlo : row + qhi]
                        dst = dx[n, c0 + c, zi, yi, xi::sw]
                        for i in range(src.shape[0]):
                            dst[i] += src[i]


def _taps_into(acc, ln, buf, base, offs, wv):  # pragma: no cover - compiled
    """``acc[:ln] = sum_t wv[t] * buf[base + offs[t] : ... + ln]``, summed in tap order.

    Four taps per pass, so ``acc`` is loaded and stored once per four taps; three loop
    bodies only, to keep the JIT compile short.
    """
    T = offs.shape[0]
    s0 = buf[base + offs[0] : base + offs[0] + ln]
    w0 = wv[0]
    for i in range(ln):
        acc[i] = w0 * s0[i]
    t = 1
    while t + 4 <= T:
        s0 = buf[base + offs[t] : base + offs[t] + ln]
        s1 = buf[base + offs[t + 1] : base + offs[t + 1] + ln]
        s2 = buf[base + offs[t + 2] : base + offs[t + 2] + ln]
        s3 = buf[base + offs[t + 3] : base + offs[t + 3] + ln]
        w0, w1, w2, w3 = wv[t], wv[t + 1], wv[t + 2], wv[t + 3]
        for i in range(ln):
            acc[i] = acc[i] + w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i]
        t += 4
    while t < T:
        s0 = buf[base + offs[t] : base + offs[t] + ln]
        w0 = wv[t]
        for i in range(ln):
            acc[i] += w0 * s0[i]
        t += 1


def _forward_worker(worker, nw, x, w, out, offs, geo, rows, bufsize):  # pragma: no cover
    """``out[n, g*Og + j] = sum_{c, taps} w[g, j, c, tap] * x[n, g*Cg + c, shifted]``."""
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    N = x.shape[0]
    G, Og, T = w.shape
    Cg = x.shape[1] // G
    Do, Ho, Wo = out.shape[2], out.shape[3], out.shape[4]
    nchunk = (Do + dz - 1) // dz
    items = N * G * nchunk
    zstep = sd * sh * sw * Hq * Wq
    buf = np.zeros(bufsize, dtype=x.dtype)  # padding positions stay zero
    acc = np.empty(rows * Wq, dtype=x.dtype)
    for item in range(worker, items, nw):
        n = item // (G * nchunk)
        g = (item // nchunk) % G
        z0 = (item % nchunk) * dz
        z1 = min(Do, z0 + dz)
        _gather(x, n, g * Cg, Cg, z0 * sd - pdl, geo, buf)
        for j in range(Og):
            wv = w[g, j]
            o = g * Og + j
            for z in range(z0, z1):
                base = (z - z0) * zstep
                for h0 in range(0, Ho, rows):
                    h1 = min(Ho, h0 + rows)
                    ln = (h1 - h0 - 1) * Wq + Wo
                    _taps_into(acc, ln, buf, base + h0 * Wq, offs, wv)
                    for h in range(h0, h1):
                        r = (h - h0) * Wq
                        _copy(out[n, o, z, h], acc[r : r + Wo])


def _dy_grid(dy, n, o, z, Wq, grid):  # pragma: no cover - compiled
    """``dy[n, o, z]`` on the ``(Ho, Wq)`` grid; the junk columns are left alone (the
    caller zeroes the grid once)."""
    Ho, Wo = dy.shape[3], dy.shape[4]
    for h in range(Ho):
        _copy(grid[h * Wq : h * Wq + Wo], dy[n, o, z, h])


def _backward_weight_worker(
    worker, nw, x, dy, dw, offs, geo, rows, bufsize, jb
):  # pragma: no cover
    """``dw[g, j, t] = sum_{n, z, h, w} dy[n, g*Og+j, z, h, w] * x[n, ..., shifted by t]``."""
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    N = x.shape[0]
    G, Og, T = dw.shape
    Cg = x.shape[1] // G
    Do, Ho, Wo = dy.shape[2], dy.shape[3], dy.shape[4]
    nchunk = (Do + dz - 1) // dz
    nblk = (Og + jb - 1) // jb
    items = G * nblk
    zstep = sd * sh * sw * Hq * Wq
    seg = rows * Wq
    buf = np.zeros(bufsize, dtype=x.dtype)  # padding positions stay zero
    grid = np.zeros(Ho * Wq, dtype=x.dtype)
    acc = np.empty((jb, T, seg), dtype=x.dtype)
    for item in range(worker, items, nw):
        g = item // nblk
        j0 = (item % nblk) * jb
        j1 = min(Og, j0 + jb)
        _fill(acc.reshape(-1), 0)
        for n in range(N):
            for ch in range(nchunk):
                z0 = ch * dz
                z1 = min(Do, z0 + dz)
                _gather(x, n, g * Cg, Cg, z0 * sd - pdl, geo, buf)
                for z in range(z0, z1):
                    base = (z - z0) * zstep
                    for j in range(j0, j1):
                        _dy_grid(dy, n, g * Og + j, z, Wq, grid)
                        for h0 in range(0, Ho, rows):
                            h1 = min(Ho, h0 + rows)
                            ln = (h1 - h0 - 1) * Wq + Wo
                            d = grid[h0 * Wq : h0 * Wq + ln]
                            for t in range(T):
                                p = base + h0 * Wq + offs[t]
                                s = buf[p : p + ln]
                                a = acc[j - j0, t]
                                for i in range(ln):
                                    a[i] += d[i] * s[i]
        # Fixed-order float64 reduction over the valid (non-junk) positions.
        for j in range(j0, j1):
            for t in range(T):
                total = 0.0
                a = acc[j - j0, t]
                for r in range(rows):
                    for i in range(Wo):
                        total += a[r * Wq + i]
                dw[g, j, t] = total


def _backward_input_worker(worker, nw, dy, w, dx, offs, geo, bufsize):  # pragma: no cover
    """``dx`` by scattering each tap of ``w * dy`` into a padded buffer, then into dx."""
    sd, sh, sw, pdl, phl, pwl, Hu, Wu, Hq, Wq, dz, npl = geo
    N = dx.shape[0]
    G, Og, T = w.shape
    Cg = dx.shape[1] // G
    Do, Ho, Wo = dy.shape[2], dy.shape[3], dy.shape[4]
    nchunk = (Do + dz - 1) // dz
    items = N * G
    zstep = sd * sh * sw * Hq * Wq
    L = (Ho - 1) * Wq + Wo
    buf = np.empty(bufsize, dtype=dx.dtype)
    grid = np.zeros(Ho * Wq, dtype=dx.dtype)  # junk columns stay zero: nothing scattered
    for item in range(worker, items, nw):
        n = item // G
        g = item % G
        for ch in range(nchunk):
            z0 = ch * dz
            z1 = min(Do, z0 + dz)
            _fill(buf, 0)
            for z in range(z0, z1):
                base = (z - z0) * zstep
                for j in range(Og):
                    _dy_grid(dy, n, g * Og + j, z, Wq, grid)
                    d = grid[:L]
                    for t in range(T):
                        wt = w[g, j, t]
                        p = base + offs[t]
                        s = buf[p : p + L]
                        for i in range(L):
                            s[i] += wt * d[i]
            _scatter_add(dx, n, g * Cg, Cg, z0 * sd - pdl, geo, buf)


# ------------------------------------------------------- channels-last (NDHWC) kernels
#
# In NDHWC a depthwise layer (one channel per group, multiplier 1) needs no buffer: a
# sample's channels are contiguous, so every tap is ``acc[xo, :] += w[t, :] *
# x[n, zi, yi, xi, :]``, one unit-stride loop over the channels (the vector lanes), taps
# on padding skipped by bounds. Items are output rows ``(n, z, y)``; a row's accumulator
# ``(Wo, C)`` stays in L1.


def _cl_range(size, out, s, p, tap):  # pragma: no cover - compiled
    """Outputs ``[lo, hi)`` along an axis whose input sample ``o*s - p + tap`` is in
    ``[0, size)``."""
    lo = 0
    if tap < p:
        lo = (p - tap + s - 1) // s
    hi = min(out, (size - 1 + p - tap) // s + 1) if size - 1 + p - tap >= 0 else 0
    return lo, max(lo, hi)


def _cl_rows(z, yo, D, H, geo, rows):  # pragma: no cover - compiled
    """The input rows that output row ``(z, yo)`` reads: ``rows[i] = (zi, yi, t0)`` for
    every tap pair ``(a, b)`` inside the input (``t0 = (a*kh + b)*kw``, its first tap);
    returns how many."""
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw = geo
    count = 0
    for a in range(kd):
        zi = z * sd - pd + a * dd
        if zi < 0 or zi >= D:
            continue
        for b in range(kh):
            yi = yo * sh - ph + b * dh
            if yi < 0 or yi >= H:
                continue
            rows[count, 0], rows[count, 1], rows[count, 2] = zi, yi, (a * kh + b) * kw
            count += 1
    return count


def _cl_forward_worker(task, ntasks, x, w, bias, y, geo):  # pragma: no cover - compiled
    """``y[n, z, yo, xo, c] = sum_t w[t, c] * x[n, z*sd - pd + a*dd, ..., c] (+ bias[c])``
    for the output rows ``(n, z, yo)`` of this task; taps ``t = (a*kh + b)*kw + e``."""
    N, D, H, W, C = x.shape
    Do, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw = geo
    rows = N * Do * Ho
    acc = np.empty((Wo, C), dtype=y.dtype)
    inputs = np.empty((kd * kh, 3), dtype=np.int64)
    for r in range(task * rows // ntasks, (task + 1) * rows // ntasks):
        n = r // (Do * Ho)
        z = (r // Ho) % Do
        yo = r % Ho
        for xo in range(Wo):
            for c in range(C):
                acc[xo, c] = 0
        for i in range(_cl_rows(z, yo, D, H, geo, inputs)):
            src = x[n, inputs[i, 0], inputs[i, 1]]
            for e in range(kw):
                wt = w[inputs[i, 2] + e]
                lo, hi = _cl_range(W, Wo, sw, pw, e * dw)
                for xo in range(lo, hi):
                    s = src[xo * sw - pw + e * dw]
                    for c in range(C):
                        acc[xo, c] += wt[c] * s[c]
        out = y[n, z, yo]
        if bias.shape[0] == 0:
            for xo in range(Wo):
                for c in range(C):
                    out[xo, c] = acc[xo, c]
        else:
            for xo in range(Wo):
                for c in range(C):
                    out[xo, c] = acc[xo, c] + bias[c]


def _cl_weight_worker(task, ntasks, x, dy, geo, acc):  # pragma: no cover - compiled
    """``acc[task, t, c] = sum dy[n, z, yo, xo, c] * x[n, ..shifted by tap t.., c]`` over
    this task's output rows, each row's share summed in float32 (at most ``Wo`` terms)
    and added in float64."""
    N, D, H, W, C = x.shape
    Do, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw = geo
    rows = N * Do * Ho
    part = np.empty(C, dtype=dy.dtype)
    mine = acc[task]
    inputs = np.empty((kd * kh, 3), dtype=np.int64)
    for r in range(task * rows // ntasks, (task + 1) * rows // ntasks):
        n = r // (Do * Ho)
        z = (r // Ho) % Do
        yo = r % Ho
        g = dy[n, z, yo]
        for i in range(_cl_rows(z, yo, D, H, geo, inputs)):
            src = x[n, inputs[i, 0], inputs[i, 1]]
            for e in range(kw):
                t = inputs[i, 2] + e
                lo, hi = _cl_range(W, Wo, sw, pw, e * dw)
                for c in range(C):
                    part[c] = 0
                for xo in range(lo, hi):
                    s = src[xo * sw - pw + e * dw]
                    gx = g[xo]
                    for c in range(C):
                        part[c] += gx[c] * s[c]
                for c in range(C):
                    mine[t, c] += part[c]


@compile_once
def _kernels() -> dict:
    """Wrap every kernel in ``numba.njit``, once per process; they compile (or load from
    numba's cache) on their first call."""
    import numba

    # fastmath off: no reassociation, so every sum keeps the order written here.
    # nogil: the workers run in parallel Python threads (see :func:`_run`).
    jit = numba.njit(cache=True, fastmath=False, nogil=True)
    module = globals()
    # The workers see their helpers as globals, so those are wrapped first.
    for name in ("_fill", "_copy", "_columns", "_gather", "_scatter_add", "_taps_into", "_dy_grid"):
        module[name] = jit(module[name])
    # The channels-last kernels contract multiply-adds into FMAs (still no reassociation:
    # every sum keeps its order, so results are reproducible for a thread count).
    cl = numba.njit(cache=True, fastmath={"contract"}, nogil=True)
    for name in ("_cl_range", "_cl_rows"):
        module[name] = numba.njit(cache=True, inline="always")(module[name])
    return {
        "numba": numba,
        "forward": jit(_forward_worker),
        "backward_weight": jit(_backward_weight_worker),
        "backward_input": jit(_backward_input_worker),
        "cl_forward": cl(_cl_forward_worker),
        "cl_weight": cl(_cl_weight_worker),
    }


_run = run_tasks  # see _numba_runtime.py


# ------------------------------------------------------------------------- entry points


def _weights(w: np.ndarray, geom: ConvGeometry, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=dtype).reshape(geom.G, geom.Og, -1)


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``y = conv3d(x, w)`` for grouped weight ``w (G, Og, Cg, kd, kh, kw)``."""
    kernels = _kernels()
    x = np.ascontiguousarray(x)
    if geom.taps == 0 or 0 in geom.out_shape:  # an empty sum
        return np.zeros(geom.out_shape, dtype=x.dtype)
    out = np.empty(geom.out_shape, dtype=x.dtype)
    nw = _threads()
    plan = _plan(geom, x.itemsize, nw, geom.N * geom.G)
    args = (x, _weights(w, geom, x.dtype), out, plan["offs"], plan["geo"], plan["rows"])
    _run(kernels["forward"], nw, *args, plan["bufsize"])
    return out


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dL/dw`` in grouped form ``(G, Og, Cg, kd, kh, kw)``."""
    kernels = _kernels()
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    if geom.taps == 0 or x.size == 0 or dy.size == 0:
        return np.zeros(geom.w_shape, dtype=x.dtype)
    nw = _threads()
    # Items are (group, block of jb output channels): whole groups when there are
    # enough of them, else blocks so that both cores get work. jb and the accumulator
    # row block depend on the geometry only, never on the thread count, so neither does
    # any element's summation order.
    jb = max(1, min(geom.Og, 4, geom.G * geom.Og // 8))
    plan = _plan(geom, x.itemsize, nw, geom.G * _ceil_div(geom.Og, jb))
    # Row block of the per-position accumulators (jb, T, rows*Wq) within the target.
    Wq = plan["geo"][9]
    per_row = jb * geom.reduction * Wq * x.itemsize
    rows = max(1, min(geom.spatial_out[1], _DW_ACC_TARGET // per_row))
    dw = np.empty((geom.G, geom.Og, geom.reduction), dtype=x.dtype)
    args = (x, dy, dw, plan["offs"], plan["geo"], rows, plan["bufsize"], jb)
    _run(kernels["backward_weight"], nw, *args)
    return dw.reshape(geom.w_shape)


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dL/dx`` (the transposed convolution), any stride."""
    kernels = _kernels()
    dy = np.ascontiguousarray(dy)
    dx = np.zeros(geom.in_shape, dtype=dy.dtype)
    if geom.taps == 0 or dx.size == 0 or dy.size == 0:
        return dx
    nw = _threads()
    plan = _plan(geom, dy.itemsize, nw, math.inf)  # items are whole (n, g): no split
    args = (dy, _weights(w, geom, dy.dtype), dx, plan["offs"], plan["geo"], plan["bufsize"])
    _run(kernels["backward_input"], nw, *args)
    return dx


def channels_last(geom: ConvGeometry) -> bool:
    """Whether the layer's NDHWC form is computed here as it lies: depthwise layers with
    one channel per group and multiplier 1 (``G == C == O``)."""
    return geom.Cg == 1 and geom.Og == 1 and numba_available()


def _cl_geo(geom: ConvGeometry) -> tuple:
    return (*geom.kernel, *geom.stride, *(p[0] for p in geom.pads), *geom.dilation)


def forward_channels_last(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias: np.ndarray | None = None
) -> np.ndarray:
    """``y (N, Do, Ho, Wo, C)`` from ``x (N, D, H, W, C)`` for a :func:`channels_last`
    layer (any stride, padding, dilation), plus ``bias`` when given."""
    x = np.ascontiguousarray(x)
    y = np.empty((geom.N, *geom.spatial_out, geom.O), dtype=x.dtype)
    if y.size == 0:
        return y
    wt = np.ascontiguousarray(w.reshape(geom.O, geom.taps).T, dtype=x.dtype)  # (taps, C)
    b = np.zeros(0, x.dtype) if bias is None else np.asarray(bias, dtype=x.dtype).reshape(-1)
    _run(_kernels()["cl_forward"], _threads(), x, wt, b, y, _cl_geo(geom))
    return y


def backward_weight_channels_last(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry):
    """``dL/dw`` (shape ``geom.w_shape``) from NDHWC ``x`` and ``dy`` for a
    :func:`channels_last` layer: per task float64 accumulators, added in task order."""
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    nw = _threads()
    ntasks = 1 if nw <= 1 else nw * TASKS_PER_THREAD  # as run_tasks splits the rows
    acc = np.zeros((ntasks, geom.taps, geom.O), dtype=np.float64)
    if x.size and dy.size:
        _run(_kernels()["cl_weight"], nw, x, dy, _cl_geo(geom), acc)
    dw = acc[0]
    for task in range(1, ntasks):
        dw = dw + acc[task]
    return np.ascontiguousarray(dw.T, dtype=x.dtype).reshape(geom.w_shape)
