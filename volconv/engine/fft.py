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
  (``nogil``, on ``run_tasks`` threads) take ``FREQ_CHUNK`` consecutive frequencies per
  work item and copy its operands (prefetched a few rows ahead) into per-thread planar
  scratch: real and imaginary rows of the constant length ``FREQ_CHUNK``, the channels
  (forward) or blocks (weight) of the reduction adjacent and padded with zero rows to
  a multiple of four. The inner loop then reads only unit-stride rows at constant
  offsets of three small arrays, over a constant trip count -- no runtime alias checks
  between dozens of slices, no index wraparound, so LLVM vectorises it -- and keeps a
  2 x 2 block of complex accumulators (outputs x blocks, forward; outputs x input
  channels, weight) in registers over four reduction steps. The scratch of a work
  item (~400 KB for V-Net) stays in L2; the full pass is then bound by streaming the
  spectra: V-Net's forward product 8.2 -> 4.9 ms per 8-channel chunk (0.30 -> 0.18 ns
  per complex multiply-add; ~1.8 of it arithmetic, the rest the spectra's ~50 MB in
  and out), the weight gradient's 10.8 -> 6.4 ms (0.37 -> 0.21 ns). The previous
  kernels (accumulators in memory, one slice per row) were 2.5x slower in cache: LLVM
  had left their main loop scalar. Each output element is summed by one work item in
  a fixed order: bitwise reproducible. Without numba, numpy ``einsum`` does the same
  sums (slower; :func:`prefer` is then False).
- Outputs (and weight taps) that read only padding along some axis are set to exact
  zeros (the transforms would leave rounding residue there).
- Non-finite data would spread through a block's transforms; ``FINITE_ONLY`` makes the
  engine take a GEMM algorithm for the forward pass, and both gradients check and
  delegate to the chooser's GEMM pick themselves.

Measured (float32, 2 threads, a 2-core machine under load ~1-2 from other jobs, min of
11 runs interleaved in one process with the previous product kernels, two sessions;
medians in brackets): V-Net 5x5x5 (N=1, C=O=16, 64^3, padding 2) forward 50-54 ms
[68-73] (previous kernels 61-74 [81-86]; in-plane unfolding ~90), input
gradient 64-68 [72-76] (78-83 [85-88]), weight gradient 59-61 [64-68] (66-69 [84-87],
with the smaller chunks of its pruned inverse; in-plane unfolding ~111, so the engine
now takes FFT there); small layers gain less (5x5x5, C=8 -> O=32, 32^3: forward 17.0
ms against 17.6, in-plane unfolding 11.7). Accuracy: ``max|err| <= c * eps * sqrt(K) *
max(|x| (*) |w|)`` (``K`` the reduction length) with c <= 2.3
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
from ._blas import gemm_f, single_threaded_blas
from ._numba_runtime import compile_once, engine_threads, numba_available, run_shares, run_tasks

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

#: Plans are made under this many bytes when they fit (else under the cap): the cost
#: model does not see caches, and blocks planned for the whole 64 MiB cap ran slower.
#: Measured on vnet_5x5x5 (same process, min of 7, three rounds), no target / 32 MiB:
#: forward 47-49 / 41 ms, dx 50-52 / 44-45, dw 45-46 / 50; scratch 57 / 30 MiB, which
#: brings its peak memory under PyTorch's (48 MiB above the inputs) in both passes.
PLAN_TARGET_BYTES: int | None = 32 << 20

#: Frequencies per work item of the channel-product kernels.
FREQ_CHUNK = 128
#: Rows ahead that the product kernels prefetch while copying a work item's inputs.
PF_ROWS = 4
#: Target bytes of the scratch of one chunk of the pruned weight DFT, and of its inverse
#: (the weight gradient's; smaller: its float64 copy of the spectra is then still in L2
#: for the GEMM along D -- 7^3 C32 32^3: 10.1 -> 7.9 ms per chunk, V-Net 3.0 -> 2.4 ms;
#: the forward DFT measured best at 4 MB).
ROW_TARGET_BYTES = 4 << 20
TAPS_ROW_TARGET_BYTES = 1 << 20
#: Allowance for small per-call arrays (twiddles, block lists, numpy's iterator and
#: einsum buffers) in the memory plan.
SMALL_BYTES = 128 << 10
#: Prime factors allowed in FFT sizes.
_PRIMES = (2, 3, 5)

# Cost model (nanoseconds, 2 threads, float32; float64 scaled by 2): measured in this
# module's pipeline on the suite's layers. rfftn ~1.9 ns and irfftn ~2.6 ns per real
# sample (flat in n from 16 to 64), the gather ~0.5 ns per sample, the product kernels
# ~0.28 ns per complex multiply-add, ~12 GB/s for the spectra streamed once per batch,
# and the pruned weight DFT ~1.6 ns (its inverse ~2.4 ns) per spectrum element. The
# register-blocked product kernels now measure 0.18-0.24 ns (forward / weight, full
# pass); _NS_MAC stays at 0.28: the other phases run ~1.3-1.6x above their constants
# on this machine today, and lowering only the product's would bias prefer() toward FFT
# on the small layers where it already loses (5^3, C16, 32^3 forward; see prefer).
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
    fc = FREQ_CHUNK
    # per thread: a block's gathered window (transformed straight into the spectra), or
    # its cropped inverse (the spectra's inverse passes run in place)
    fft_tmp = thr * max(C, ob) * n3 * isz
    # per thread, the product kernels' planar rows: the batch's inputs, the weights
    # (forward) or output gradients (weight), eight accumulator rows
    # (channels, respectively blocks, padded to a multiple of four)
    if kind == "forward":
        spans = (bb + ob) * _ceil(C, 4) * 4
        kernel_tmp = thr * (2 * spans + 8) * fc * isz if numba else C * F * cs
    else:
        spans = _ceil(bb, 4) * 4 * (C + ob)
        kernel_tmp = thr * (2 * spans + 8) * fc * isz if numba else (C + bb) * F * cs
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
    # rows of the pruned weight DFT (or inverse) per chunk: up to the target, within the cap
    per_row = _transform_row_bytes(kernel, best.n, best.nwh)
    target = ROW_TARGET_BYTES if kind == "forward" else TAPS_ROW_TARGET_BYTES
    rows = max(1, min(O * C, target // per_row))
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
    budget = int(config.workspace_bytes) - int(reserve)
    args = (
        kind,
        geom.N,
        geom.C,
        geom.O,
        tuple(geom.spatial_out),
        ext,
        tuple(geom.kernel),
        int(itemsize),
        int(threads if threads is not None else _threads()),
    )
    if PLAN_TARGET_BYTES is not None and PLAN_TARGET_BYTES < budget:
        plan = _plan_cached(*args, PLAN_TARGET_BYTES, numba_available())
        if plan is not None:
            return plan
    return _plan_cached(*args, budget, numba_available())


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
#: the forward's, while FFT's weight gradient runs further above its cost model than the
#: forward (two forward transforms per block, the float64 pruned inverse): measured,
#: FFT's weight gradient won every layer whose ratio (cost / GEMM estimate) was <= 0.77;
#: from 0.89 to 1.10 it lost four (5^3 C8, C16, C64 at 32^3, C8 -> O32) and won two
#: (3x5x5 at 64^3, 5^3 C32 at 32^3), hence 0.8 (0.5 before the register-blocked product
#: kernels, when it won only 7^3 on 48^3). See the table in :func:`prefer`.
MARGIN = {"forward": 1.0, "weight": 0.8}


def prefer(geom: ConvGeometry, dtype, kind: str = "forward") -> bool:
    """Whether FFT is expected to beat the GEMM algorithms on this geometry: its cost
    model's estimate against ``MARGIN`` times the GEMM time per direct multiply-add, for
    the forward pass (``kind="forward"``, which also serves the stride-1 input gradient)
    or the weight gradient (``kind="weight"``). Needs numba (the product kernels).

    Measured (float32, 2 threads, 2-core machine under load ~1-2, min of 5 interleaved
    runs): FFT's time over the in-plane unfolding's (``hwunfold``, the engine's GEMM
    pick for these undilated layers; 3^3 takes Winograd), ``(model)`` the cost model's
    ratio ``plan.cost / GEMM estimate`` that ``MARGIN`` is compared with; ``+``:
    ``prefer`` is True.

    ============================  ==================  ==================
    layer (N=1, C=O unless noted)  forward (model)     weight grad (model)
    ============================  ==================  ==================
    5^3, C16, 64^3 (V-Net)         0.85 (0.62) +       0.60 (0.65) +
    5^3, C16, 48^3, N=2            0.66 (0.67) +       0.68 (0.70) +
    5^3, C32, 48^3                 0.76 (0.73) +       0.69 (0.77) +
    5^3, C32, 32^3                 0.99 (0.93) +       0.91 (1.05)
    5^3, C16, 32^3                 1.14 (0.88) +       1.08 (0.98)
    5^3, C8, 32^3                  1.09 (0.82) +       1.11 (0.89)
    5^3, C4, 48^3                  0.82 (0.69) +       0.47 (0.71) +
    5^3, C64, 32^3                 0.94 (0.96) +       1.04 (1.08)
    5^3, C8 -> O32, 32^3           1.45 (1.01)         1.25 (1.10)
    5^3, C64, 16^3                 1.89 (1.83)         2.40 (2.25)
    3x5x5, C16, 64^3               0.89 (0.92) +       0.74 (0.98)
    7^3, C16, 48^3                 0.49 (0.32) +       0.49 (0.36) +
    7^3, C32, 32^3                 0.81 (0.59) +       0.88 (0.67) +
    7^3, C8, 32^3                  0.86 (0.49) +       0.86 (0.56) +
    7^3, C64, 16^3                 1.42 (1.21)         1.73 (1.49)
    4^3, C32, 32^3                 1.45 (1.82)         1.59 (2.02)
    3^3, C32, 32^3                 2.43 (2.99)         2.15 (3.15)
    ============================  ==================  ==================

    FFT wins the forward (and input gradient) with 5x5x5 and larger kernels on volumes
    several times the kernel's extent, and loses on 3x3x3 layers (dilated too: 27 taps)
    and on small volumes with many channels (the weight spectra, ``O*C`` per FFT size,
    dominate). The model runs ahead of FFT on 32^3 volumes with few channels (5^3 C16
    and C8 forward are preferred but 9-14% slower; they were before the current product
    kernels too). Its weight gradient beats the in-plane unfolding on volumes of 48^3
    and more and on 7^3 kernels; the margin leaves out 3x5x5 (model 0.98, like the losing
    5^3 C16 32^3) and 5^3 C32 32^3 (1.05, like the losing C64 32^3).
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


def _forward_product(task, ntasks, Wp, X, Y, B, nd, O, C, M):  # pragma: no cover - compiled
    """``Y[b, o, f] = sum_c W[o, c, f] X[b, c, f]`` for the frequency chunks of this task.

    Flat C-ordered arrays: ``Wp (2, nd, O, C, M)`` real and imaginary planes (frequency
    ``f = fd*M + m``), ``X (B, C, F, 2)`` and ``Y (B, O, F, 2)`` interleaved complex seen
    as reals. A work item is ``FREQ_CHUNK`` consecutive frequencies (fewer in the last):
    its inputs are copied into planar scratch rows of the constant stride ``FC``
    (weights ``[o][c][re, im]``, inputs ``[b][c][re, im]``, prefetched ``PF_ROWS`` rows
    ahead), so that every load of the inner loop is unit-stride at a constant offset in
    one of three arrays, over a constant ``FC`` lanes: loops that LLVM vectorises
    without per-row alias checks or index wraparound. Two output channels x two blocks
    accumulate over four input channels per pass, in registers."""
    FC = FREQ_CHUNK
    LINE = 64 // Wp.itemsize
    F = nd * M
    PL = nd * O * C * M  # the imaginary plane's offset
    items = (F + FC - 1) // FC
    Cp = (C + 3) // 4 * 4  # channels padded with zero rows: four per pass, no remainder
    xs = np.zeros(B * Cp * 2 * FC, Wp.dtype)
    ws = np.zeros(O * Cp * 2 * FC, Wp.dtype)
    acc = np.zeros(8 * FC, Wp.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        f0 = it * FC
        L = min(FC, F - f0)  # lanes past L hold stale finite data, never stored
        for r in range(B * C):  # r = b*C + c
            if r + PF_ROWS < B * C:
                s = ((r + PF_ROWS) * F + f0) * 2
                for j in range(0, 2 * L, LINE):
                    _prefetch(X, s + j)
            s = (r * F + f0) * 2
            src = X[s : s + 2 * L]
            d = (r // C * Cp + r % C) * 2 * FC
            dst = xs[d : d + 2 * FC]
            for j in range(L):
                dst[j] = src[2 * j]
                dst[FC + j] = src[2 * j + 1]
        fd0 = f0 // M
        m0 = f0 - fd0 * M
        for r in range(O * C):  # r = o*C + c; segments of the chunk per fd
            if r + PF_ROWS < O * C:
                s = (fd0 * O * C + r + PF_ROWS) * M + m0
                for j in range(0, min(L, M - m0), LINE):
                    _prefetch(Wp, s + j)
                    _prefetch(Wp, PL + s + j)
            d = (r // C * Cp + r % C) * 2 * FC
            dst = ws[d : d + 2 * FC]
            j0 = 0
            fd = fd0
            m = m0
            while j0 < L:
                n = min(L - j0, M - m)
                s = (fd * O * C + r) * M + m
                sr = Wp[s : s + n]
                si = Wp[PL + s : PL + s + n]
                dr = dst[j0 : j0 + n]
                di = dst[FC + j0 : FC + j0 + n]
                for j in range(n):
                    dr[j] = sr[j]
                    di[j] = si[j]
                j0 += n
                fd += 1
                m = 0
        for o in range(0, O, 2):
            o1 = min(o + 1, O - 1)
            for b in range(0, B, 2):
                b1 = min(b + 1, B - 1)
                acc[:] = 0
                for c in range(0, Cp, 4):
                    g0 = ws[(o * Cp + c) * 2 * FC : (o * Cp + c + 4) * 2 * FC]
                    g1 = ws[(o1 * Cp + c) * 2 * FC : (o1 * Cp + c + 4) * 2 * FC]
                    xp = xs[(b * Cp + c) * 2 * FC : (b * Cp + c + 4) * 2 * FC]
                    xq = xs[(b1 * Cp + c) * 2 * FC : (b1 * Cp + c + 4) * 2 * FC]
                    for j in range(FC):
                        s0r = acc[j]
                        s0i = acc[FC + j]
                        s1r = acc[2 * FC + j]
                        s1i = acc[3 * FC + j]
                        t0r = acc[4 * FC + j]
                        t0i = acc[5 * FC + j]
                        t1r = acc[6 * FC + j]
                        t1i = acc[7 * FC + j]
                        for k in range(4):
                            u0r = g0[2 * k * FC + j]
                            u0i = g0[(2 * k + 1) * FC + j]
                            u1r = g1[2 * k * FC + j]
                            u1i = g1[(2 * k + 1) * FC + j]
                            pr = xp[2 * k * FC + j]
                            pi = xp[(2 * k + 1) * FC + j]
                            qr = xq[2 * k * FC + j]
                            qi = xq[(2 * k + 1) * FC + j]
                            s0r += u0r * pr - u0i * pi
                            s0i += u0r * pi + u0i * pr
                            s1r += u1r * pr - u1i * pi
                            s1i += u1r * pi + u1i * pr
                            t0r += u0r * qr - u0i * qi
                            t0i += u0r * qi + u0i * qr
                            t1r += u1r * qr - u1i * qi
                            t1i += u1r * qi + u1i * qr
                        acc[j] = s0r
                        acc[FC + j] = s0i
                        acc[2 * FC + j] = s1r
                        acc[3 * FC + j] = s1i
                        acc[4 * FC + j] = t0r
                        acc[5 * FC + j] = t0i
                        acc[6 * FC + j] = t1r
                        acc[7 * FC + j] = t1i
                for q in range(4):  # (o, b), (o1, b), (o, b1), (o1, b1); duplicates skipped
                    oo = o if q % 2 == 0 else o1
                    bq = b if q < 2 else b1
                    if (q % 2 == 1 and o1 == o) or (q >= 2 and b1 == b):
                        continue
                    d = ((bq * O + oo) * F + f0) * 2
                    dst = Y[d : d + 2 * L]
                    a = acc[2 * q * FC : (2 * q + 2) * FC]
                    for j in range(L):
                        dst[2 * j] = a[j]
                        dst[2 * j + 1] = a[FC + j]


def _weight_product(task, ntasks, DW, DY, X, B, nd, O, C, M):  # pragma: no cover - compiled
    """``DW[o, c, f] += sum_b conj(DY[b, o, f]) X[b, c, f]`` (blocks in order) for the
    frequency chunks of this task. Flat C-ordered arrays: ``DW (2, nd, O, C, M)`` planes
    (``f = fd*M + m``), ``DY (B, O, F, 2)`` and ``X (B, C, F, 2)`` interleaved. As in
    :func:`_forward_product`, a work item copies its inputs into planar scratch rows of
    stride ``FC`` (``[o][b][re, im]`` and ``[c][b][re, im]``: the blocks of one channel
    adjacent); two output x two input channels accumulate over four blocks per pass."""
    FC = FREQ_CHUNK
    LINE = 64 // DW.itemsize
    F = nd * M
    PL = nd * O * C * M
    items = (F + FC - 1) // FC
    Bp = (B + 3) // 4 * 4  # blocks padded with zero rows: four per pass, no remainder
    xs = np.zeros(Bp * C * 2 * FC, DW.dtype)
    ys = np.zeros(Bp * O * 2 * FC, DW.dtype)
    acc = np.zeros(8 * FC, DW.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        f0 = it * FC
        L = min(FC, F - f0)  # lanes past L hold stale finite data, never stored
        fd0 = f0 // M
        m0 = f0 - fd0 * M
        for b in range(B):
            for c in range(C):
                s = ((b * C + c) * F + f0) * 2
                if c + PF_ROWS < C:
                    for j in range(0, 2 * L, LINE):
                        _prefetch(X, s + PF_ROWS * 2 * F + j)
                src = X[s : s + 2 * L]
                r = c * Bp + b
                dst = xs[r * 2 * FC : (r + 1) * 2 * FC]
                for j in range(L):
                    dst[j] = src[2 * j]
                    dst[FC + j] = src[2 * j + 1]
            for o in range(O):
                s = ((b * O + o) * F + f0) * 2
                if o + PF_ROWS < O:
                    for j in range(0, 2 * L, LINE):
                        _prefetch(DY, s + PF_ROWS * 2 * F + j)
                src = DY[s : s + 2 * L]
                r = o * Bp + b
                dst = ys[r * 2 * FC : (r + 1) * 2 * FC]
                for j in range(L):
                    dst[j] = src[2 * j]
                    dst[FC + j] = src[2 * j + 1]
        for o in range(0, O, 2):
            o1 = min(o + 1, O - 1)
            for c in range(0, C, 2):
                c1 = min(c + 1, C - 1)
                for q in range(8):  # rows (re, im) of (o, c), (o, c1), (o1, c), (o1, c1)
                    r = (o if q < 4 else o1) * C + (c if q % 4 < 2 else c1)
                    a = acc[q * FC : (q + 1) * FC]
                    j0 = 0
                    fd = fd0
                    m = m0
                    while j0 < L:  # the chunk's segments per fd
                        n = min(L - j0, M - m)
                        s = (fd * O * C + r) * M + m + PL * (q % 2)
                        src = DW[s : s + n]
                        part = a[j0 : j0 + n]
                        for j in range(n):
                            part[j] = src[j]
                        j0 += n
                        fd += 1
                        m = 0
                for b in range(0, Bp, 4):
                    y0 = ys[(o * Bp + b) * 2 * FC : (o * Bp + b + 4) * 2 * FC]
                    y1 = ys[(o1 * Bp + b) * 2 * FC : (o1 * Bp + b + 4) * 2 * FC]
                    xp = xs[(c * Bp + b) * 2 * FC : (c * Bp + b + 4) * 2 * FC]
                    xq = xs[(c1 * Bp + b) * 2 * FC : (c1 * Bp + b + 4) * 2 * FC]
                    for j in range(FC):
                        s0r = acc[j]
                        s0i = acc[FC + j]
                        s1r = acc[2 * FC + j]
                        s1i = acc[3 * FC + j]
                        t0r = acc[4 * FC + j]
                        t0i = acc[5 * FC + j]
                        t1r = acc[6 * FC + j]
                        t1i = acc[7 * FC + j]
                        for k in range(4):
                            yr = y0[2 * k * FC + j]
                            yi = y0[(2 * k + 1) * FC + j]
                            zr = y1[2 * k * FC + j]
                            zi = y1[(2 * k + 1) * FC + j]
                            pr = xp[2 * k * FC + j]
                            pi = xp[(2 * k + 1) * FC + j]
                            qr = xq[2 * k * FC + j]
                            qi = xq[(2 * k + 1) * FC + j]
                            s0r += yr * pr + yi * pi
                            s0i += yr * pi - yi * pr
                            s1r += yr * qr + yi * qi
                            s1i += yr * qi - yi * qr
                            t0r += zr * pr + zi * pi
                            t0i += zr * pi - zi * pr
                            t1r += zr * qr + zi * qi
                            t1i += zr * qi - zi * qr
                        acc[j] = s0r
                        acc[FC + j] = s0i
                        acc[2 * FC + j] = s1r
                        acc[3 * FC + j] = s1i
                        acc[4 * FC + j] = t0r
                        acc[5 * FC + j] = t0i
                        acc[6 * FC + j] = t1r
                        acc[7 * FC + j] = t1i
                for q in range(8):
                    if (q >= 4 and o1 == o) or (q % 4 >= 2 and c1 == c):
                        continue
                    r = (o if q < 4 else o1) * C + (c if q % 4 < 2 else c1)
                    a = acc[q * FC : (q + 1) * FC]
                    j0 = 0
                    fd = fd0
                    m = m0
                    while j0 < L:
                        n = min(L - j0, M - m)
                        s = (fd * O * C + r) * M + m + PL * (q % 2)
                        dst = DW[s : s + n]
                        part = a[j0 : j0 + n]
                        for j in range(n):
                            dst[j] = part[j]
                        j0 += n
                        fd += 1
                        m = 0


_prefetch = None  # the kernels' prefetch (``_prefetch(array, index)``), set by _kernels


def _prefetch_intrinsic():
    """A numba intrinsic: ``prefetch(array, index)`` hints the cache line of
    ``array[index]`` into all cache levels (``llvm.prefetch``; never faults)."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, array, index):
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            ptr = builder.gep(data, [args[1]])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return prefetch


def _kernels() -> dict | None:
    """The compiled kernels (compiled or loaded from numba's cache once per process), or
    None without numba."""
    return _compiled() if numba_available() else None


@compile_once
def _compiled() -> dict:
    import numba

    global _prefetch
    _prefetch = _prefetch_intrinsic()

    # Contraction into FMAs only: no reassociation, each output's arithmetic fixed by the
    # arguments (bitwise reproducible). Compiled eagerly for both dtypes: the first call
    # of any pass compiles (or loads) everything, so later passes allocate nothing for
    # numba.
    flat = "{0}[::1]"
    sig = f"void(int64, int64, {flat}, {flat}, {flat}, int64, int64, int64, int64, int64)"
    sigs = [sig.format(t) for t in ("float32", "float64")]
    jit = numba.njit(sigs, nogil=True, fastmath={"contract"}, cache=True)
    return {"forward": jit(_forward_product), "weight": jit(_weight_product)}


def _product(Wp: np.ndarray, X: np.ndarray, Y: np.ndarray, nw: int) -> None:
    """``Y[b, o] = sum_c W[o, c] * X[b, c]`` (complex, frequency last); ``Wp (2, nd, O, C, M)``."""
    kernels = _kernels()
    if kernels is not None:
        _, nd, O, C, M = Wp.shape
        run_tasks(kernels["forward"], nw, _flat(Wp), _flat(X), _flat(Y), X.shape[0], nd, O, C, M)
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
        _, nd, O, C, M = DW.shape
        run_tasks(kernels["weight"], nw, _flat(DW), _flat(DY), _flat(X), X.shape[0], nd, O, C, M)
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


def _flat(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as a flat real view (complex: interleaved real, imaginary);
    never a copy (the kernels write through it)."""
    if not a.flags.c_contiguous:  # pragma: no cover - the callers' buffers are
        raise ValueError("fft: the product kernels need C-contiguous arrays")
    real = np.float32 if a.dtype in (np.float32, np.complex64) else np.float64
    return a.reshape(-1).view(real)


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
        Z = np.empty((kd, r * M), dtype=np.complex128)  # no complex temporary
        Z.real = T[:kd]
        Z.imag = T[kd:]
        Z = Z.reshape(kd * r, nh, nwh)
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

    def share(lo: int, hi: int) -> None:
        buf = scratch.get()
        try:
            for i in range(lo, hi):
                fn(i, buf)
        finally:
            scratch.put(buf)

    run_shares(share, count, min(nw, count))


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


# Every pass runs with OpenBLAS at one thread (``_blas.single_threaded_blas``): the
# weight-spectrum GEMMs are small, and BLAS threads left spinning after them took a core
# from the block transforms and products that run on the engine's threads next
# (vnet_5x5x5 forward 76-83 -> 51-53 ms, dx 82-88 -> 53-55, same process).


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``y``: per block ``irfftn(sum_c conj(K[o, c]) * rfftn(window[c]))``, cropped."""
    with single_threaded_blas():
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
    with single_threaded_blas():
        return _forward(dy, wf, transposed_geometry(geom), wf.nbytes)


def backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``dw``: ``sum conj(DY) X`` over blocks and batch items, then the pruned inverse."""
    if not _finite(x, dy):
        return _delegate("backward_weight", geom, x, dy)
    with single_threaded_blas():
        return _backward_weight(x, dy, geom)


def _backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
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
