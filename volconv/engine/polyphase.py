"""The input gradient of strided convolutions by phases: no col2im, no scatter-add.

With stride ``s`` on an axis, input position ``x = i*s + r`` (phase ``r``) is reached
only by the kernel taps ``a`` with ``(r + lo - a*d) % s == 0``, each from output
``z = i + off`` with ``off = (r + lo - a*d) // s``. Each of the ``sd*sh*sw`` phases of
``dx`` is therefore a stride-1 correlation of ``dy`` with a sub-kernel, and in 3-D every
tap of a phase reads ``dy`` at one of a few *shifts* ``(off_d, off_h, off_w)``, shared
by all the phases (stride 2, kernel 3: 8 shifts for the 27 taps). Per slab of phase
planes of one item::

    U[j] (O, Q)  = dy shifted by shift j, zero outside     (8 copies of a dy slab)
    R[p] (C, Q)  = sum over the taps t of phase p:  W_t^T (C, O) @ U[shift(t)]
    dx[..., i*s + r] = R[p][..., i]                        (every dx element once)

The taps of a phase are ordered by shift, so taps whose shifts are consecutive are one
GEMM with ``K = O * run``. Against the in-plane unfolding's GEMM + col2im it copies
``dy`` 8 times instead of adding ``dx`` 27 times, and its GEMMs have ``M = C`` rather
than a ``K = O`` reduction (strided_down_s2 dx: see ``conv3d_backward_input``).

Slabs are small (a few MiB, in cache) and run whole on the engine's threads, each slab
on one thread with a single-threaded BLAS: no OpenBLAS thread is woken to spin. Each
``dx`` element is computed by one slab in a fixed order of GEMMs, so the result does not
depend on the thread count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_f, single_threaded_blas
from ._memory import check_allocation
from ._numba_runtime import compile_once, engine_threads, numba_available, run_tasks

NAME = "polyphase"

#: Scratch bytes of one slab (its dy shifts and phase results): a few MiB, near a
#: core's 2 MiB L2, between the copies and the GEMMs that read them (strided_down_s2:
#: 2 MiB 93 ms, 4 MiB 80-83, 8 MiB 78-82, 16 MiB 81-87).
SLAB_TARGET_BYTES = 4 << 20


#: Fewest input channels (the GEMMs' ``M``) for which the chooser takes this algorithm;
#: the 3-channel stems measured 10-20x slower than the in-plane unfolding's col2im.
MIN_CHANNELS = 16
#: Fewest flops per batch item for the chooser: below, the per-slab and per-phase calls
#: cost more than col2im (16 -> 32 channels onto 4^3, 1.8 MFLOP: 3.0 vs 1.7 ms; 14 MFLOP:
#: a tie; 57 MFLOP: 4.4 vs 4.7; 453 MFLOP: 8.9 vs 14.4).
MIN_ITEM_FLOPS = 32_000_000


def supports(geom: ConvGeometry) -> bool:
    return geom.G == 1 and geom.stride != (1, 1, 1)


def prefer(geom: ConvGeometry) -> bool:
    """Whether the input gradient goes through here: dense, strided in depth (an in-plane
    stride alone is the in-plane unfolding's: 64 channels with stride (1, 2, 2) measured
    a tie), and enough channels and work for its GEMMs."""
    axes = tuple(_axis(geom, a) for a in range(3))
    return (
        supports(geom)
        and geom.stride[0] > 1
        and geom.C >= MIN_CHANNELS
        and geom.flops() >= MIN_ITEM_FLOPS * geom.N
        and _plane_bytes(geom, axes, 8) <= config.workspace_bytes // 2  # a plane a thread
    )


@dataclass(frozen=True)
class _Axis:
    """One axis's phases: ``counts[r]`` inputs ``x = i*s + r`` per phase, ``taps[r]``
    the ``(a, shift index)`` of phase ``r``, ``offsets[j]`` shift ``j``'s offset."""

    stride: int
    length: int  # phase length: ceil(D / s), the longest phase
    counts: tuple[int, ...]
    taps: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[int, ...]


def _axis(geom: ConvGeometry, axis: int) -> _Axis:
    s, k, d = geom.stride[axis], geom.kernel[axis], geom.dilation[axis]
    lo, D = geom.pads[axis][0], geom.spatial_in[axis]
    raw = [
        [(a, (r + lo - a * d) // s) for a in range(k) if (r + lo - a * d) % s == 0]
        for r in range(s)
    ]
    offsets = tuple(sorted({off for taps in raw for _, off in taps}))
    taps = tuple(tuple((a, offsets.index(off)) for a, off in taps) for taps in raw)
    counts = tuple(max(0, -(-(D - r) // s)) for r in range(s))
    return _Axis(s, -(-D // s), counts, taps, offsets)


@dataclass(frozen=True)
class _Phase:
    """Phase ``(rd, rh, rw)``: its weight ``(C, T*O)`` (taps by shift) and GEMM runs
    ``(first shift, end shift, first column block)``."""

    r: tuple[int, int, int]
    weight: np.ndarray
    runs: tuple[tuple[int, int, int], ...]


def _phases(w: np.ndarray, geom: ConvGeometry, axes: tuple[_Axis, ...]) -> list[_Phase]:
    w5 = w.reshape(geom.O, geom.C, *geom.kernel)
    n_h, n_w = len(axes[1].offsets), len(axes[2].offsets)
    phases = []
    for r in itertools.product(*(range(ax.stride) for ax in axes)):
        taps = sorted(
            ((jd * n_h + jh) * n_w + jw, (ad, ah, aw))
            for (ad, jd), (ah, jh), (aw, jw) in itertools.product(
                *(ax.taps[ri] for ax, ri in zip(axes, r, strict=True))
            )
        )
        if taps:
            weight = np.concatenate([w5[:, :, a, b, e].T for _, (a, b, e) in taps], axis=1)
        else:
            weight = np.empty((geom.C, 0), dtype=w.dtype)
        runs, start = [], 0
        for t in range(1, len(taps) + 1):
            if t == len(taps) or taps[t][0] != taps[t - 1][0] + 1:
                runs.append((taps[start][0], taps[t - 1][0] + 1, start))
                start = t
        phases.append(_Phase(r, np.ascontiguousarray(weight), tuple(runs)))
    return phases


def _plane_bytes(geom: ConvGeometry, axes, itemsize: int) -> int:
    """Scratch of one phase plane of a slab: its ``dy`` shifts and its phase results."""
    n_shifts = len(axes[0].offsets) * len(axes[1].offsets) * len(axes[2].offsets)
    n_phases = axes[0].stride * axes[1].stride * axes[2].stride
    return itemsize * axes[1].length * axes[2].length * (n_shifts * geom.O + n_phases * geom.C)


def _planes_per_slab(geom: ConvGeometry, axes, itemsize: int) -> int:
    # (not the thread count: the slabs, and with them the GEMMs' shapes, are set by the
    # geometry and the cap alone)
    cap = min(SLAB_TARGET_BYTES, config.workspace_bytes // 2)
    plane = _plane_bytes(geom, axes, itemsize)
    return int(max(1, min(axes[0].length, cap // max(1, plane))))


def _shift_dy(dy: np.ndarray, n: int, i0: int, i1: int, axes, U: np.ndarray) -> None:
    """``U[j, :, i, h, w] = dy[n, :, i0 + i + off_d, h + off_h, w + off_w]`` (zero outside),
    numpy's way (the numba kernel :func:`_shift_kernel` does the same)."""
    Do, Ho, Wo = dy.shape[2:]
    for j, (od, oh, ow) in enumerate(itertools.product(*(ax.offsets for ax in axes))):
        dst, src = [slice(None)], [n, slice(None)]
        for off, lo, hi, size in (
            (od, i0, i1, Do),
            (oh, 0, axes[1].length, Ho),
            (ow, 0, axes[2].length, Wo),
        ):
            a, b = max(lo + off, 0), min(hi + off, size)
            b = max(a, b)
            dst.append(slice(a - off - lo, b - off - lo))
            src.append(slice(a, b))
        u = U[j]
        inside = u[tuple(dst)]
        if inside.size != u.size:
            u[...] = 0
        inside[...] = dy[tuple(src)]


def _interleave(R: np.ndarray, dx: np.ndarray, n: int, i0: int, i1: int, axes) -> None:
    """``dx[n, :, i*sd + rd, j*sh + rh, l*sw + rw] = R[phase (rd, rh, rw), :, i - i0, j, l]``,
    numpy's way (the numba kernel :func:`_interleave_kernel` does the same)."""
    sd, sh, sw = (ax.stride for ax in axes)
    for p, (rd, rh, rw) in enumerate(itertools.product(range(sd), range(sh), range(sw))):
        cd = min(i1, axes[0].counts[rd]) - i0
        if cd <= 0:
            continue
        ch, cw = axes[1].counts[rh], axes[2].counts[rw]
        x0 = i0 * sd + rd
        dst = dx[n, :, x0 : x0 + (cd - 1) * sd + 1 : sd, rh::sh, rw::sw]
        dst[...] = R[p, :, :cd, :ch, :cw]


def _shift_kernel(dy, n, i0, di, od, oh, ow, U):  # pragma: no cover - compiled
    """:func:`_shift_dy` on flat indices: ``U (shifts, O, di, nh, nw)``, the shifts in
    the order of ``product(od, oh, ow)``. (Rows are sliced before their loops: a loop
    index known to be >= 0 vectorises.)"""
    O, Do, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    nh, nw = U.shape[3], U.shape[4]
    src = dy.reshape(-1)
    dst = U.reshape(-1)
    base = n * O * Do * Ho * Wo
    k = 0
    for a in range(od.size):
        for b in range(oh.size):
            for e in range(ow.size):
                offw = ow[e]
                l0 = min(nw, max(0, -offw))
                l1 = max(l0, min(nw, Wo - offw))
                for o in range(O):
                    for i in range(di):
                        z = i0 + i + od[a]
                        plane = dst[k : k + nh * nw]
                        k += nh * nw
                        if z < 0 or z >= Do:
                            plane[:] = 0
                            continue
                        for h in range(nh):
                            y = h + oh[b]
                            d = plane[h * nw : (h + 1) * nw]
                            if y < 0 or y >= Ho:
                                d[:] = 0
                                continue
                            s0 = base + ((o * Do + z) * Ho + y) * Wo + offw
                            ss = src[s0 + l0 : s0 + l1]
                            for m in range(l0):
                                d[m] = 0
                            dd = d[l0:]
                            for m in range(l1 - l0):
                                dd[m] = ss[m]
                            for m in range(l1, nw):
                                d[m] = 0


def _interleave_kernel(R, dx, n, i0, di, cd, ch, cw):  # pragma: no cover - compiled
    """:func:`_interleave` on flat indices; ``cd, ch, cw`` the phase counts per axis."""
    C, D, H, W = dx.shape[1], dx.shape[2], dx.shape[3], dx.shape[4]
    sd, sh, sw = cd.size, ch.size, cw.size
    nh, nw = R.shape[3], R.shape[4]
    src = R.reshape(-1)
    dst = dx.reshape(-1)
    phase_size = C * di * nh * nw
    for c in range(C):
        for i in range(di):
            for rd in range(sd):
                if i0 + i >= cd[rd]:
                    continue
                row0 = ((n * C + c) * D + (i0 + i) * sd + rd) * H * W
                for j in range(nh):
                    s0 = ((c * di + i) * nh + j) * nw
                    for rh in range(sh):
                        y = j * sh + rh
                        if y >= H:
                            break
                        d = dst[row0 + y * W : row0 + (y + 1) * W]
                        p0 = ((rd * sh + rh) * sw) * phase_size + s0
                        if sw == 2:  # an interleaved pair: vectorised as one
                            ev = src[p0 : p0 + nw]
                            od = src[p0 + phase_size : p0 + phase_size + nw]
                            m1 = cw[1]
                            for m in range(m1):
                                d[2 * m] = ev[m]
                                d[2 * m + 1] = od[m]
                            if cw[0] > m1:
                                d[2 * m1] = ev[m1]
                            continue
                        for rw in range(sw):
                            ss = src[p0 + rw * phase_size : p0 + rw * phase_size + nw]
                            dd = d[rw:]
                            for m in range(cw[rw]):
                                dd[m * sw] = ss[m]


@compile_once
def _kernels() -> dict:
    """Compile (or load from numba's cache) the two copy kernels, once per process."""
    import numba

    jit = numba.njit(cache=True, nogil=True)
    return {"shift": jit(_shift_kernel), "interleave": jit(_interleave_kernel)}


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dL/dx`` (the transposed convolution) of a strided dense layer, phase by phase."""
    dy = np.ascontiguousarray(dy)
    w = w.astype(dy.dtype, copy=False)
    dtype, isz = dy.dtype, dy.itemsize
    axes = tuple(_axis(geom, a) for a in range(3))
    phases = _phases(w, geom, axes)
    O, C = geom.O, geom.C
    n_shifts = len(axes[0].offsets) * len(axes[1].offsets) * len(axes[2].offsets)
    nh, nw = axes[1].length, axes[2].length
    dx = np.empty(geom.in_shape, dtype=dtype)
    per = _planes_per_slab(geom, axes, isz)
    nd = axes[0].length
    slabs = [(n, i0, min(nd, i0 + per)) for n in range(geom.N) for i0 in range(0, nd, per)]

    kernels = _kernels() if numba_available() else None
    if kernels is not None:
        offsets = [np.array(ax.offsets, dtype=np.int64) for ax in axes]
        counts = [np.array(ax.counts, dtype=np.int64) for ax in axes]

    # Called directly (autotune, tests) on planes larger than the cap: refuse what could
    # never fit rather than allocate it (each thread holds one slab).
    check_allocation(
        (engine_threads(), per, _plane_bytes(geom, axes, isz)), np.uint8, "polyphase slabs"
    )

    def work(task: int, ntasks: int) -> None:
        U = np.empty(n_shifts * O * per * nh * nw, dtype=dtype)
        R = np.empty(len(phases) * C * per * nh * nw, dtype=dtype)
        for n, i0, i1 in slabs[task::ntasks]:
            di = i1 - i0
            Q = di * nh * nw
            u = U[: n_shifts * O * Q].reshape(n_shifts, O, di, nh, nw)
            res = R[: len(phases) * C * Q].reshape(len(phases), C, di, nh, nw)
            if kernels is not None:
                kernels["shift"](dy, n, i0, di, *offsets, u)
            else:
                _shift_dy(dy, n, i0, i1, axes, u)
            for p, phase in enumerate(phases):
                if not phase.runs:
                    res[p] = 0
                for k, (u0, u1, k0) in enumerate(phase.runs):
                    # Fortran: R_p^T (Q x C) (+)= U[u0:u1]^T (Q x K) @ W_p[:, k0*O:]^T (K x C)
                    gemm_f(
                        dtype, False, False, Q, C, (u1 - u0) * O,
                        u.ctypes.data + u0 * O * Q * isz, Q,
                        phase.weight.ctypes.data + k0 * O * isz, phase.weight.shape[1],
                        res.ctypes.data + p * C * Q * isz, Q,
                        1.0 if k else 0.0,
                    )  # fmt: skip
            if kernels is not None:
                kernels["interleave"](res, dx, n, i0, di, *counts)
            else:
                _interleave(res, dx, n, i0, i1, axes)

    with single_threaded_blas():
        run_tasks(work, engine_threads())
    return dx
