"""FFT convolution (overlap-save) for dense stride-1 layers with large kernels.

The maths
---------
A stride-1 convolution is a correlation: output ``p`` of a block whose input window
starts at ``s`` reads ``y[o, p] = sum_c sum_t w[o, c, t] x[c, s + p + d*t]``. With the
window ``x_s`` (``n`` samples per axis) and the dilated kernel ``k`` embedded in ``n``
samples (tap ``t`` at ``d*t``, zeros elsewhere), the circular correlation

    z = IDFT( sum_c conj(K[o, c]) * X_s[c] )              (``*`` elementwise)

equals ``y`` at ``p = 0 .. n - e`` (``e = d*(k-1) + 1`` the dilated extent): those
outputs read no sample past the window's end, so nothing wraps around. Per axis a block
of ``b`` outputs needs an FFT of size ``n = b + e - 1`` (overlap-save), ``n`` with prime
factors 2, 3, 5 only. Per output the channel product costs ``O*C * nd*nh*(nw/2+1) /
(bd*bh*bw)`` complex multiply-adds: ``0.84 O*C`` at ``n = (20, 36, 36)``, ``b = (16, 32,
32)`` against ``125 O*C`` real ones for a direct 5x5x5 convolution. Add ``C`` forward
and ``O`` inverse real FFTs of ``n^3`` samples per block (``O(log n)`` per sample) and
the weight spectra, ``O*C`` per FFT size: FFT wins for large kernels on volumes several
times the kernel's extent (see :func:`prefer`).

The gradients are the same products read the other way:

- input: ``dx`` is the correlation of ``dy`` with the flipped, channel-transposed
  kernel, a forward convolution on ``engine.transposed_geometry`` (computed here too);
- weight: ``dw[o, c, t] = sum_blocks sum_p dy[o, s + p] x[c, s + p + d*t]``: per block
  the ``b`` outputs of ``dy`` zero-padded to ``n`` correlate with the input window,
  ``DW[o, c] += conj(DY[o]) * X[c]`` summed over all blocks and batch items in
  frequency, then one inverse transform *pruned* to the ``k^3`` (dilated) taps -- no
  wrap-around because ``b + e - 1 <= n``.

Implementation
--------------
- Planning (:func:`_plan`): the output grid of all batch items is tiled into blocks of
  ``b`` per axis; a cost model (constants measured on this pipeline) picks ``n`` per
  axis, the output channels per chunk ``ob`` and the blocks per batch ``bb`` such that
  everything allocated besides ``x``, ``w`` and the result -- the weight spectra
  (``ob*C*F`` complex, ``F = nd*nh*(nw/2+1)``: 50 MB for 16x16 channels at ``n = 36``
  in float32), the batch's input and output spectra, the FFT buffers, the kernels'
  scratch -- fits ``volconv.config.workspace_bytes``. When the input spectra of all
  blocks fit at once they are computed once for all output-channel chunks.
- Transforms run one whole block per call on one thread, the blocks spread over the
  engine's threads (numba's count, else the CPU count) by ``run_tasks``: this scaled
  better than pocketfft's own ``workers`` split of one block's passes (V-Net forward
  99 -> 80 ms with the direct writes below), and no result depends on which thread
  ran a block. SciPy's pocketfft binding writes straight into the spectra arrays (no
  copy of each block's result); without it, the public ``scipy.fft`` functions.
- Input windows are gathered per block into a per-thread ``(C, nd, nh, nw)`` buffer,
  zeros only in its margins (padding, negative pads too, by bounds: the input is never
  padded or copied whole), then transformed into the block's spectra. float32 stays
  single precision (complex64), float64 double. The inverse is pruned: along D in
  place, along H on the ``bd`` planes kept, the real inverse along W on the ``bd*bh``
  rows kept only, into a per-thread buffer cropped into ``y``. The output gradient's
  forward transform (weight gradient) is pruned the same way: W on its ``bd*bh`` rows
  of samples, H on its ``bd`` planes, zeros elsewhere until the D pass.
- Weight spectra, stored as real/imaginary planes ``(2, nd, ob, C, nh*(nw/2+1))``: the
  kernel has only ``k`` nonzero samples per axis, so the DFT is pruned -- separable
  along W and H (small complex matrix products, float64), D as one real GEMM ``(2nd x
  2kd) @ (2kd x rows)`` that writes the planes directly. The separable H/W stage halved
  the spectra's time against one ``(kh*kw) x (nh*(nw/2+1))`` twiddle product (V-Net:
  5.2 -> 2.5 ms per 8-channel chunk). The weight gradient's pruned inverse is the
  mirror image (float64 throughout). All through numpy's BLAS, the engine's one BLAS
  (``_blas.gemm_f`` too): alternating two OpenBLAS libraries made these GEMMs 10-30x
  slower on a busy 2-core machine (two thread pools spinning).
- The channel products ``Y[o, f] = sum_c W[o, c, f] X[c, f]`` and ``DW[o, c, f] +=
  sum_b conj(DY[b, o, f]) X[b, c, f]`` have frequency as the long axis: numba kernels
  (``nogil``, on ``run_tasks`` threads) take ``FREQ_CHUNK`` frequencies of one ``fd``
  plane per work item, de-interleave the complex inputs of the batch into real and
  imaginary rows and accumulate 2 output x 2 input channels (forward) or 2 input
  channels x 2 blocks (weight) per pass, loops that LLVM vectorises. Each output
  element is summed by one work item in a fixed order: bitwise reproducible. Without
  numba, numpy ``einsum`` does the same sums (slower; :func:`prefer` is then False).
- Outputs (and weight taps) that read only padding along some axis are set to exact
  zeros (the transforms would leave rounding residue there).
- Non-finite data would spread through a block's transforms; ``FINITE_ONLY`` makes the
  engine take a GEMM algorithm for the forward pass, and both gradients check and
  delegate to the chooser's GEMM pick themselves.

Measured (float32, 2 threads, a 2-core machine under load ~1-2 from other jobs, min of
5 runs interleaved in one process with the previous version): V-Net 5x5x5 (N=1, C=O=16,
64^3, padding 2) forward 62 ms (previous version 84; in-plane unfolding ~87-120),
input gradient 72-82 (91), weight gradient 79-84 (96-107; in-plane unfolding ~108);
small layers gain less (5x5x5, C=8 -> O=32, 32^3: forward 15.3 ms against 16.2, in-plane
unfolding 10.1), so the cost model's constants are unchanged. Accuracy: ``max|err| <=
c * eps * sqrt(K) * max(|x| (*) |w|)`` (``K`` the reduction length) with c <= 2.3
measured for y, dx and dw over 2,400 random geometries, typically <= 1.5
(``tests/test_fft.py``): within the default factor 4 of the table-driven tests.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import scipy.fft

from .. import config
from ._args import ConvGeometry, dilated_extent
from ._blas import gemm_f
from ._numba_runtime import engine_threads, numba_available, run_tasks

try:  # SciPy's pocketfft binding: transforms into given arrays, along chosen axes
    from scipy.fft._pocketfft import pypocketfft as _pocketfft
except ImportError:  # pragma: no cover - a SciPy without it: the public functions
    _pocketfft = None

NAME = "fft"
#: The transforms mix every sample of a block: one Inf/NaN would reach every output of
#: the block (Inf becoming NaN). The engine falls back to a GEMM algorithm for such data
#: in the forward pass; the gradients here delegate themselves.
FINITE_ONLY = True
#: Every reduction has an order fixed by the geometry, the plan and the thread count.
DETERMINISTIC = True

#: Frequencies per work item of the channel-product kernels.
FREQ_CHUNK = 256
#: Target bytes of the scratch of one chunk of the pruned weight DFT (or its inverse).
ROW_TARGET_BYTES = 4 << 20
#: Allowance for small per-call arrays (twiddles, block lists, numpy's iterator and
#: einsum buffers) in the memory plan.
SMALL_BYTES = 128 << 10
#: Prime factors allowed in FFT sizes.
_PRIMES = (2, 3, 5)

# Cost model (nanoseconds, 2 threads, float32; float64 scaled by 2): measured in this
# module's pipeline on the suite's layers. rfftn ~1.9 ns and irfftn ~2.6 ns per real
# sample (flat in n from 16 to 64), the gather ~0.5 ns per sample, the product kernels
# ~0.28 ns per complex multiply-add, ~12 GB/s for the spectra streamed once per batch,
# and the pruned weight DFT ~1.6 ns (its inverse ~2.4 ns) per spectrum element.
_NS_FFT = 1.9
_NS_IFFT = 2.6
_NS_GATHER = 0.5
_NS_MAC = 0.28
_NS_BYTE = 0.08
_NS_SPECTRUM = 1.6
_NS_TAPS = 2.4


# ----------------------------------------------------------------------------- planning


_threads = engine_threads  # the transforms' and product kernels' threads


def _smooth(m: int) -> int:
    """The smallest ``n >= m`` whose prime factors are all in ``_PRIMES``."""
    n = max(1, m)
    while True:
        r = n
        for p in _PRIMES:
            while r % p == 0:
                r //= p
        if r == 1:
            return n
        n += 1


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _axis_options(out: int, ext: int) -> list[tuple[int, int, int]]:
    """``(n, b, m)`` per useful FFT size on one axis: blocks of ``b = n - ext + 1``
    outputs, ``m`` of them; the smallest ``n`` for each block count ``m``, and only
    those within 3x of the cheapest ``m * n`` (plus the smallest ``n``, for tight caps)."""
    best: dict[int, tuple[int, int, int]] = {}
    n = _smooth(ext)
    top = _smooth(out + ext - 1)
    while n <= top:
        b = n - ext + 1
        m = _ceil(out, b)
        if m not in best:
            best[m] = (n, b, m)
        n = _smooth(n + 1)
    options = sorted(best.values())
    cheapest = min(n * m for n, _, m in options)
    keep = [o for o in options if o[0] * o[2] <= 3 * cheapest]
    if options[0] not in keep:
        keep.insert(0, options[0])
    return keep


@dataclass(frozen=True)
class _Plan:
    """A blocking: FFT size ``n``, output block ``b`` and block count ``m`` per axis,
    output channels per chunk ``ob``, blocks per batch ``bb``, (o, c) rows per chunk of
    the pruned weight DFT ``rows``; ``nbytes`` the scratch it allocates (bounded by the
    cap) and ``cost`` the model's estimate in ns."""

    n: tuple[int, int, int]
    b: tuple[int, int, int]
    m: tuple[int, int, int]
    ob: int
    bb: int
    rows: int
    nbytes: int
    cost: float

    @property
    def nwh(self) -> int:
        return self.n[2] // 2 + 1

    @property
    def freqs(self) -> int:
        return self.n[0] * self.n[1] * self.nwh


def _transform_row_bytes(kernel, n, nwh: int) -> int:
    """Scratch of one (o, c) row of the pruned weight DFT or its inverse: the H/W stage's
    operands and results (float64), the D stage's operand (the inverse's float64 copy of
    a spectrum row) and result."""
    kd, kh, kw = kernel
    nd, nh, _ = n
    m = nh * nwh
    return 16 * nd * m + 32 * kd * m + 16 * kd * kh * kw


def _memory(
    kind: str,
    C: int,
    O: int,
    kernel,
    n,
    ob: int,
    bb: int,
    isz: int,
    thr: int,
    rows: int = 1,
    numba: bool = True,
) -> int:
    """Bytes allocated besides x, w and the result, for a forward (``kind="forward"``) or
    weight-gradient (``"weight"``) pass with this blocking (``rows``: of the pruned DFT;
    ``numba``: the product kernels' scratch, else the numpy fallback's temporaries)."""
    nd, nh, nw = n
    nwh = nw // 2 + 1
    F = nd * nh * nwh
    n3 = nd * nh * nw
    cs = 2 * isz  # complex item
    planes = ob * C * F * cs
    X = bb * C * F * cs
    Y = bb * ob * F * cs  # forward: output spectra; weight: output-gradient spectra
    fc = min(FREQ_CHUNK, F)
    # per thread: a block's gathered window (transformed straight into the spectra), or
    # its cropped inverse (the spectra's inverse passes run in place)
    fft_tmp = thr * max(C, ob) * n3 * isz
    if kind == "forward":
        kernel_tmp = thr * (bb * C * 2 * fc + 4 * fc) * isz if numba else C * F * cs
    else:
        kernel_tmp = thr * (bb * (C + ob) * 2 * fc) * isz if numba else (C + bb) * F * cs
    row = _transform_row_bytes(kernel, n, nwh) * rows
    return planes + X + Y + max(fft_tmp + kernel_tmp, row) + SMALL_BYTES


def _cost(kind: str, N: int, C: int, O: int, n, m, ob: int, bb: int, isz: int) -> float:
    nd, nh, nw = n
    F = nd * nh * (nw // 2 + 1)
    n3 = nd * nh * nw
    blocks = N * m[0] * m[1] * m[2]
    chunks = _ceil(O, ob)
    batches = _ceil(blocks, bb)
    x_passes = 1 if batches == 1 else chunks
    scale = isz / 4
    spectra = O * C * F
    cost = _NS_MAC * spectra * blocks
    cost += (_NS_FFT + _NS_GATHER) * n3 * C * blocks * x_passes
    if kind == "forward":
        cost += _NS_SPECTRUM * spectra
        cost += _NS_IFFT * n3 * O * blocks + _NS_BYTE * spectra * 2 * isz * batches
    else:
        cost += _NS_TAPS * spectra
        cost += (_NS_FFT + _NS_GATHER) * n3 * O * blocks
        cost += 2 * _NS_BYTE * spectra * 2 * isz * batches
    return cost * scale


def _channel_chunks(O: int) -> list[int]:
    """Candidate output channels per chunk: ``ceil(O / k)`` for a few ``k``."""
    out, k = [], 1
    while True:
        ob = _ceil(O, k)
        if not out or ob < out[-1]:
            out.append(ob)
        if ob == 1:
            return out
        k = max(k + 1, int(k * 1.5))


@functools.lru_cache(maxsize=512)
def _plan_cached(kind, N, C, O, spatial_out, ext, kernel, isz, thr, cap, numba) -> _Plan | None:
    axes = [_axis_options(out, e) for out, e in zip(spatial_out, ext, strict=True)]
    combos = []
    for od in axes[0]:
        for oh in axes[1]:
            for ow in axes[2]:
                n = (od[0], oh[0], ow[0])
                m = (od[2], oh[2], ow[2])
                blocks = N * m[0] * m[1] * m[2]
                # a lower bound: all output channels in one chunk, all blocks in one batch
                bound = _cost(kind, N, C, O, n, m, O, blocks, isz)
                combos.append((bound, n, (od[1], oh[1], ow[1]), m, blocks))
    combos.sort()
    best: _Plan | None = None
    for bound, n, b, m, blocks in combos:
        if best is not None and bound >= best.cost:
            break  # sorted: no later blocking can beat the best one
        for ob in _channel_chunks(O):
            # the most blocks per batch that fit (more: fewer passes over the spectra)
            if _memory(kind, C, O, kernel, n, ob, 1, isz, thr, 1, numba) > cap:
                continue
            lo, hi = 1, blocks
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _memory(kind, C, O, kernel, n, ob, mid, isz, thr, 1, numba) <= cap:
                    lo = mid
                else:
                    hi = mid - 1
            cost = _cost(kind, N, C, O, n, m, ob, lo, isz)
            if best is None or cost < best.cost:
                best = _Plan(n, b, m, ob, lo, 1, 0, cost)
    if best is None:
        return None
    # rows of the pruned weight DFT per chunk: up to ROW_TARGET_BYTES, within the cap
    per_row = _transform_row_bytes(kernel, best.n, best.nwh)
    rows = max(1, min(O * C, ROW_TARGET_BYTES // per_row))
    args = (kind, C, O, kernel, best.n, best.ob, best.bb, isz, thr)
    while rows > 1 and _memory(*args, rows, numba) > cap:
        rows = max(1, rows // 2)
    nbytes = _memory(*args, rows, numba)
    return _Plan(best.n, best.b, best.m, best.ob, best.bb, rows, nbytes, best.cost)


def _plan(
    geom: ConvGeometry, itemsize: int, kind: str = "forward", threads=None, reserve: int = 0
) -> _Plan | None:
    """The cheapest blocking of a forward or weight-gradient pass under the cap (less
    ``reserve`` bytes the caller holds), or None."""
    if min(geom.N, geom.C, geom.O, *geom.spatial_out) == 0:
        return None
    if geom.G != 1 or geom.stride != (1, 1, 1):
        return None
    ext = tuple(dilated_extent(k, d) for k, d in zip(geom.kernel, geom.dilation, strict=True))
    return _plan_cached(
        kind,
        geom.N,
        geom.C,
        geom.O,
        tuple(geom.spatial_out),
        ext,
        tuple(geom.kernel),
        int(itemsize),
        int(threads if threads is not None else _threads()),
        int(config.workspace_bytes) - int(reserve),
        numba_available(),
    )


def _transposed(geom: ConvGeometry) -> ConvGeometry:
    from . import transposed_geometry

    return transposed_geometry(geom)


def supports(geom: ConvGeometry) -> bool:
    """Dense (groups=1), stride 1, any dilation and padding, with a blocking whose scratch
    fits ``volconv.config.workspace_bytes`` for the forward pass, the weight gradient and
    the input gradient (planned for float64, the larger)."""
    if geom.G != 1 or geom.stride != (1, 1, 1):
        return False
    if min(geom.N, geom.C, geom.O, *geom.spatial_out) == 0:
        return False
    return (
        _plan(geom, 8, "forward") is not None
        and _plan(geom, 8, "weight") is not None
        and _plan(_transposed(geom), 8, "forward", reserve=8 * geom.O * geom.C * geom.taps)
        is not None
    )


def workspace_bytes(geom: ConvGeometry, itemsize: int, threads: int = 2) -> int:
    """Bytes this algorithm allocates besides its operands and result (the larger of
    the forward and weight-gradient passes)."""
    plans = [_plan(geom, itemsize, kind, threads) for kind in ("forward", "weight")]
    if any(p is None for p in plans):
        raise ValueError("fft: the workspace cap cannot hold one block")
    return max(p.nbytes for p in plans)  # type: ignore[union-attr]


#: The best GEMM algorithm's time per direct multiply-add (per-tap GEMM, in-plane
#: unfolding or Winograd, whichever was fastest), in the cost model's units, as
#: ``GEMM_NS_BASE + GEMM_NS_CHANNELS / sqrt(C*O)``: fitted on 16 dense stride-1 layers
#: (C, O = 4..64, 16^3 to 64^3, kernels 3-7, dilation 1-2). Thin GEMMs (few channels)
#: run far below the BLAS peak, wide ones near it.
GEMM_NS_BASE = 0.0043
GEMM_NS_CHANNELS = 0.107
#: FFT is preferred where its cost estimate is below ``MARGIN`` times the GEMM estimate.
#: The weight gradient's GEMM (in-plane unfolding) runs ~20% faster per multiply-add than
#: the forward's, while FFT's weight gradient measured ~35% slower than its cost model
#: relative to the forward (two forward transforms per block), hence about half.
MARGIN = {"forward": 1.0, "weight": 0.5}


def prefer(geom: ConvGeometry, dtype, kind: str = "forward") -> bool:
    """Whether FFT is expected to beat the GEMM algorithms on this geometry: its cost
    model's estimate against ``MARGIN`` times the GEMM time per direct multiply-add, for
    the forward pass (``kind="forward"``, which also serves the stride-1 input gradient)
    or the weight gradient (``kind="weight"``). Needs numba (the product kernels).

    Measured (float32, 2 threads, 2-core machine under load ~2, min of 3 interleaved
    runs): FFT's time over the fastest of per-tap GEMM, in-plane unfolding and the
    engine's default pick (Winograd, polyphase Winograd); ``+``: ``prefer`` is True.

    ============================  ===========  ===========
    layer (N=1, C=O unless noted)  forward      weight grad
    ============================  ===========  ===========
    5^3, C16, 64^3 (V-Net)         0.76 +       0.94
    5^3, C16, 48^3, N=2            0.66 +       1.14
    5^3, C32, 32^3                 0.76 +       1.20
    5^3, C16, 32^3                 0.90 +       1.43
    5^3, C8, 32^3                  0.92 +       1.29
    5^3, C4, 48^3                  0.84 +       1.11
    5^3, C64, 32^3                 0.90 +       1.32
    5^3, C8 -> O32, 32^3           1.27         1.82
    5^3, C64, 16^3                 1.38         2.67
    7^3, C16, 48^3                 0.53 +       0.70 +
    7^3, C32, 32^3                 0.85 +       1.14
    7^3, C8, 32^3                  0.64 +       1.16
    7^3, C64, 16^3                 1.16         2.11
    4^3, C32, 32^3                 1.13         1.78
    3^3, C32, 32^3 (Winograd)      2.21         3.23
    3^3 dil. 2, C32, 64^3          1.68         1.73
    ============================  ===========  ===========

    FFT wins the forward (and input gradient) with 5x5x5 and larger kernels on volumes
    several times the kernel's extent, and loses on 3x3x3 layers (dilated too: 27 taps)
    and on small volumes with many channels (the weight spectra, ``O*C`` per FFT size,
    dominate). Its weight gradient (two forward transforms per block) beats the
    in-plane unfolding only on the largest kernels.
    """
    if kind not in MARGIN:
        raise ValueError(f"kind must be 'forward' or 'weight', got {kind!r}")
    if not numba_available() or not supports(geom):
        return False
    isz = np.dtype(dtype).itemsize
    plan = _plan(geom, isz, kind)
    if plan is None:
        return False
    macs = geom.N * geom.O * geom.C * geom.taps * int(np.prod(geom.spatial_out))
    gemm = macs * (GEMM_NS_BASE + GEMM_NS_CHANNELS / np.sqrt(geom.C * geom.O))
    return plan.cost * 4 / isz < MARGIN[kind] * gemm  # float64: both ~2x slower


# ------------------------------------------------------------------------------ kernels
#
# Plain Python, compiled with numba on first use (:func:`_kernels`). Every work item
# computes its output elements in an order fixed by the arguments; items are split
# over tasks by index ranges, so which thread runs which task changes no bit.


def _forward_product(task, ntasks, Wp, X, Y, fc):  # pragma: no cover - compiled
    """``Y[b, o, f] = sum_c W[o, c, f] X[b, c, f]`` for the frequency chunks of this task.

    ``Wp (2, nd, O, C, M)``: real and imaginary planes, frequency ``f = fd*M + m``;
    ``X (B, C, F, 2)`` and ``Y (B, O, F, 2)`` interleaved complex seen as reals. A work
    item is ``fc`` frequencies of one ``fd``; two output x two input channels per pass."""
    _, nd, O, C, M = Wp.shape
    B = X.shape[0]
    per = (M + fc - 1) // fc
    items = nd * per
    acc = np.empty((4, fc), Wp.dtype)
    xs = np.empty((B, C, 2, fc), Wp.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        fd = it // per
        m0 = (it % per) * fc
        L = min(fc, M - m0)
        f0 = fd * M + m0
        for b in range(B):
            for c in range(C):
                src = X[b, c]
                dr = xs[b, c, 0]
                di = xs[b, c, 1]
                for j in range(L):
                    dr[j] = src[f0 + j, 0]
                    di[j] = src[f0 + j, 1]
        Wr = Wp[0, fd]
        Wi = Wp[1, fd]
        a0r = acc[0]
        a0i = acc[1]
        a1r = acc[2]
        a1i = acc[3]
        for o in range(0, O, 2):
            o1 = min(o + 1, O - 1)
            for b in range(B):
                for j in range(L):
                    a0r[j] = 0
                    a0i[j] = 0
                    a1r[j] = 0
                    a1i[j] = 0
                for c in range(0, C - 1, 2):
                    u0r = Wr[o, c, m0 : m0 + L]
                    u0i = Wi[o, c, m0 : m0 + L]
                    u1r = Wr[o1, c, m0 : m0 + L]
                    u1i = Wi[o1, c, m0 : m0 + L]
                    v0r = Wr[o, c + 1, m0 : m0 + L]
                    v0i = Wi[o, c + 1, m0 : m0 + L]
                    v1r = Wr[o1, c + 1, m0 : m0 + L]
                    v1i = Wi[o1, c + 1, m0 : m0 + L]
                    p = xs[b, c, 0]
                    q = xs[b, c, 1]
                    r = xs[b, c + 1, 0]
                    s = xs[b, c + 1, 1]
                    for j in range(L):
                        pr = p[j]
                        qi = q[j]
                        rr = r[j]
                        si = s[j]
                        a0r[j] += u0r[j] * pr - u0i[j] * qi + v0r[j] * rr - v0i[j] * si
                        a0i[j] += u0r[j] * qi + u0i[j] * pr + v0r[j] * si + v0i[j] * rr
                        a1r[j] += u1r[j] * pr - u1i[j] * qi + v1r[j] * rr - v1i[j] * si
                        a1i[j] += u1r[j] * qi + u1i[j] * pr + v1r[j] * si + v1i[j] * rr
                if C % 2 == 1:
                    c = C - 1
                    u0r = Wr[o, c, m0 : m0 + L]
                    u0i = Wi[o, c, m0 : m0 + L]
                    u1r = Wr[o1, c, m0 : m0 + L]
                    u1i = Wi[o1, c, m0 : m0 + L]
                    p = xs[b, c, 0]
                    q = xs[b, c, 1]
                    for j in range(L):
                        pr = p[j]
                        qi = q[j]
                        a0r[j] += u0r[j] * pr - u0i[j] * qi
                        a0i[j] += u0r[j] * qi + u0i[j] * pr
                        a1r[j] += u1r[j] * pr - u1i[j] * qi
                        a1i[j] += u1r[j] * qi + u1i[j] * pr
                d0 = Y[b, o]
                for j in range(L):
                    d0[f0 + j, 0] = a0r[j]
                    d0[f0 + j, 1] = a0i[j]
                if o1 != o:
                    d1 = Y[b, o1]
                    for j in range(L):
                        d1[f0 + j, 0] = a1r[j]
                        d1[f0 + j, 1] = a1i[j]


def _weight_product(task, ntasks, DW, DY, X, fc):  # pragma: no cover - compiled
    """``DW[o, c, f] += sum_b conj(DY[b, o, f]) X[b, c, f]`` (blocks in order) for the
    frequency chunks of this task. ``DW (2, nd, O, C, M)`` planes (``f = fd*M + m``);
    ``DY (B, O, F, 2)`` and ``X (B, C, F, 2)`` interleaved. Two input channels x two
    blocks per pass."""
    _, nd, O, C, M = DW.shape
    B = X.shape[0]
    per = (M + fc - 1) // fc
    items = nd * per
    xs = np.empty((B, C, 2, fc), DW.dtype)
    ys = np.empty((B, O, 2, fc), DW.dtype)
    spare = np.empty((2, fc), DW.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        fd = it // per
        m0 = (it % per) * fc
        L = min(fc, M - m0)
        f0 = fd * M + m0
        for b in range(B):
            for c in range(C):
                src = X[b, c]
                dr = xs[b, c, 0]
                di = xs[b, c, 1]
                for j in range(L):
                    dr[j] = src[f0 + j, 0]
                    di[j] = src[f0 + j, 1]
            for o in range(O):
                src = DY[b, o]
                dr = ys[b, o, 0]
                di = ys[b, o, 1]
                for j in range(L):
                    dr[j] = src[f0 + j, 0]
                    di[j] = src[f0 + j, 1]
        Ar = DW[0, fd]
        Ai = DW[1, fd]
        for o in range(O):
            for c in range(0, C, 2):
                c1 = min(c + 1, C - 1)
                a0r = Ar[o, c, m0 : m0 + L]
                a0i = Ai[o, c, m0 : m0 + L]
                a1r = Ar[o, c1, m0 : m0 + L]
                a1i = Ai[o, c1, m0 : m0 + L]
                if c1 == c:  # odd C: the second accumulator is scratch
                    a1r = spare[0, :L]
                    a1i = spare[1, :L]
                for b in range(0, B - 1, 2):
                    p = ys[b, o, 0]
                    q = ys[b, o, 1]
                    g = ys[b + 1, o, 0]
                    h = ys[b + 1, o, 1]
                    x0r = xs[b, c, 0]
                    x0i = xs[b, c, 1]
                    x1r = xs[b, c1, 0]
                    x1i = xs[b, c1, 1]
                    z0r = xs[b + 1, c, 0]
                    z0i = xs[b + 1, c, 1]
                    z1r = xs[b + 1, c1, 0]
                    z1i = xs[b + 1, c1, 1]
                    for j in range(L):
                        pr = p[j]
                        qi = q[j]
                        gr = g[j]
                        hi = h[j]
                        a0r[j] += pr * x0r[j] + qi * x0i[j] + gr * z0r[j] + hi * z0i[j]
                        a0i[j] += pr * x0i[j] - qi * x0r[j] + gr * z0i[j] - hi * z0r[j]
                        a1r[j] += pr * x1r[j] + qi * x1i[j] + gr * z1r[j] + hi * z1i[j]
                        a1i[j] += pr * x1i[j] - qi * x1r[j] + gr * z1i[j] - hi * z1r[j]
                if B % 2 == 1:
                    b = B - 1
                    p = ys[b, o, 0]
                    q = ys[b, o, 1]
                    x0r = xs[b, c, 0]
                    x0i = xs[b, c, 1]
                    x1r = xs[b, c1, 0]
                    x1i = xs[b, c1, 1]
                    for j in range(L):
                        pr = p[j]
                        qi = q[j]
                        a0r[j] += pr * x0r[j] + qi * x0i[j]
                        a0i[j] += pr * x0i[j] - qi * x0r[j]
                        a1r[j] += pr * x1r[j] + qi * x1i[j]
                        a1i[j] += pr * x1i[j] - qi * x1r[j]


_jitted: dict | None = None
_jit_lock = threading.Lock()


def _kernels() -> dict | None:
    """The compiled kernels (compiled or loaded from numba's cache once per process), or
    None without numba."""
    global _jitted
    if not numba_available():
        return None
    with _jit_lock:
        if _jitted is None:
            import numba

            # Contraction into FMAs only: no reassociation, each output's arithmetic
            # fixed by the arguments (bitwise reproducible).
            # Compiled eagerly for both dtypes: the first call of any pass compiles (or
            # loads) everything, so later passes allocate nothing for numba.
            planes, spectra = "{0}[:, :, :, :, ::1]", "{0}[:, :, :, ::1]"
            sig = f"void(int64, int64, {planes}, {spectra}, {spectra}, int64)"
            sigs = [sig.format(t) for t in ("float32", "float64")]
            jit = numba.njit(sigs, nogil=True, fastmath={"contract"}, cache=True)
            _jitted = {
                "forward": jit(_forward_product),
                "weight": jit(_weight_product),
            }
    return _jitted


def _product(Wp: np.ndarray, X: np.ndarray, Y: np.ndarray, nw: int) -> None:
    """``Y[b, o] = sum_c W[o, c] * X[b, c]`` (complex, frequency last); ``Wp (2, nd, O, C, M)``."""
    kernels = _kernels()
    if kernels is not None:
        fc = min(FREQ_CHUNK, Wp.shape[4])
        run_tasks(kernels["forward"], nw, Wp, _as_real(X), _as_real(Y), fc)
        return
    _, nd, O, C, M = Wp.shape  # numpy fallback: one (B, F) product per output channel
    Wc = np.empty((C, nd, M), dtype=X.dtype)
    for o in range(O):
        Wc.real = Wp[0, :, o].transpose(1, 0, 2)
        Wc.imag = Wp[1, :, o].transpose(1, 0, 2)
        np.einsum("cf,bcf->bf", Wc.reshape(C, nd * M), X, out=Y[:, o])


def _accumulate(DW: np.ndarray, DY: np.ndarray, X: np.ndarray, nw: int) -> None:
    """``DW[o, c] += sum_b conj(DY[b, o]) * X[b, c]``; ``DW (2, nd, O, C, M)``."""
    kernels = _kernels()
    if kernels is not None:
        fc = min(FREQ_CHUNK, DW.shape[4])
        run_tasks(kernels["weight"], nw, DW, _as_real(DY), _as_real(X), fc)
        return
    _, nd, O, C, M = DW.shape  # numpy fallback: one (C, F) product per output channel
    B = X.shape[0]
    part = np.empty((C, nd * M), dtype=X.dtype)
    dyc = np.empty((B, nd * M), dtype=X.dtype)
    for o in range(O):
        np.conjugate(DY[:, o], out=dyc)
        np.einsum("bf,bcf->cf", dyc, X, out=part)
        DW[0, :, o] += part.real.reshape(C, nd, M).transpose(1, 0, 2)
        DW[1, :, o] += part.imag.reshape(C, nd, M).transpose(1, 0, 2)


def _as_real(a: np.ndarray) -> np.ndarray:
    """A C-contiguous complex array ``(..., F)`` as reals ``(..., F, 2)``."""
    real = np.float32 if a.dtype == np.complex64 else np.float64
    return a.view(real).reshape(*a.shape, 2)


# ------------------------------------------------------------------ transforms and blocks


def _twiddles(k: int, d: int, n: int, count: int) -> np.ndarray:
    """``exp(+2 pi i f d t / n)`` for taps ``t < k`` (rows) and frequencies ``f < count``."""
    t = np.arange(k) * d
    f = np.arange(count)
    phase = np.outer(t, f) % n  # exact integers: accurate twiddles for any size
    return np.exp(2j * np.pi * phase / n)


def _real_form(z: np.ndarray, dtype) -> np.ndarray:
    """Complex ``(J, I)`` as the real ``(2J, 2I)`` matrix ``[[Re, -Im], [Im, Re]]``: it maps
    stacked (real; imaginary) planes of a complex vector to those of ``z @ vector``."""
    return np.ascontiguousarray(np.block([[z.real, -z.imag], [z.imag, z.real]]), dtype=dtype)


def _plane_twiddles(geom: ConvGeometry, plan: _Plan, inverse: bool) -> np.ndarray:
    """The pruned 2-D DFT along H and W as one complex matrix: ``(kh*kw, nh*nwh)``
    mapping taps ``(b, e)`` to frequencies ``(fh, fw)`` (``exp(+2 pi i ...)``: the
    conjugate spectrum), or for ``inverse`` its ``(nh*nwh, kh*kw)`` mirror with the rfft
    half's weights along W (interior bins stand for themselves and their mirror image)."""
    _, kh, kw = geom.kernel
    _, dh, dw = geom.dilation
    _, nh, nwf = plan.n
    nwh = plan.nwh
    Eh = _twiddles(kh, dh, nh, nh)  # (kh, nh)
    Ew = _twiddles(kw, dw, nwf, nwh)  # (kw, nwh)
    K = (Eh[:, None, :, None] * Ew[None, :, None, :]).reshape(kh * kw, nh * nwh)
    if not inverse:
        return K
    weight = np.full(nwh, 2.0)
    weight[0] = 1.0
    if nwf % 2 == 0:
        weight[-1] = 1.0
    return (K.reshape(kh * kw, nh, nwh) * weight).reshape(kh * kw, nh * nwh).T


def _gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out = a @ b`` for row-major 2-D operands of one dtype (rows may be strided)
    through ``_blas.gemm_f``, the engine's one BLAS. Mixing in a second OpenBLAS (with its
    own spinning threads) between these calls made them 10-30x slower on a busy 2-core
    machine."""
    isz = out.itemsize

    def ld(m: np.ndarray) -> int:  # row stride in items (any valid value for one row)
        assert m.dtype == out.dtype and m.ndim == 2
        assert m.shape[1] == 1 or m.strides[1] == isz
        return m.strides[0] // isz if m.shape[0] > 1 else max(1, m.shape[1])

    (rows, inner), cols = a.shape, b.shape[1]
    # Fortran view: out^T (cols x rows) = b^T (cols x inner) @ a^T (inner x rows)
    gemm_f(
        out.dtype, False, False, cols, rows, inner,
        b.ctypes.data, ld(b),
        a.ctypes.data, ld(a),
        out.ctypes.data, ld(out),
        0.0,
    )  # fmt: skip


def _weight_spectra(w: np.ndarray, geom: ConvGeometry, plan: _Plan, P: np.ndarray) -> None:
    """``P[0/1, fd, o, c, m]`` = real/imaginary part of ``conj(DFT(k[o, c]))`` at frequency
    ``fd*M + m`` for the dilated kernels ``w (ob, C, kd, kh, kw)`` embedded in ``n``
    samples, by the pruned DFT: separable along W and H in float64 (two small complex
    matrix products, ``kw`` and ``kh`` taps per frequency), then along D -- the stage that
    writes all of ``P`` -- as one real GEMM ``(2nd x 2kd) @ (2kd x rows*M)`` in ``P``'s
    precision, straight into the planes (their row stride is the GEMM's leading
    dimension)."""
    kd, kh, kw = geom.kernel
    _, dh, dw = geom.dilation
    nd, nh, nwf = plan.n
    nwh = plan.nwh
    M = nh * nwh
    R = w.shape[0] * w.shape[1]
    Ew = _twiddles(kw, dw, nwf, nwh)  # (kw, nwh)
    EhT = np.ascontiguousarray(_twiddles(kh, dh, nh, nh).T)  # (nh, kh)
    Ed = _real_form(_twiddles(kd, geom.dilation[0], nd, nd).T, P.dtype)  # (2nd, 2kd)
    rows = w.reshape(R, kd, kh, kw)
    planes = P.reshape(2 * nd, R * M)
    for r0 in range(0, R, plan.rows):
        r1 = min(R, r0 + plan.rows)
        r = r1 - r0
        wt = rows[r0:r1].transpose(1, 0, 2, 3).reshape(kd * r * kh, kw).astype(np.float64)
        U = (wt @ Ew).reshape(kd * r, kh, nwh)  # along W
        T = np.matmul(EhT, U)  # along H: (kd*r, nh, nwh), (tap a, row) major
        del wt, U
        A = np.empty((2, kd * r, M), dtype=P.dtype)  # (re/im, (tap a, row), (fh, fw))
        A[0] = T.real.reshape(kd * r, M)
        A[1] = T.imag.reshape(kd * r, M)
        del T
        _gemm(Ed, A.reshape(2 * kd, r * M), planes[:, r0 * M : r1 * M])  # along D
        del A


def _weight_taps(DW: np.ndarray, geom: ConvGeometry, plan: _Plan) -> np.ndarray:
    """The ``kd x kh x kw`` dilated taps of ``IDFT(DW)`` (the pruned inverse), float64
    ``(ob, C, kd, kh, kw)``; ``DW (2, nd, ob, C, M)`` holds the half spectrum (rfft). In
    float64: along D as a real GEMM ``(2kd x 2nd) @ (2nd x rows*M)``, then separable
    along H and W (small complex matrix products; the real part, the rfft half's
    interior bins counted twice for their mirror images)."""
    kd, kh, kw = geom.kernel
    _, dh, dw = geom.dilation
    nd, nh, nwf = plan.n
    nwh = plan.nwh
    M = nh * nwh
    ob, C = DW.shape[2], DW.shape[3]
    R = ob * C
    Ed = _real_form(_twiddles(kd, geom.dilation[0], nd, nd), np.float64)  # (2kd, 2nd)
    weight = np.full(nwh, 2.0)
    weight[0] = 1.0
    if nwf % 2 == 0:
        weight[-1] = 1.0
    Eh = _twiddles(kh, dh, nh, nh)  # (kh, nh)
    EwT = np.ascontiguousarray((_twiddles(kw, dw, nwf, nwh) * weight).T)  # (nwh, kw)
    planes = DW.reshape(2 * nd, R * M)
    out = np.empty((R, kd, kh * kw))
    for r0 in range(0, R, plan.rows):
        r1 = min(R, r0 + plan.rows)
        r = r1 - r0
        D = planes[:, r0 * M : r1 * M].astype(np.float64)
        T = np.empty((2 * kd, r * M))
        _gemm(Ed, D, T)  # along D
        del D
        Z = (T[:kd] + 1j * T[kd:]).reshape(kd * r, nh, nwh)
        del T
        V = np.matmul(Eh, Z)  # along H: (kd*r, kh, nwh)
        del Z
        taps = (V.reshape(kd * r * kh, nwh) @ EwT).real  # along W
        del V
        out[r0:r1] = taps.reshape(kd, r, kh * kw).transpose(1, 0, 2)
    out *= 1.0 / (nd * nh * nwf)
    return out.reshape(ob, C, kd, kh, kw)


def _blocks(geom: ConvGeometry, plan: _Plan) -> list[tuple[int, tuple[int, int, int]]]:
    """``(batch item, output start per axis)`` of every block, item-major."""
    (md, mh, mw), (bd, bh, bw) = plan.m, plan.b
    return [
        (item, (zd * bd, zh * bh, zw * bw))
        for item in range(geom.N)
        for zd in range(md)
        for zh in range(mh)
        for zw in range(mw)
    ]


def _gather(src: np.ndarray, item: int, c0: int, c1: int, starts, lengths, out: np.ndarray):
    """``out[:, :l0, :l1, :l2]`` = ``src[item, c0:c1]`` on the window ``starts + lengths``,
    zeros elsewhere (outside ``src``: padding; past ``lengths``: ``out``'s tail). Only
    the margins around the copied box are zeroed."""
    s_src: list = [item, slice(c0, c1)]
    box = []
    for axis in range(3):
        s, ln, size = starts[axis], lengths[axis], src.shape[2 + axis]
        a0, a1 = max(s, 0), min(s + ln, size)
        if a1 <= a0:
            out[...] = 0
            return
        s_src.append(slice(a0, a1))
        box.append(slice(a0 - s, a1 - s))
    d, h, w = box
    out[:, : d.start] = 0
    out[:, d.stop :] = 0
    out[:, d, : h.start] = 0
    out[:, d, h.stop :] = 0
    out[:, d, h, : w.start] = 0
    out[:, d, h, w.stop :] = 0
    out[:, d, h, w] = src[tuple(s_src)]


class _Scratch:
    """Per-thread scratch arrays of one shape: at most one per concurrently running
    task (``run_tasks`` runs at most ``nw`` at once), reused by the next task."""

    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self.lock:
            if self.free:
                return self.free.pop()
        return np.empty(self.shape, dtype=self.dtype)

    def put(self, a: np.ndarray) -> None:
        with self.lock:
            self.free.append(a)


def _each_block(fn, count: int, nw: int, shape, dtype) -> None:
    """``fn(i, scratch)`` for ``i < count`` on ``nw`` threads, ``scratch`` a per-thread
    array of ``shape``: one block's transforms per call, each on one thread (whole
    blocks in parallel scale better than pocketfft's split of one transform's passes,
    and no result depends on which thread ran it)."""
    scratch = _Scratch(shape, dtype)

    def task(t: int, ntasks: int) -> None:
        lo, hi = t * count // ntasks, (t + 1) * count // ntasks
        if lo == hi:
            return
        buf = scratch.get()
        try:
            for i in range(lo, hi):
                fn(i, buf)
        finally:
            scratch.put(buf)

    run_tasks(task, min(nw, count))


def _rfft3(a: np.ndarray, out: np.ndarray) -> None:
    """``out = rfftn(a)`` over the last three axes, on the calling thread, into ``out``."""
    if _pocketfft is not None:
        _pocketfft.r2c(a, (1, 2, 3), True, 0, out, 1)
    else:  # pragma: no cover - scipy without its pocketfft binding
        out[...] = scipy.fft.rfftn(a, axes=(1, 2, 3), workers=1)


def _irfft3_cropped(spec: np.ndarray, n, valid, buf: np.ndarray) -> np.ndarray:
    """``irfftn(spec, s=n)[:, :v0, :v1, :v2]`` (``valid = (v0, v1, v2)``), pruned: the
    inverse along D in place in ``spec``, along H only on the ``v0`` kept planes, the
    real inverse along W only on the ``v0 x v1`` kept rows (into ``buf``, ``(ch, >= v0,
    >= v1, n2)``). Returns a view of ``buf``."""
    v0, v1, v2 = valid
    out = buf[:, :v0, :v1, :]
    if _pocketfft is None:  # scipy without its pocketfft binding (tests force this)
        full = scipy.fft.irfftn(spec, s=n, axes=(1, 2, 3), workers=1)
        out[...] = full[:, :v0, :v1, :]
        return out[..., :v2]
    _pocketfft.c2c(spec, (1,), False, 2, spec, 1)
    planes = spec[:, :v0]
    _pocketfft.c2c(planes, (2,), False, 2, planes, 1)
    _pocketfft.c2r(spec[:, :v0, :v1], (3,), n[2], False, 2, out, 1)
    return out[..., :v2]


def _input_spectra(x, geom, plan, batch, X, nw) -> None:
    """``X[i] = rfftn`` of block ``batch[i]``'s input window, all channels."""
    C = geom.C
    lows = [p[0] for p in geom.pads]
    nd, nh, nwf = plan.n
    nwh = plan.nwh

    def one(i, buf):
        item, start = batch[i]
        starts = [start[a] - lows[a] for a in range(3)]
        _gather(x, item, 0, C, starts, plan.n, buf)
        _rfft3(buf, X[i].reshape(C, nd, nh, nwh))

    _each_block(one, len(batch), nw, (C, nd, nh, nwf), x.dtype)


def _output_gradient_spectra(dy, geom, plan, batch, o0, o1, DY, nw) -> None:
    """``DY[i] = rfftn`` of block ``batch[i]``'s ``dy[:, o0:o1]`` zero-padded to ``n``,
    pruned: only the ``bd x bh`` rows that hold samples are transformed along W, only
    the ``bd`` such planes along H (the rest of the spectrum is zeros until the D pass)."""
    nd, nh, nwf = plan.n
    bd, bh, _ = plan.b
    nwh = plan.nwh
    no = o1 - o0

    def one(i, buf):
        item, start = batch[i]
        spec = DY[i].reshape(no, nd, nh, nwh)
        _gather(dy, item, o0, o1, start, (bd, bh, plan.b[2]), buf)
        if _pocketfft is None:  # scipy without its pocketfft binding (tests force this)
            spec[...] = 0
            spec[:, :bd, :bh] = scipy.fft.rfft(buf, axis=3, workers=1)
            spec[...] = scipy.fft.fftn(spec, axes=(1, 2), workers=1)
            return
        spec[:, bd:] = 0
        spec[:, :bd, bh:] = 0
        _pocketfft.r2c(buf, (3,), True, 0, spec[:, :bd, :bh], 1)
        planes = spec[:, :bd]
        _pocketfft.c2c(planes, (2,), True, 0, planes, 1)
        _pocketfft.c2c(spec, (1,), True, 0, spec, 1)

    _each_block(one, len(batch), nw, (no, bd, bh, nwf), dy.dtype)


def _output_blocks(y, Y, geom, plan, batch, o0, o1, nw) -> None:
    """``y[item, o0:o1]`` on block ``batch[i]``'s outputs = the first ``b`` samples per
    axis (fewer at the volume's end) of ``irfftn(Y[i])``; ``Y`` is overwritten."""
    nd, nh, nwf = plan.n
    no = o1 - o0

    def one(i, buf):
        item, start = batch[i]
        ends = zip(plan.b, geom.spatial_out, start, strict=True)
        valid = [min(b, size - s) for b, size, s in ends]
        out = _irfft3_cropped(Y[i].reshape(no, nd, nh, plan.nwh), plan.n, valid, buf)
        dst = tuple(slice(s, s + v) for s, v in zip(start, valid, strict=True))
        y[(item, slice(o0, o1), *dst)] = out

    _each_block(one, len(batch), nw, (no, *plan.b[:2], nwf), y.dtype)


def _live(geom: ConvGeometry, axis: int, taps: bool) -> np.ndarray:
    """Per output index (or per kernel tap, ``taps=True``) along ``axis``: whether it
    meets any input sample at all (else every product it sums reads padding)."""
    size, k, d = geom.spatial_in[axis], geom.kernel[axis], geom.dilation[axis]
    lo, out = geom.pads[axis][0], geom.spatial_out[axis]
    pos = np.arange(out)[:, None] - lo + d * np.arange(k)[None, :]
    inside = (pos >= 0) & (pos < size)
    return inside.any(axis=0 if taps else 1)


def _zero_dead(a: np.ndarray, geom: ConvGeometry, taps: bool) -> None:
    """Exact zeros where direct convolution has them structurally: outputs (``y``) or
    taps (``dw``) that read only padding along some axis. The transforms leave rounding
    residue there (~eps times the block's magnitude), which would be the whole result
    on a layer whose every output reads only padding."""
    for axis in range(3):
        live = _live(geom, axis, taps)
        if not live.all():
            index = [slice(None)] * a.ndim
            index[a.ndim - 3 + axis] = ~live
            a[tuple(index)] = 0


def _complex(dtype: np.dtype) -> type:
    return np.complex64 if dtype == np.float32 else np.complex128


def _delegate(method: str, geom: ConvGeometry, *args) -> np.ndarray:
    """A gradient through the GEMM family (non-finite data: FFTs would spread NaN)."""
    from . import ALGORITHMS, _preferred_gemm, im2col

    module = ALGORITHMS[_preferred_gemm(geom)]
    if not hasattr(module, method):  # per-tap GEMM has no input gradient of its own
        module = im2col
    return getattr(module, method)(*args, geom)


def _finite(*arrays: np.ndarray) -> bool:
    from . import _all_finite

    return all(_all_finite(a) for a in arrays)


# ------------------------------------------------------------------------- entry points


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``y``: per block ``irfftn(sum_c conj(K[o, c]) * rfftn(window[c]))``, cropped."""
    return _forward(x, w, geom, 0)


def _forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry, reserve: int) -> np.ndarray:
    """The forward pass, planned under the cap less ``reserve`` bytes."""
    dtype = np.dtype(x.dtype)
    nw = _threads()
    plan = _plan(geom, dtype.itemsize, "forward", nw, reserve)
    if plan is None:  # pragma: no cover - supports() rejects these
        raise ValueError("fft: the workspace cap cannot hold one block")
    C, O = geom.C, geom.O
    F, ob = plan.freqs, plan.ob
    nd, nh, nwf = plan.n
    nwh = plan.nwh
    cdt = _complex(dtype)
    y = np.empty(geom.out_shape, dtype=dtype)
    blocks = _blocks(geom, plan)
    bb = min(plan.bb, len(blocks))
    single = bb == len(blocks)
    Xbuf = np.empty(bb * C * F, dtype=cdt)
    Ybuf = np.empty(bb * ob * F, dtype=cdt)
    Pbuf = np.empty(ob * C * 2 * F, dtype=dtype)
    w5 = w.reshape(O, C, *geom.kernel)

    def inputs(batch):
        X = Xbuf[: len(batch) * C * F].reshape(len(batch), C, F)
        _input_spectra(x, geom, plan, batch, X, nw)
        return X

    X = inputs(blocks) if single else None
    for o0 in range(0, O, ob):
        o1 = min(O, o0 + ob)
        no = o1 - o0
        P = Pbuf[: no * C * 2 * F].reshape(2, nd, no, C, nh * nwh)
        _weight_spectra(w5[o0:o1], geom, plan, P)
        for k0 in range(0, len(blocks), bb):
            batch = blocks[k0 : k0 + bb]
            if not single:
                X = inputs(batch)
            Y = Ybuf[: len(batch) * no * F].reshape(len(batch), no, F)
            _product(P, X, Y, nw)
            _output_blocks(y, Y, geom, plan, batch, o0, o1, nw)
    _zero_dead(y, geom, taps=False)
    return y


def backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dx``: the forward convolution of ``dy`` with the flipped, channel-transposed
    kernel on :func:`engine.transposed_geometry` (stride 1)."""
    from . import flip_weight, transposed_geometry

    if not _finite(dy, w):
        return _delegate("backward_input", geom, dy, w)
    wf = flip_weight(w)  # held during the pass: planned under the cap less its size
    return _forward(dy, wf, transposed_geometry(geom), wf.nbytes)


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dw``: ``sum conj(DY) X`` over blocks and batch items, then the pruned inverse."""
    if not _finite(x, dy):
        return _delegate("backward_weight", geom, x, dy)
    dtype = np.dtype(x.dtype)
    nw = _threads()
    plan = _plan(geom, dtype.itemsize, "weight", nw)
    if plan is None:  # pragma: no cover - supports() rejects these
        raise ValueError("fft: the workspace cap cannot hold one block")
    C, O = geom.C, geom.O
    F, ob = plan.freqs, plan.ob
    nd, nh, nwf = plan.n
    cdt = _complex(dtype)
    dw = np.empty(geom.w_shape, dtype=dtype)
    blocks = _blocks(geom, plan)
    bb = min(plan.bb, len(blocks))
    single = bb == len(blocks)
    Xbuf = np.empty(bb * C * F, dtype=cdt)
    DYbuf = np.empty(bb * ob * F, dtype=cdt)
    DWbuf = np.empty(ob * C * 2 * F, dtype=dtype)

    def inputs(batch):
        X = Xbuf[: len(batch) * C * F].reshape(len(batch), C, F)
        _input_spectra(x, geom, plan, batch, X, nw)
        return X

    X = inputs(blocks) if single else None
    for o0 in range(0, O, ob):
        o1 = min(O, o0 + ob)
        no = o1 - o0
        DW = DWbuf[: no * C * 2 * F].reshape(2, nd, no, C, nh * plan.nwh)
        DW[...] = 0
        for k0 in range(0, len(blocks), bb):
            batch = blocks[k0 : k0 + bb]
            if not single:
                X = inputs(batch)
            DY = DYbuf[: len(batch) * no * F].reshape(len(batch), no, F)
            _output_gradient_spectra(dy, geom, plan, batch, o0, o1, DY, nw)
            _accumulate(DW, DY, X, nw)
        dw[0, o0:o1] = _weight_taps(DW, geom, plan)
    _zero_dead(dw, geom, taps=True)
    return dw
