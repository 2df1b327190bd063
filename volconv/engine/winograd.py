"""Winograd convolution for dense stride-1 layers with 3x3x3 kernels, or with 3 taps on
some axes and 1 on the others (in-plane 1x3x3 first of all), dilated or not.

The maths
---------
A 1-D Winograd filter ``F(m, 3)`` computes ``m`` outputs of a 3-tap correlation
from an input tile of ``alpha = m + 2`` samples with ``alpha`` multiplications
instead of ``3m``:

    y = A^T [ (G g) * (B^T d) ]              (``*`` elementwise)

with ``d`` the input tile and ``g`` the 3 taps. The matrices come from Toom-Cook
interpolation at ``alpha - 1`` points plus infinity.

F(2, 3), alpha = 4, points 0, 1, -1, inf::

    B^T = [1  0 -1  0]     G = [ 1    0    0 ]     A^T = [1  1  1  0]
          [0  1  1  0]         [1/2  1/2  1/2]           [0  1 -1 -1]
          [0 -1  1  0]         [1/2 -1/2  1/2]
          [0  1  0 -1]         [ 0    0    1 ]

F(4, 3), alpha = 6, points 0, 1, -1, 1/2, -2, inf::

    B^T = [1 -3/2  -2   3/2  1   0]   G = [  1      0      0  ]   A^T = [1 1  1  1    1  0]
          [0  -1   1/2  5/2  1   0]       [ 1/3    1/3    1/3 ]         [0 1 -1  1/2 -2  0]
          [0   1  -5/2  1/2  1   0]       [-1/3    1/3   -1/3 ]         [0 1  1  1/4  4  0]
          [0  -2   -1    2   1   0]       [-16/15 -8/15 -4/15 ]         [0 1 -1  1/8 -8  1]
          [0  1/2  -1  -1/2  1   0]       [ 1/15  -2/15  4/15 ]
          [0   1  -3/2  -2  3/2  1]       [  0      0      1  ]

Why these points: Lavin & Gray's 0, +-1, +-2 put a 5 and a 4 in B^T and an 8 in A^T;
swapping +2 for +1/2 (Barabasz et al., "Error analysis and improving the accuracy of
Winograd convolution", 2020) gives 4-5x smaller float32 errors here (measured: max
error 6e-6 instead of 3.3e-5 relative to max|y| at C = 64), at the same cost. Every
B^T and A^T entry is exact in binary, so the input and output transforms round only
in their additions; G (the weight transform, once per call) is applied in float64.

In 3-D the transforms are tensor products, applied one axis at a time. With one
``F(m_a, 3)`` per axis ``a``, an ``m_d x m_h x m_w`` output tile is

    Y_o = (A_d^T (x) A_h^T (x) A_w^T) [ sum_c U_{o,c} * V_c ]
    U_{o,c} = (G_d (x) G_h (x) G_w) w_{o,c}          (weight transform, once per call)
    V_c     = (B_d^T (x) B_h^T (x) B_w^T) d_c        (input transform, per tile)

and the channel sum at each of the ``P = alpha_d*alpha_h*alpha_w`` transformed positions
``p`` is one GEMM over the tiles of a block: ``M[p] (T x O) = V[p] (T x C) @ U[p] (C x O)``.

Multiplications per output: 27 direct, ``P / (m_d m_h m_w)`` Winograd: 64/8 = 8 for
F(2^3, 3^3) (3.4x fewer), 216/64 = 3.375 for F(4^3, 3^3) (8x fewer). The GEMMs run
at the BLAS rate, so the *effective* rate (direct flops / time) can pass the machine's
GEMM peak. F(4) is the default: with F(2) the transforms and the 2.4x larger V and M
per output cost more than the GEMMs save (measured 1.35-2.1x slower than F(4) on the
suite's 3x3x3 layers), although it is as accurate as direct GEMM: max error ~5e-7
against ~1e-5 relative to max|y| for F(4) at C = 128 (both bounded in
``tests/test_winograd.py``). Per axis ``m = 4``, except ``m = 2`` where the output
extent is <= 2 (4 transformed points instead of 6, e.g. C3D conv5a's depth 2), and
``m = 1`` on an axis where the kernel has one tap: ``alpha = 1`` and B^T, G, A^T are all
the identity there, so a 1x3x3 kernel is F(4x4, 3x3) on every plane (36 transformed
points per 16 outputs: 2.25 multiplications per output instead of 9). Measured on
R(2+1)D's spatial layer (64 -> 144 channels, 16x56x56, 2 threads): forward 25 ms, dx 26
(the forward on the transposed geometry), dw 28, against im2col's 49, 59 and 48.

Dilation
--------
Along an axis with dilation ``d`` the outputs ``d*z' + r`` (phase ``r``) read only the
inputs ``r - lo + d*j``: each phase is an undilated convolution of every ``d``-th sample.
The tile grid therefore runs over the phases (tile rows ordered batch item, D and H
phases, tile row, W phase, so that the two W phases of a row, which share x's cache
lines, are transformed close together), and the gathers and scatters step by ``d``: no
phase is copied out, and the weight gradient's GEMMs sum over the phases' tiles as over
any others. Measured on dilated_d2 (32 channels, 64^3, dilation 2): forward/dx/dw
85/86/100 ms against 130/130/140 for eight copied-out phases of 32^3 (the previous
``_phases`` split), and against 50 ms for the same layer without dilation (the strided
gathers read each cache line twice).

Implementation
--------------
Three numba kernels for the forward (``nogil``, run on ``numba.get_num_threads()`` Python
threads that take work items from a shared counter; two more for the weight gradient,
below) and numpy's batched matmul:

- weight: ``U (P, C, Ob)``, one item per input channel, all output channels as lanes;
- input: ``V (P, T, C)`` for a block of tile rows. An item is a few tiles of one tile
  row with *all channels as the vector lanes*: the window is gathered channel-innermost
  straight from ``x`` (padding and the engine's negative pads by bounds checks; the
  input is never padded or copied whole), then B^T along D, H and W, each one long
  unit-stride loop (W rows are phase-split so that the W step is unit-stride too), and
  written as contiguous ``V[p, t, :]`` runs;
- GEMM: ``np.matmul(V, U) -> M (P, T, Ob)``, P GEMMs per block;
- output: the mirror image, A^T along W, H, D, then into ``y`` (cropped).

Channels-last: with ``channels_last=True`` (``forward``, ``backward_weight``) the same
kernels read ``x``/``dy`` and write ``y`` in NDHWC: a sample's channels are then one
contiguous vector for the gathers and the scatter; the arithmetic, and so every result,
is bitwise the NCDHW one.

Without numba :func:`supports` is False: per-position numpy transforms measured slower
than the GEMM algorithms.

Memory
------
Tile rows are processed in blocks sized so that everything stays under
``volconv.config.workspace_bytes``: ``V + M`` aim at a quarter of the cap
(``BLOCK_FRACTION``: taller GEMMs for 32-64 channels; the weight gradient's ``V + DY``
at ``WEIGHT_BLOCK_FRACTION``) but hold at least
``MIN_BLOCK_TILES`` tiles (fewer made C3D conv3a's GEMMs 35-50% slower). ``U`` is 8x
the weight for F(4x4x4, 3x3x3) (27 MiB at 128 -> 256 channels) and is held whole,
computed once per call, when it takes at most half the cap. A larger one goes, first
choice, in *slabs of depth points*: the transformed positions ``p = (iz, iy, ix)`` with
``a0 <= iz < a0 + pz``, as few slabs as let one slab's ``U`` take at most
``SLAB_SHARE`` of the cap and leave room for blocks of ``SLAB_MIN_TILES`` tiles
(``WEIGHT_SLAB_MIN_TILES`` in the weight gradient, whose GEMMs reduce over them). Each
slab's ``U`` is computed once and meets every block; each block's input is gathered and
transformed again for every slab (only the slab's points go through H and W), and the
output transform adds the slab's share to ``y`` (A^T along D is a sum over the depth
points; the first slab writes ``y`` and its bias). The weight gradient likewise
accumulates one slab of ``Mw`` over all blocks and adds its share of ``dw`` through G^T.
Nothing is recomputed and every GEMM keeps all channels; the price is a gather and an
output pass (read-modify-write) per slab. Where even one depth point's ``U`` does not
fit, ``U`` goes in chunks of output channels, each computed again for every block
(``V`` once per block; the weight transform costs ~4.5 ms per 27 MiB of ``U``), so that
``V`` aims at the block share and a chunk's ``U + M`` at half the cap. The chooser takes
slabbed or chunked plans where Winograd saves enough multiplications to pay for them
(:func:`_chunks_pay`). Measured (fresh processes, 2 rounds, ms, slabs against chunks):
C3D conv3a under a 16 MiB cap, forward 95 against 125 and backward 224-241 against
349-382; the U-Net 16^3 level, backward 150-155 against 211-231 (forward 64-74 against
53-70); under 24 MiB about even forward, backward 111-180 against 152-227. Whole ``U``
and 64-tile blocks are why the 128-256-channel layers peak above PyTorch's memory at
the default cap (C3D conv3a forward 63 MiB, 47-67 ms; under a 16 MiB cap 27 MiB,
~95 ms; PyTorch 34 MiB, 122 ms).

Non-finite inputs spread through a tile's transforms (an Inf becomes NaN in every
output of its tile), unlike direct convolution.

Weight gradient
---------------
The adjoint of the same identity. Per axis ``y = A^T [(G g) * (B^T d)]`` is linear in
``g`` and ``sum_i dy_i y_i = sum_p (A dy)_p (B^T d)_p (G g)_p``, so over the tiles

    dg = G^T [ sum_tiles (A dy) * (B^T d) ]        (F(3, m): A is alpha x m, G^T 3 x alpha)

with the forward's own matrices. In 3-D, per transformed position ``p``:

    Mw[p] (O x C) = sum_tiles DY[p]^T V[p],    DY = (A_d (x) A_h (x) A_w) dy_tile
    dw_{o,c}      = (G_d^T (x) G_h^T (x) G_w^T) Mw[:, o, c]

- V: the forward's input transform (``_input_worker``, unchanged);
- DY ``(P, T, Ob)``: ``_grad_worker``, the adjoint of the output transform: dy's
  ``m_d x m_h x m_w`` tile with zeros beyond the output (the far faces' partial tiles
  then add nothing, whatever x holds there), A along D, H and W, output channels as
  lanes;
- GEMM: per block of tile rows, ``P`` BLAS calls ``Mw[p] += DY[p]^T V[p]`` accumulating
  in place (``beta = 1``; ``_blas.gemm_batch`` builds the ctypes arguments once, as
  thousands of small calls add up), BLAS's ``m`` being the smaller channel count
  (``Mw`` is stored ``(P, O, C)`` or ``(P, C, O)``; 187 vs 150 GFLOP/s at 128 x 256);
- ``_weight_out_worker``: G^T along W, H and D in float64, rounded once into ``dw``.

``Mw (P, Cp, Ob)`` takes U's place in the workspace, with ``V`` and ``DY`` for a block;
when it cannot be held whole, one slab of depth points of ``Mw`` accumulates over all
blocks and its share goes through G^T into ``dw``, or, in chunked plans, each block's
chunk of ``Mw`` (``beta = 0``) goes through G^T at once; the shares are added to ``dw``
in float64 (the first writes it).
The tile sizes are the forward's: F(2) on every axis measured 1.3-2.3x slower (c3d_conv3a
87 vs 61 ms, unet3d_enc2 330 vs 161, unet3d_deep 60 vs 44), for 4-8x smaller errors.

Accuracy: the transformed operands are up to ~15^3 times the samples and cancel in
G^T, so the float32 sums over tiles inside each GEMM dominate the error (a float64 GEMM
on the same V and DY is 3-7x more accurate; adding the blocks in float64 is not).
Measured max error relative to max|dw| (float32 against a float64 direct sum): F(4)
4e-6..2e-5 for C = 16..256 (c3d_conv3a 5e-6, unet3d_deep 5e-6, unet3d_enc2 9e-6), F(2)
~1e-6, the in-plane unfolding 3-5e-7; relative to the largest sum of magnitudes
``max(|dy| (*) |x|)``, F(4) 1e-7..8e-7. ``tests/test_winograd.py`` bounds it by
``c * eps * sqrt(N*Do*Ho*Wo) * max(|dy| (*) |x|)``, c measured <= 2.2 (F(2): 0.64).

Speed (2 threads, float32, interleaved in one process, best of 7): c3d_conv3a 61 ms
against 105 for the in-plane unfolding and 140 for per-tap GEMM, unet3d_enc2 161 vs 263
and 281, unet3d_deep 44 vs 82 and 95. Per layer, c3d_conv3a: input transform 12 ms,
DY transform 17, GEMMs 23 (~150 GFLOP/s), G^T 7; unet3d_enc2: 30, 46, 66 (the 64 x 32
products run at ~55 GFLOP/s), 0.4. The many small BLAS calls make it (like the forward's
batched matmul) sensitive to other processes taking a core: OpenBLAS's threads then wait
on each other once per call.

Non-finite data: any Inf/NaN in ``x`` or ``dy`` makes this ``dw`` non-finite (every
sample reaches a transformed position with a nonzero coefficient, and the sums and G^T
keep it), so a non-finite result -- float32 overflow in the transforms included -- is
recomputed by the GEMM family, whose Inf/NaN propagation is exact; checking the small
``dw`` instead of both inputs saves a pass over them (13 ms on unet3d_enc2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import config
from ._args import ConvGeometry
from ._blas import gemm_batch, single_threaded_blas
from ._layout import layout_shape, transpose_channels
from ._numba_runtime import compile_once, numba_available, run_shares, run_tasks

NAME = "winograd"
#: The transforms mix every sample of a tile, so one Inf/NaN would spread to the whole
#: tile (Inf becoming NaN); the engine falls back to a GEMM algorithm for such data.
FINITE_ONLY = True

#: Channels per transform work item: the SIMD lanes of the transforms. C and O are
#: padded up to a multiple of CB inside the workspace (zero lanes).
CB = 16
#: Target bytes of one thread's transform scratch (sets the tiles per work item).
SCRATCH_TARGET = 1536 << 10
#: The transformed weight (``U``; ``Mw`` in the weight gradient, 8x the weight for
#: F(4x4x4, 3x3x3)) is held whole when it takes at most the cap divided by this (32 MiB of
#: the default 64); a larger one goes in chunks of output channels, computed again for
#: every block (see "Memory" above).
TRANSFORMED_WEIGHT_SHARE = 2
#: A block's transformed input and output (``V + M``) aim at this fraction of the cap
#: (16 MiB of the default 64). Smaller blocks keep them in cache; bigger ones make fewer,
#: taller GEMMs and re-read U less often. With 32-64 channels the per-point GEMMs of ~150
#: tiles ran at ~70 GFLOP/s, of ~600 at ~85, and against 1/8 (interleaved fresh
#: processes, forward ms): dilated_d2 98-111 -> 72-92, unet3d_enc2 112-174 -> 98-135;
#: 128-256 channels (C3D conv3a, U-Net 16^3: blocks bounded by the room U leaves) and
#: R(2+1)D's spatial layer measured the same; 3/8 no faster than 1/4.
BLOCK_FRACTION = 1 / 4
#: The weight gradient's blocks (``V + DY``) aim at this fraction of the cap (24 MiB of the
#: default 64): its GEMMs reduce over a block's tiles, and 8 MiB blocks measured 20-40%
#: slower (dilated_d2, unet3d_enc2).
WEIGHT_BLOCK_FRACTION = 3 / 8
#: Blocks get at least this many tiles when the cap permits (thin GEMMs run badly).
MIN_BLOCK_TILES = 64
#: A transformed weight too large for TRANSFORMED_WEIGHT_SHARE goes in slabs of depth
#: points, as few as let one slab's take at most this share of the cap and leave room for
#: blocks of SLAB_MIN_TILES tiles (see "Memory").
SLAB_SHARE = 0.6
SLAB_MIN_TILES = 32
#: The weight gradient's slabs leave room for blocks of this many tiles: its GEMMs reduce
#: over a block's tiles and read and write the slab's ``Mw`` once per block, so more
#: slabs of taller blocks beat fewer slabs of shorter ones. C3D conv3a's weight gradient
#: (3 rounds in one process, ms, 32 tiles against 64): under a 24 MiB cap 88-97 against
#: 78-96 (2 slabs of 35-tile blocks against 3 of 84), under 32 MiB 74-89 against 60-71;
#: the U-Net 16^3 level under 32 MiB 58-63 against 46-58, under 24 MiB the same. (The
#: default cap holds both layers' ``Mw`` whole.)
WEIGHT_SLAB_MIN_TILES = 64
#: Tests may force one tile size (2 or 4) on every axis; None picks per axis.
FORCE_TILE: int | None = None
#: Tests may turn the slabs of depth points off (to reach the chunked plans).
SLABS = True

_BT = {
    2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    4: [
        [1, -3 / 2, -2, 3 / 2, 1, 0],
        [0, -1, 1 / 2, 5 / 2, 1, 0],
        [0, 1, -5 / 2, 1 / 2, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 1 / 2, -1, -1 / 2, 1, 0],
        [0, 1, -3 / 2, -2, 3 / 2, 1],
    ],
}
_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [
        [1, 0, 0],
        [1 / 3, 1 / 3, 1 / 3],
        [-1 / 3, 1 / 3, -1 / 3],
        [-16 / 15, -8 / 15, -4 / 15],
        [1 / 15, -2 / 15, 4 / 15],
        [0, 0, 1],
    ],
}
_AT = {
    2: [[1, 1, 1, 0], [0, 1, -1, -1]],
    4: [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 1 / 2, -2, 0],
        [0, 1, 1, 1 / 4, 4, 0],
        [0, 1, -1, 1 / 8, -8, 1],
    ],
}


def matrices(m: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B^T, G, A^T)`` of ``F(m, 3)`` for ``m`` in (2, 4); the kernels hard-code B^T, A^T."""
    return (
        np.array(_BT[m], dtype=dtype),
        np.array(_G[m], dtype=dtype),
        np.array(_AT[m], dtype=dtype),
    )


# ------------------------------------------------------------------ support and planning


def supports(geom: ConvGeometry) -> bool:
    """Dense kernels of 3 or 1 taps per axis (3x3x3, in-plane 1x3x3, ...) with some 3,
    stride 1, dilation 1, numba, and a workspace cap that holds one tile row (planned
    for float64)."""
    return (
        geom.G == 1
        and all(k in (1, 3) for k in geom.kernel)
        and 3 in geom.kernel
        and geom.stride == (1, 1, 1)
        and numba_available()
        and _plan(geom, 8, _threads()) is not None
    )


#: The chooser prefers Winograd when both channel counts fill most of the CB vector
#: lanes, the transformed weight U fits the cap whole (no output-channel chunks, which
#: would redo the input transform per chunk) and there are enough tiles to amortise
#: writing and reading U. Measured (2 threads, against the GEMM algorithms): 1.1-6x
#: faster from C = O = 8 up (C3D conv3a, U-Net 16^3 and 64^3 levels: 2x), slower on
#: 1-3 input channels (lanes mostly padding), on 8 tiles with 128-256 channels (0.4-0.6x)
#: and on C3D conv5a (2x7x7, 512 channels: U is 150-230 MB).
MIN_CHANNELS = 8
MIN_TILES = 32


#: Kernels the chooser gives Winograd: 3x3x3, and in-plane 1x3x3 (F(4x4, 3x3) per plane;
#: R(2+1)D's spatial layer: forward/dx/dw 27/30/33 ms against im2col's 51/56/51). Depth-only
#: (3, 1, 1) kernels are GEMMs on the arrays themselves (``pointwise``), with no transforms.
PREFERRED_KERNELS = ((3, 3, 3), (1, 3, 3))


#: Largest ratio of computed tile outputs to real outputs (partial tiles at the far faces,
#: per dilation phase) at which the chooser takes Winograd. Measured against the in-plane
#: unfolding (2 threads, forward): waste 1.0-1.73 wins 1.1-2.8x (32^3 d=2, 20^3 d=3,
#: 10^3, 24^3 d=3), waste 2.09-5.6 loses (0.31-0.90x: 5x14x14 and 5^3 at 128-256
#: channels, 9^3, 6^3, 12^3 d=2, 18^3 d=4).
MAX_TILE_WASTE = 2.0


def tile_waste(geom: ConvGeometry) -> float:
    """Computed tile outputs per real output: ``prod(d * ceil(ceil(n/d)/m) * m / n)``."""
    waste = 1.0
    axes = zip(geom.spatial_out, _phase_extents(geom), tile_sizes(geom), geom.dilation, strict=True)
    for n, extent, m, d in axes:
        waste *= d * _ceil(extent, m) * m / max(1, n)
    return waste


def prefer(geom: ConvGeometry, dtype) -> bool:
    """Whether the chooser should take Winograd for this geometry (see MIN_CHANNELS and
    MAX_TILE_WASTE)."""
    if geom.kernel not in PREFERRED_KERNELS or min(geom.C, geom.O) < MIN_CHANNELS:
        return False
    if min(geom.spatial_out) == 0 or tile_waste(geom) > MAX_TILE_WASTE:
        return False
    if not supports(geom):
        return False
    plan = _plan(geom, np.dtype(dtype).itemsize, _threads())
    if plan is None:
        return False
    return _chunks_pay(geom, plan) and plan.rows * plan.grid[2] >= MIN_TILES


#: Multiplications per output (tile waste included) at which Winograd still pays for
#: computing its transformed weight again for every block (a chunked plan, under a cap
#: that cannot hold it whole), or for its gathers and scatters once per slab. 27
#: direct; F(4x4x4, 3x3x3) 3.4. Measured at a 32 MiB cap (2 threads, chunks): C3D
#: conv3a (3.4) forward 72 ms and backward 186 against the in-plane unfolding's 160 and
#: 299; C3D conv5a (F(2) on its depth of 2, 5.9) 110-141 against 98.
MAX_CHUNKED_MULTIPLICATIONS = 4.5


def _chunks_pay(geom: ConvGeometry, plan: _Plan) -> bool:
    """Whether the plan holds the transformed weight whole, or computes each chunk once
    (one block holds every tile), or saves enough multiplications to recompute its
    chunks per block, or to gather its input (and scatter its output) once per slab
    (MAX_CHUNKED_MULTIPLICATIONS). C3D conv5a (F(2) on its depth of 2: 5.9
    multiplications per output; U is 151 MB, in chunks of 96 output channels, one
    block of its 64 tiles): forward 74 ms against the in-plane unfolding's 107-118,
    backward 150-162 against 206-213."""
    if plan.whole and len(plan.slabs) == 1:
        return True
    if not plan.whole and plan.rb >= plan.rows:  # one block: each chunk computed once
        return True
    per_output = plan.P / int(np.prod(plan.ms)) * tile_waste(geom)
    return per_output <= MAX_CHUNKED_MULTIPLICATIONS


#: The weight gradient needs 16 input channels too: with 8 the V lanes and GEMMs are
#: half padding and the in-plane unfolding measured faster (1x8->8 at 64^3: 51 vs 38 ms;
#: 16->16: 43 vs 77 ms).
MIN_WEIGHT_CHANNELS = 16


def prefer_weight(geom: ConvGeometry, dtype) -> bool:
    """Whether the engine should take Winograd's own weight gradient: where it prefers
    the forward, with >= 16 input channels and ``Mw`` fitting the cap whole, or in
    chunks where they pay (:func:`_chunks_pay`). Measured against the
    in-plane unfolding (2 threads): 1.6-1.9x faster on C3D conv3a and the U-Net 64^3
    and 16^3 levels, 1.4-1.8x with 16-32 channels at 32^3-64^3 (even at 16 channels on
    32^3)."""
    if geom.C < MIN_WEIGHT_CHANNELS or not prefer(geom, dtype):
        return False
    plan = _plan_weight(geom, np.dtype(dtype).itemsize, _threads())
    return plan is not None and _chunks_pay(geom, plan)


def tile_sizes(geom: ConvGeometry) -> tuple[int, int, int]:
    """Output tile size per axis: 4, or 2 where the output extent is <= 2 (there F(2, 3)
    covers the axis with 4 transformed points instead of 6); 1 on an axis with a 1-tap
    kernel (no transform: one transformed point per output)."""
    sizes = []
    for n, k in zip(_phase_extents(geom), geom.kernel, strict=True):
        if k == 1:
            sizes.append(1)
        elif FORCE_TILE is not None:
            sizes.append(FORCE_TILE)
        else:
            sizes.append(2 if n <= 2 else 4)
    return tuple(sizes)  # type: ignore[return-value]


def _phase_extents(geom: ConvGeometry) -> tuple[int, int, int]:
    """Outputs per axis of the largest dilation phase: ``ceil(out / d)`` (all of them
    without dilation)."""
    return tuple(_ceil(n, d) for n, d in zip(geom.spatial_out, geom.dilation, strict=True))  # type: ignore[return-value]


def _threads() -> int:
    """numba's thread count (the transform workers); numba must be importable."""
    import numba

    return int(numba.get_num_threads())


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _points(ms) -> tuple[int, int, int]:
    """Transformed points per axis: ``m + 2``, or 1 on a 1-tap axis (``m = 1``)."""
    return tuple(m + 2 if m > 1 else 1 for m in ms)  # type: ignore[return-value]


def _kernel_taps(ms) -> tuple[int, int, int]:
    """Kernel taps per axis: 3, or 1 on a 1-tap axis (``m = 1``)."""
    return tuple(3 if m > 1 else 1 for m in ms)  # type: ignore[return-value]


def _scratch_elems(ms, Cp: int, ob: int, tiles_in: int, tiles_out: int) -> tuple:
    """Elements of one thread's scratch in the weight (float64: counted twice), input
    and output transforms."""
    ad, ah, aw = _points(ms)
    rd, rh, rw = _kernel_taps(ms)
    mh, mw = ms[1], ms[2]
    wgt = (rd * rh * rw + 2 * (ad * rh * rw + ad * ah * rw + aw)) * ob
    inp = _input_scratch_elems(ms, Cp, tiles_in)
    out = (ad * ah * mw + ad * mh * mw + mw) * tiles_out * ob
    return wgt, inp, out


def _input_scratch_elems(ms, Cp: int, tiles: int) -> int:
    """Elements of one thread's input-transform scratch for ``tiles`` W tiles (two
    buffers of the window, one tile more than the item: the halo)."""
    ad, ah = _points(ms)[:2]
    return 2 * ad * ah * ms[2] * (tiles + 1) * Cp


def _input_tiles(ms, Cp: int, TW: int, itemsize: int) -> int:
    """W tiles per input-transform item: as many as keep its scratch near SCRATCH_TARGET."""
    per_tile = _input_scratch_elems(ms, Cp, 0)
    return max(1, min(TW, SCRATCH_TARGET // (itemsize * per_tile) - 1))


class _Plan(NamedTuple):
    """Blocking of one Winograd pass (the forward, or the weight gradient)."""

    ms: tuple[int, int, int]  # output tile size per axis
    grid: tuple[int, int, int]  # tiles per axis and dilation phase (TD, TH, TW)
    items: tuple[int, int]  # W tiles per input-side / output-side transform item
    rows: int  # tile rows (N * dilation phases * TD * TH)
    Cp: int  # input channels, padded to the CB lanes
    Op: int  # output channels, padded to the CB lanes
    ob: int  # output channels per chunk: Op, or a chunk recomputed for every block
    rb: int  # tile rows per block
    pz: int  # depth points per slab: all of them (alpha_d), or a slab at a time
    workspace: int  # bytes allocated besides the inputs and the output

    @property
    def P(self) -> int:
        """Transformed positions of a tile."""
        return int(np.prod(_points(self.ms)))

    @property
    def Ps(self) -> int:
        """Transformed positions of a tile in one slab of depth points."""
        return self.P // _points(self.ms)[0] * self.pz

    @property
    def slabs(self) -> range:
        """First depth point of every slab."""
        return range(0, _points(self.ms)[0], self.pz)

    @property
    def whole(self) -> bool:
        """Whether the transformed weight (``U`` / ``Mw``) is held whole, for all blocks."""
        return self.ob == self.Op


def _block_rows(rows: int, TW: int, room: int, per_row: int, target: int) -> int:
    """Tile rows per block: near ``target`` bytes and within ``room``, but at least
    MIN_BLOCK_TILES tiles where the room allows."""
    rb = min(rows, room // per_row, max(1, target // per_row))
    return int(max(rb, min(rows, _ceil(MIN_BLOCK_TILES, TW), room // per_row)))


def _plan(geom: ConvGeometry, itemsize: int, threads: int, kind: str = "forward"):
    """Blocking such that everything a pass allocates fits ``workspace_bytes``: the
    transformed weight ``U (P, Cp, Ob)`` (``Mw`` for the weight gradient), per block of
    tile rows ``V (P, T, Cp)`` and ``M (P, T, Ob)`` (``DY``), and the threads' scratch.

    The transformed weight is held whole when it takes at most the cap's
    ``1 / TRANSFORMED_WEIGHT_SHARE``, and the blocks aim at ``BLOCK_FRACTION`` of it
    (``WEIGHT_BLOCK_FRACTION`` in the weight gradient).
    A larger one goes in chunks of output channels when one block takes every tile
    (each chunk computed once), else whole per slab of ``pz`` depth points (P above is
    then a slab's ``Ps``), else in chunks computed again for every block (see "Memory"
    in the module docstring): then ``V`` alone aims at the block share and a chunk's
    ``U + M`` at the transformed-weight share. None when the problem is empty (the
    engine answers without an algorithm) or not even one tile row and CB output
    channels fit.
    """
    if min(geom.N, geom.C, geom.O, *geom.spatial_out) == 0:
        return None
    ms = tile_sizes(geom)
    ad, ah, aw = _points(ms)
    P = ad * ah * aw
    # per dilation phase (the outputs d*z' + r, one tile grid per phase r)
    TD, TH, TW = (_ceil(n, m) for n, m in zip(_phase_extents(geom), ms, strict=True))
    rows = geom.N * int(np.prod(geom.dilation)) * TD * TH
    Cp, Op = _ceil(geom.C, CB) * CB, _ceil(geom.O, CB) * CB
    cap = config.workspace_bytes
    share = cap // TRANSFORMED_WEIGHT_SHARE
    target = int(cap * (BLOCK_FRACTION if kind == "forward" else WEIGHT_BLOCK_FRACTION))
    tin = _input_tiles(ms, Cp, TW, itemsize)

    def scratch(ob: int) -> tuple[int, int]:
        """W tiles per output-side item, and the bytes of all threads' scratch."""
        if kind == "weight":
            per_tile = _grad_scratch_elems(ms, ob, 1)
            tout = max(1, min(TW, SCRATCH_TARGET // (itemsize * per_tile)))
            elems = max(_input_scratch_elems(ms, Cp, tin), _grad_scratch_elems(ms, ob, tout))
        else:
            per_tile = _scratch_elems(ms, Cp, ob, 1, 1)[2]
            tout = max(1, min(TW, SCRATCH_TARGET // (itemsize * per_tile)))
            elems = max(_scratch_elems(ms, Cp, ob, tin, tout))
        return tout, threads * itemsize * elems

    def total(ob: int, rb: int, pz: int) -> int:
        Ps = pz * ah * aw
        weight = Ps * Cp * ob * itemsize
        blocks = scratch(ob)[1] + Ps * rb * TW * (Cp + ob) * itemsize
        if kind == "weight":  # the G^T stage's float64 scratch, while V and DY live
            blocks += _finish_bytes(ms, ob, threads)
        return weight + blocks

    def whole_rows(pz: int) -> int:
        """Tile rows per block with the slab's transformed weight whole (0: none fit)."""
        Ps = pz * ah * aw
        room = cap - total(Op, 0, pz)
        per_row = Ps * (Cp + Op) * TW * itemsize
        return _block_rows(rows, TW, room, per_row, target) if room >= per_row else 0

    def chunked() -> tuple[int, int]:
        """Output channels per chunk and tile rows per block of a chunked plan."""
        rb = _block_rows(rows, TW, cap, P * Cp * TW * itemsize, target)
        ob = max(CB, min(Op - CB, share // (P * (Cp + rb * TW) * itemsize) // CB * CB))
        while rb > 1 and total(ob, rb, ad) > cap:
            rb //= 2
        return ob, rb

    # The transformed weight whole. Else in chunks of output channels where one block
    # takes every tile (each chunk is computed once: nothing is done twice); else whole
    # per slab of depth points, as few slabs as fit with blocks of SLAB_MIN_TILES (the
    # weight gradient: of WEIGHT_SLAB_MIN_TILES where any slab allows them; see "Memory");
    # else in chunks computed again for every block.
    pz, ob, rb = ad, Op, 0
    if P * Cp * Op * itemsize <= share:
        rb = whole_rows(ad)
    else:
        ob, rb = chunked()
        # the weight gradient asks for taller blocks first, then settles for shorter ones
        tiers = (WEIGHT_SLAB_MIN_TILES,) if kind == "weight" else ()
        slabs = range(ad - 1, 0, -1)  # depth points per slab, fewest slabs first
        fit = [z for z in slabs if z * ah * aw * Cp * Op * itemsize <= cap * SLAB_SHARE]
        for fewest in (*tiers, SLAB_MIN_TILES) if SLABS and rb < rows else ():
            least = min(rows, _ceil(fewest, TW))
            slab = next((z for z in fit if whole_rows(z) >= least), 0)
            if slab:
                pz, ob, rb = slab, Op, whole_rows(slab)
                break
    if rb < 1 or total(ob, rb, pz) > cap:
        return None
    items = (tin, scratch(ob)[0])
    return _Plan(ms, (TD, TH, TW), items, rows, Cp, Op, ob, rb, pz, total(ob, rb, pz))


def workspace_bytes(geom: ConvGeometry, itemsize: int, threads: int = 2) -> int:
    """Bytes the forward allocates besides its input, weight and output."""
    plan = _plan(geom, itemsize, threads)
    if plan is None:
        raise ValueError("winograd: the workspace cap cannot hold one tile row")
    return plan.workspace


def _grad_scratch_elems(ms, ob: int, tiles: int) -> int:
    """Elements of one thread's scratch in the output-gradient transform (:func:`_grad_worker`)."""
    md, mh, mw = ms
    ad, ah = _points(ms)[:2]
    return (md * mh + ad * mh + ad * ah + 1) * mw * tiles * ob


def _plan_weight(geom: ConvGeometry, itemsize: int, threads: int):
    """:func:`_plan` of the weight gradient."""
    return _plan(geom, itemsize, threads, "weight")


def weight_workspace_bytes(geom: ConvGeometry, itemsize: int, threads: int = 2) -> int:
    """Bytes the weight gradient allocates besides its inputs and ``dw``."""
    plan = _plan_weight(geom, itemsize, threads)
    if plan is None:
        raise ValueError("winograd: the workspace cap cannot hold one tile row")
    return plan.workspace


def _finish_bytes(ms, lanes: int, threads: int) -> int:
    """float64 scratch of the threads in the final G^T transform (:func:`_weight_out_worker`)."""
    ad, ah, aw = _points(ms)
    rd, rh, rw = _kernel_taps(ms)
    return threads * 8 * (ad * ah * aw + ad * ah * rw + ad * rh * rw + rd * rh * rw) * lanes


# ----------------------------------------------------------------- kernels (numba)
#
# Plain Python here, wrapped in ``numba.njit(nogil=True, cache=True)`` on first use
# (:func:`_kernels`). The 1-D transforms are hard-coded as ``dst[i, k] = sum_j T[i, j] *
# src_j[k]`` over one long unit-stride loop with all alpha sources in registers, which
# LLVM vectorises (a loop over a generic matrix would make alpha passes over memory).
# Constants are float32 so that float32 data stays float32 (a float64 or int literal
# promotes the expression); all of them are exact in binary.
#
# The vector lanes are channels: all ``Cp`` input channels (input transform) or all
# ``Ob`` output channels (output transform) of a few tiles, so the GEMM operands
# ``V[p, t, :]`` / ``M[p, t, :]`` are read and written in long contiguous runs.
# W rows are stored *phase-split*: sample ``m*tq + ph`` of a row at ``[ph, tq]``, so
# that tile ``tw``'s alpha samples ``m*tw + j`` sit in phase row ``j % m`` at tile
# ``tw + j // m``: one unit-stride loop over (tile, lane) again.

_H, _Q, _E = np.float32(0.5), np.float32(0.25), np.float32(0.125)
_1H, _2, _2H = np.float32(1.5), np.float32(2.0), np.float32(2.5)
_4, _8 = np.float32(4.0), np.float32(8.0)
_THIRD, _FIFTEENTH = 1.0 / 3.0, 1.0 / 15.0  # float64: the weight transform's arithmetic


def _alpha(m):  # pragma: no cover - compiled
    """Transformed points per axis: ``m + 2`` for F(m, 3), 1 on a 1-tap axis (``m = 1``)."""
    return m + 2 if m > 1 else 1


def _taps(m):  # pragma: no cover - compiled
    """Kernel taps per axis: 3, or 1 on a 1-tap axis (``m = 1``)."""
    return 3 if m > 1 else 1


def _split_row(r, TD, TH, dd, dh, dw):  # pragma: no cover - compiled
    """Batch item, dilation phases and tile row ``(n, rz, ry, rx, tz, ty)`` of row ``r``.

    Rows are ordered n, rz, ry, tz, ty, rx: the W phases of one tile row are neighbours,
    so the work items that read (and write) the interleaved samples of the same cache
    lines run close together."""
    rx = r % dw
    q = r // dw
    ty = q % TH
    tz = (q // TH) % TD
    b = q // (TH * TD)
    ry = b % dh
    rz = (b // dh) % dd
    return b // (dh * dd), rz, ry, rx, tz, ty


def _bt4(src, sr, so, R, L, dst, dr, do, K):  # pragma: no cover - compiled
    """B^T of F(4, 3): ``dst[dr + i, do + k]`` from source rows ``j``: ``src[sr + j, so + k]``
    for ``j < R``, else ``src[sr + j - R, so + L + k]`` (the phase-split W rows)."""
    r4, o4 = (sr + 4, so) if R > 4 else (sr, so + L)
    r5, o5 = (sr + 5, so) if R > 5 else (sr + 1, so + L)
    for k in range(K):
        d0, d1 = src[sr, so + k], src[sr + 1, so + k]
        d2, d3 = src[sr + 2, so + k], src[sr + 3, so + k]
        d4, d5 = src[r4, o4 + k], src[r5, o5 + k]
        dst[dr, do + k] = d0 - _1H * d1 - _2 * d2 + _1H * d3 + d4
        dst[dr + 1, do + k] = -d1 + _H * d2 + _2H * d3 + d4
        dst[dr + 2, do + k] = d1 - _2H * d2 + _H * d3 + d4
        dst[dr + 3, do + k] = -_2 * d1 - d2 + _2 * d3 + d4
        dst[dr + 4, do + k] = _H * d1 - d2 - _H * d3 + d4
        dst[dr + 5, do + k] = d1 - _1H * d2 - _2 * d3 + _1H * d4 + d5


def _bt2(src, sr, so, R, L, dst, dr, do, K):  # pragma: no cover - compiled
    """B^T of F(2, 3), addressed like :func:`_bt4`."""
    r2, o2 = (sr + 2, so) if R > 2 else (sr, so + L)
    r3, o3 = (sr + 3, so) if R > 3 else (sr + 1, so + L)
    for k in range(K):
        d0, d1 = src[sr, so + k], src[sr + 1, so + k]
        d2, d3 = src[r2, o2 + k], src[r3, o3 + k]
        dst[dr, do + k] = d0 - d2
        dst[dr + 1, do + k] = d1 + d2
        dst[dr + 2, do + k] = d2 - d1
        dst[dr + 3, do + k] = d1 - d3


def _bt(m, src, sr, so, R, L, dst, dr, do, K):  # pragma: no cover - compiled
    if m == 4:
        _bt4(src, sr, so, R, L, dst, dr, do, K)
    elif m == 2:
        _bt2(src, sr, so, R, L, dst, dr, do, K)
    else:  # a 1-tap axis: alpha = 1, the identity
        for k in range(K):
            dst[dr, do + k] = src[sr, so + k]


def _at(m, src, sr, so, dst, dr, do, K):  # pragma: no cover - compiled
    """A^T of F(m, 3): ``dst[dr + i, do + k]`` from ``src[sr + j, so + k]`` (the
    identity on a 1-tap axis, ``m = 1``)."""
    if m == 4:
        for k in range(K):
            m0, m1, m2 = src[sr, so + k], src[sr + 1, so + k], src[sr + 2, so + k]
            m3, m4, m5 = src[sr + 3, so + k], src[sr + 4, so + k], src[sr + 5, so + k]
            dst[dr, do + k] = m0 + m1 + m2 + m3 + m4
            dst[dr + 1, do + k] = m1 - m2 + _H * m3 - _2 * m4
            dst[dr + 2, do + k] = m1 + m2 + _Q * m3 + _4 * m4
            dst[dr + 3, do + k] = m1 - m2 + _E * m3 - _8 * m4 + m5
    elif m == 2:
        for k in range(K):
            m0, m1 = src[sr, so + k], src[sr + 1, so + k]
            m2, m3 = src[sr + 2, so + k], src[sr + 3, so + k]
            dst[dr, do + k] = m0 + m1 + m2
            dst[dr + 1, do + k] = m1 - m2 - m3
    else:
        for k in range(K):
            dst[dr, do + k] = src[sr, so + k]


#: A^T of F(4, 3) and F(2, 3) as tables, and A (their transposes), for the partial sums
#: over a slab of depth points.
_AT4 = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 0.5, -2, 0], [0, 1, 1, 0.25, 4, 0], [0, 1, -1, 0.125, -8, 1]],
    dtype=np.float32,
)
_AT2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float32)
_A4, _A2 = np.ascontiguousarray(_AT4.T), np.ascontiguousarray(_AT2.T)


def _combine(T, i0, i1, j0, j1, src, dst, K):  # pragma: no cover - compiled
    """``dst[i, k] = sum_{j0 <= j < j1} T[i, j] src[j, k]`` for ``i0 <= i < i1``, summed in
    order of ``j`` and skipping zero coefficients (rows with none are zeroed)."""
    for i in range(i0, i1):
        started = False
        for j in range(j0, j1):
            c = T[i, j]
            if c != 0:
                if started:
                    for k in range(K):
                        dst[i, k] += c * src[j, k]
                else:
                    for k in range(K):
                        dst[i, k] = c * src[j, k]
                    started = True
        if not started:
            for k in range(K):
                dst[i, k] = 0


def _at_slab(m, src, a0, pz, dst, K):  # pragma: no cover - compiled
    """A^T on the rows of one slab only: ``dst[i, k] = sum_{a0 <= j < a0 + pz} A^T[i, j]
    src[j, k]`` (the other rows count as zero; F(4, 3) or F(2, 3))."""
    _combine(_AT4 if m == 4 else _AT2, 0, m, a0, a0 + pz, src, dst, K)


def _a_slab(m, src, a0, pz, dst, K):  # pragma: no cover - compiled
    """A (the transpose of A^T) into the rows of one slab only: ``dst[j, k] = sum_i
    A^T[i, j] src[i, k]`` for ``a0 <= j < a0 + pz``."""
    _combine(_A4 if m == 4 else _A2, a0, a0 + pz, 0, m, src, dst, K)


def _a(m, src, sr, so, dst, dr, do, K):  # pragma: no cover - compiled
    """A of F(m, 3) (the transpose of A^T, ``alpha x m``): ``dst[dr + j, do + k]`` from
    ``src[sr + i, so + k]``, ``i < m`` -- the adjoint of :func:`_at`."""
    if m == 4:
        for k in range(K):
            y0, y1 = src[sr, so + k], src[sr + 1, so + k]
            y2, y3 = src[sr + 2, so + k], src[sr + 3, so + k]
            dst[dr, do + k] = y0
            dst[dr + 1, do + k] = y0 + y1 + y2 + y3
            dst[dr + 2, do + k] = y0 - y1 + y2 - y3
            dst[dr + 3, do + k] = y0 + _H * y1 + _Q * y2 + _E * y3
            dst[dr + 4, do + k] = y0 - _2 * y1 + _4 * y2 - _8 * y3
            dst[dr + 5, do + k] = y3
    elif m == 2:
        for k in range(K):
            y0, y1 = src[sr, so + k], src[sr + 1, so + k]
            dst[dr, do + k] = y0
            dst[dr + 1, do + k] = y0 + y1
            dst[dr + 2, do + k] = y0 - y1
            dst[dr + 3, do + k] = -y1
    else:
        for k in range(K):
            dst[dr, do + k] = src[sr, so + k]


def _g(m, s0, s1, s2, dst, K):  # pragma: no cover - compiled
    """``dst[i, k] = (G (s0, s1, s2)[k])[i]`` in float64 (G of F(m, 3), hard-coded; on a
    1-tap axis, ``m = 1``, ``dst[0] = s0``)."""
    if m == 4:
        for k in range(K):
            g0, g1, g2 = np.float64(s0[k]), np.float64(s1[k]), np.float64(s2[k])
            dst[0, k] = g0
            dst[1, k] = (g0 + g1 + g2) * _THIRD
            dst[2, k] = (g1 - g0 - g2) * _THIRD
            dst[3, k] = (-16.0 * g0 - 8.0 * g1 - 4.0 * g2) * _FIFTEENTH
            dst[4, k] = (g0 - 2.0 * g1 + 4.0 * g2) * _FIFTEENTH
            dst[5, k] = g2
    elif m == 2:
        for k in range(K):
            g0, g1, g2 = np.float64(s0[k]), np.float64(s1[k]), np.float64(s2[k])
            dst[0, k] = g0
            dst[1, k] = 0.5 * (g0 + g1 + g2)
            dst[2, k] = 0.5 * (g0 - g1 + g2)
            dst[3, k] = g2
    else:  # a 1-tap axis: s0 only
        for k in range(K):
            dst[0, k] = np.float64(s0[k])


def _gt(m, src, sr, ss, dst, dr, ds, K):  # pragma: no cover - compiled
    """G^T of F(m, 3) in float64: ``dst[dr + j*ds, k] = sum_i G[i, j] src[sr + i*ss, k]``
    (a copy on a 1-tap axis)."""
    if m == 4:
        for k in range(K):
            m0, m1, m2 = src[sr, k], src[sr + ss, k], src[sr + 2 * ss, k]
            m3, m4, m5 = src[sr + 3 * ss, k], src[sr + 4 * ss, k], src[sr + 5 * ss, k]
            dst[dr, k] = m0 + (m1 - m2) * _THIRD + (-16.0 * m3 + m4) * _FIFTEENTH
            dst[dr + ds, k] = (m1 + m2) * _THIRD - (8.0 * m3 + 2.0 * m4) * _FIFTEENTH
            dst[dr + 2 * ds, k] = (m1 - m2) * _THIRD + (4.0 * (m4 - m3)) * _FIFTEENTH + m5
    elif m == 2:
        for k in range(K):
            m0, m1, m2, m3 = src[sr, k], src[sr + ss, k], src[sr + 2 * ss, k], src[sr + 3 * ss, k]
            dst[dr, k] = m0 + 0.5 * (m1 + m2)
            dst[dr + ds, k] = 0.5 * (m1 - m2)
            dst[dr + 2 * ds, k] = 0.5 * (m1 + m2) + m3
    else:
        for k in range(K):
            dst[dr, k] = src[sr, k]


def _weight_worker(task, ntasks, w, ms, o0, a0, U):  # pragma: no cover - compiled
    """``U[p, c, j] = ((Gd (x) Gh (x) Gw) w[o0 + j, c])[p]``, zero for ``c >= C`` or
    ``o0 + j >= O``; computed in float64 and rounded once. ``U`` holds the slab of depth
    points ``a0 <= iz < a0 + pz`` (``pz = U.shape[0] // (ah * aw)``). An item is one
    channel ``c`` with all output channels of the chunk as the vector lanes."""
    O, C, nt = w.shape
    md, mh, mw = ms[0], ms[1], ms[2]
    ad, ah, aw = _alpha(md), _alpha(mh), _alpha(mw)
    pz = U.shape[0] // (ah * aw)
    rh, rw = _taps(mh), _taps(mw)
    # source-row strides of taps 1 and 2 per axis (0 on a 1-tap axis: only tap 0 is read)
    sd, sh, sw = (rh * rw if md > 1 else 0), (rw if mh > 1 else 0), (1 if mw > 1 else 0)
    Cp, K = U.shape[1], U.shape[2]
    no = max(0, min(K, O - o0))
    w27 = np.zeros((nt, K), dtype=U.dtype)
    t1 = np.empty((rh * rw, ad, K))  # [(b, e), iz]
    t2 = np.empty((ad, rw, ah, K))  # [iz, e, iy]
    t3 = np.empty((aw, K))
    for c in range(task * Cp // ntasks, (task + 1) * Cp // ntasks):
        if c >= C:
            for p in range(U.shape[0]):
                for j in range(K):
                    U[p, c, j] = 0
            continue
        for j in range(no):  # transpose w[o0:o0+no, c]
            for k in range(nt):
                w27[k, j] = w[o0 + j, c, k]
        for be in range(rh * rw):  # along D: tap (a, b, e) is row (a*rh + b)*rw + e
            _g(md, w27[be], w27[sd + be], w27[2 * sd + be], t1[be], K)
        for iz in range(a0, a0 + pz):  # along H (the slab's depth points)
            for e in range(rw):
                _g(mh, t1[e, iz], t1[sh + e, iz], t1[2 * sh + e, iz], t2[iz, e], K)
        for iz in range(a0, a0 + pz):  # along W, rounded into U
            for iy in range(ah):
                _g(mw, t2[iz, 0, iy], t2[iz, sw, iy], t2[iz, 2 * sw, iy], t3, K)
                p0 = ((iz - a0) * ah + iy) * aw
                for iw in range(aw):
                    for j in range(K):
                        U[p0 + iw, c, j] = t3[iw, j]


def _weight_out_worker(task, ntasks, Mw, ms, o_first, o0, a0, add, dw):  # pragma: no cover
    """``dw[o, c, (a, b, e)] = ((G_d^T (x) G_h^T (x) G_w^T) Mw[:, o - o0, c])[a, b, e]`` (or
    ``Mw[:, c, o - o0]`` when not ``o_first``) in float64, rounded once into ``dw (O, C,
    27)``, or added to it with ``add``: the adjoint of :func:`_weight_worker`. An item is
    one row ``x`` of ``Mw (P, X, Y)``, its ``Y`` lanes being the vector lanes. ``Mw``
    may hold a slab of depth points ``a0 <= iz < a0 + P // (ah * aw)`` only: the others
    count as zero (this slab's share of ``dw``)."""
    P, X, Y = Mw.shape
    O, C, nt = dw.shape
    md, mh, mw = ms[0], ms[1], ms[2]
    ad, ah, aw = _alpha(md), _alpha(mh), _alpha(mw)
    rh, rw = _taps(mh), _taps(mw)
    pz = P // (ah * aw)
    nx = max(0, min(X, O - o0)) if o_first else min(X, C)
    ny = min(Y, C) if o_first else max(0, min(Y, O - o0))
    A = np.empty((P, Y))
    B = np.empty((ad * ah * rw, Y))  # [(iz, iy), e]
    Cz = np.zeros((ad * rh * rw, Y))  # [iz, (b, e)]; rows outside the slab stay 0
    R = np.empty((nt, Y))  # [(a, b, e)]
    for x in range(task * nx // ntasks, (task + 1) * nx // ntasks):
        for p in range(P):
            for k in range(Y):
                A[p, k] = Mw[p, x, k]
        for izy in range(a0 * ah, (a0 + pz) * ah):  # along W
            _gt(mw, A, (izy - a0 * ah) * aw, 1, B, izy * rw, 1, Y)
        for iz in range(a0, a0 + pz):  # along H
            for e in range(rw):
                _gt(mh, B, iz * ah * rw + e, rw, Cz, iz * rh * rw + e, rw, Y)
        for be in range(rh * rw):  # along D
            _gt(md, Cz, be, rh * rw, R, be, rh * rw, Y)
        if add:  # in float64, rounded once
            for k in range(ny):
                for t in range(nt):
                    if o_first:
                        dw[o0 + x, k, t] = dw[o0 + x, k, t] + R[t, k]
                    else:
                        dw[o0 + k, x, t] = dw[o0 + k, x, t] + R[t, k]
        elif o_first:
            for k in range(ny):
                for t in range(nt):
                    dw[o0 + x, k, t] = R[t, k]
        else:
            for k in range(ny):
                for t in range(nt):
                    dw[o0 + k, x, t] = R[t, k]


def _input_worker(task, ntasks, x, geo, r0, r1, a0, V, cl):  # pragma: no cover - compiled
    """Items ``[task*items//ntasks, (task+1)*items//ntasks)`` of the input transform.

    ``V[p, t, c]`` is the transformed input of the tile rows ``r0 <= r < r1`` (flat over
    N, TD, TH): column ``t`` is tile ``(r0 + t // TW, t % TW)``; lanes ``c >= C`` are 0.
    An item is ``twc`` tiles of one tile row, all channels being the vector lanes.
    ``x`` is ``(N, C, D, H, W)``, or ``(N, D, H, W, C)`` with ``cl`` (channels-last).
    ``V`` holds the slab of depth points ``a0 <= iz < a0 + P // (ah * aw)`` only.
    """
    if cl:
        N, D, H, W, C = x.shape
    else:
        N, C, D, H, W = x.shape
    TD, TH, TW, md, mh, mw, lod, loh, low, twc, dd, dh, dw = geo
    ad, ah, aw = _alpha(md), _alpha(mh), _alpha(mw)
    P, T, L = V.shape
    V2 = V.reshape(P, T * L)
    pz = P // (ah * aw)
    nwc = (TW + twc - 1) // twc
    items = (r1 - r0) * nwc
    Smax = mw * (twc + 1) * L
    Abuf = np.empty(ad * ah * Smax, dtype=V.dtype)
    Bbuf = np.empty(ad * ah * Smax, dtype=V.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        wc = it % nwc
        r = r0 + it // nwc
        n, rz, ry, rx, tz, ty = _split_row(r, TD, TH, dd, dh, dw)
        tw0 = wc * twc
        ntw = min(twc, TW - tw0)
        # window sample j of an axis reads x at  r - lo + d*(tile*m + j)  (dilation
        # phase r: the outputs d*z' + r read only the inputs congruent to r - lo mod d)
        z0 = rz - lod + dd * tz * md
        y0 = ry - loh + dh * ty * mh
        w0 = rx - low + dw * tw0 * mw
        S = mw * (ntw + 1) * L  # one W row, phase-split: sample mw*tq + ph at [ph, tq]
        A = Abuf[: ad * ah * S].reshape(ad * ah, S)
        B = Bbuf[: ad * ah * S].reshape(ad * ah, S)
        # Gather the window, channels innermost (strided loads, contiguous stores: the
        # fast direction of this transposition); zeros outside x (padding), lanes >= C.
        Lq = mw * (ntw + 1)
        qa = max(0, -(w0 // dw))  # samples q in [qa, qb) are inside x
        qb = min(Lq, (W - 1 - w0) // dw + 1)
        if (
            z0 < 0
            or z0 + dd * (ad - 1) >= D
            or y0 < 0
            or y0 + dh * (ah - 1) >= H
            or qa > 0
            or qb < Lq
            or C < L
        ):
            A1 = A.reshape(ad * ah * S)
            for i in range(ad * ah * S):
                A1[i] = 0
        for jz in range(ad):
            z = z0 + dd * jz
            if z < 0 or z >= D:
                continue
            for jy in range(ah):
                yy = y0 + dh * jy
                if yy < 0 or yy >= H:
                    continue
                a = jz * ah + jy
                if cl:  # a sample's channels are contiguous: copied as they are
                    for tq in range(ntw + 1):
                        for ph in range(mw):
                            q = tq * mw + ph
                            if q >= qa and q < qb:
                                base = (ph * (ntw + 1) + tq) * L
                                src = x[n, z, yy, w0 + dw * q]
                                for c in range(C):
                                    A[a, base + c] = src[c]
                    continue
                # eight channels at a time: eight read streams along W, 32-byte stores
                # (all C at once: 38 -> 18 ms on U-Net enc2's 32 channels, 64^3)
                for c0 in range(0, C - 7, 8):
                    for tq in range(ntw + 1):
                        for ph in range(mw):
                            q = tq * mw + ph
                            if q >= qa and q < qb:
                                base = (ph * (ntw + 1) + tq) * L + c0
                                wq = w0 + dw * q
                                for c in range(8):
                                    A[a, base + c] = x[n, c0 + c, z, yy, wq]
                for c in range(C - C % 8, C):
                    for tq in range(ntw + 1):
                        for ph in range(mw):
                            q = tq * mw + ph
                            if q >= qa and q < qb:
                                A[a, (ph * (ntw + 1) + tq) * L + c] = x[n, c, z, yy, w0 + dw * q]
        # along D (rows jz*ah + jy -> iz*ah + jy), then along H, then along W into V
        _bt(md, A.reshape(ad, ah * S), 0, 0, ad, 0, B.reshape(ad, ah * S), 0, 0, ah * S)
        for iz in range(a0, a0 + pz):
            _bt(mh, B, iz * ah, 0, ah, 0, A, iz * ah, 0, S)
        A3 = A.reshape(ad * ah * mw, (ntw + 1) * L)
        col = ((r - r0) * TW + tw0) * L
        for izy in range(a0 * ah, (a0 + pz) * ah):
            _bt(mw, A3, izy * mw, 0, mw, L, V2, (izy - a0 * ah) * aw, col, ntw * L)


def _output_worker(task, ntasks, M, geo, r0, r1, o0, a0, y, bias, add, cl):  # pragma: no cover
    """Items of the output transform: ``y[:, o0 : o0 + L]`` on the tile rows
    ``r0 <= r < r1`` from ``M (P, T, L)``, plus ``bias[o]`` when ``bias`` is not empty;
    an item is ``twc`` tiles, all ``L`` output channels being the vector lanes. ``y`` is
    ``(N, O, Do, Ho, Wo)``, or ``(N, Do, Ho, Wo, O)`` with ``cl`` (channels-last).
    ``M`` may hold a slab of depth points ``a0 <= iz < a0 + P // (ah * aw)`` only (the
    others count as zero); with ``add`` its share is added to ``y`` (no bias)."""
    if cl:
        N, Do, Ho, Wo, O = y.shape
    else:
        N, O, Do, Ho, Wo = y.shape
    TD, TH, TW, md, mh, mw, lod, loh, low, twc, dd, dh, dw = geo
    ad, ah, aw = _alpha(md), _alpha(mh), _alpha(mw)
    P, T, L = M.shape
    M2 = M.reshape(P, T * L)
    pz = P // (ah * aw)
    no = min(L, O - o0)
    nwc = (TW + twc - 1) // twc
    items = (r1 - r0) * nwc
    Smax = mw * twc * L
    Rbuf = np.empty(ad * ah * Smax, dtype=M.dtype)
    Tbuf = np.empty(ad * mh * Smax, dtype=M.dtype)
    row = np.empty((mw * twc, L), dtype=M.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        wc = it % nwc
        r = r0 + it // nwc
        n, rz, ry, rx, tz, ty = _split_row(r, TD, TH, dd, dh, dw)
        tw0 = wc * twc
        ntw = min(twc, TW - tw0)
        S = mw * ntw * L  # one output W row, phase-split: sample mw*tw + kw at [kw, tw]
        R = Rbuf[: ad * ah * S].reshape(ad * ah * mw, ntw * L)
        T2 = Tbuf[: ad * mh * S].reshape(ad * mh, S)
        # along W, straight from M's rows (p = izy*aw + j; tiles contiguous)
        col = ((r - r0) * TW + tw0) * L
        for izy in range(a0 * ah, (a0 + pz) * ah):
            _at(mw, M2, (izy - a0 * ah) * aw, col, R, izy * mw, 0, ntw * L)
        # along H, then along D (into R's memory); depth points outside the slab are 0
        R2 = R.reshape(ad * ah, S)
        for iz in range(a0, a0 + pz):
            _at(mh, R2, iz * ah, 0, T2, iz * mh, 0, S)
        Y = R.reshape(ad * ah * mw * ntw * L)[: md * mh * S].reshape(md, mh * S)
        if pz == ad:
            _at(md, T2.reshape(ad, mh * S), 0, 0, Y, 0, 0, mh * S)
        else:
            _at_slab(md, T2.reshape(ad, mh * S), a0, pz, Y, mh * S)
        Y5 = Y.reshape(md, mh, mw, ntw, L)
        # into y, cropped: un-split the phases into (w, lane) rows, then lane by lane;
        # tile sample i of an axis is output  r + d*(tile*m + i)  (dilation phase r)
        w0 = rx + dw * tw0 * mw
        nw = min(mw * ntw, (Wo - 1 - w0) // dw + 1)
        for kz in range(md):
            z = rz + dd * (tz * md + kz)
            if z >= Do:
                break
            for ky in range(mh):
                yy = ry + dh * (ty * mh + ky)
                if yy >= Ho:
                    break
                if cl:  # an output's channels are contiguous: no lane-by-lane scatter
                    for q in range(nw):
                        dst = y[n, z, yy, w0 + dw * q]
                        src = Y5[kz, ky, q % mw, q // mw]
                        if add:
                            for k in range(no):
                                dst[o0 + k] += src[k]
                        elif bias.shape[0] == 0:
                            for k in range(no):
                                dst[o0 + k] = src[k]
                        else:
                            for k in range(no):
                                dst[o0 + k] = src[k] + bias[o0 + k]
                    continue
                for tw in range(ntw):
                    for kw in range(mw):
                        for k in range(L):
                            row[tw * mw + kw, k] = Y5[kz, ky, kw, tw, k]
                if add:
                    for k in range(no):
                        for q in range(nw):
                            y[n, o0 + k, z, yy, w0 + dw * q] += row[q, k]
                elif bias.shape[0] == 0:
                    for k in range(no):
                        for q in range(nw):
                            y[n, o0 + k, z, yy, w0 + dw * q] = row[q, k]
                else:
                    for k in range(no):
                        b = bias[o0 + k]
                        for q in range(nw):
                            y[n, o0 + k, z, yy, w0 + dw * q] = row[q, k] + b


def _grad_worker(task, ntasks, dy, geo, r0, r1, o0, a0, DY, cl):  # pragma: no cover - compiled
    """Items of the output-gradient transform (the adjoint of :func:`_output_worker`):
    ``DY[p, t, j] = ((A_d (x) A_h (x) A_w) dy_tile[o0 + j])[p]`` on the tile rows
    ``r0 <= r < r1``, each tile ``m_d x m_h x m_w`` read from ``dy`` with zeros beyond
    the output's extent and in lanes ``o0 + j >= O``; an item is ``twc`` tiles of one
    tile row, all ``L`` output channels being the vector lanes. ``dy`` is ``(N, O, Do,
    Ho, Wo)``, or ``(N, Do, Ho, Wo, O)`` with ``cl`` (channels-last). ``DY`` holds the slab
    of depth points ``a0 <= iz < a0 + P // (ah * aw)`` only."""
    if cl:
        N, Do, Ho, Wo, O = dy.shape
    else:
        N, O, Do, Ho, Wo = dy.shape
    TD, TH, TW, md, mh, mw, lod, loh, low, twc, dd, dh, dw = geo
    ad, ah, aw = _alpha(md), _alpha(mh), _alpha(mw)
    P, T, L = DY.shape
    DY2 = DY.reshape(P, T * L)
    pz = P // (ah * aw)
    no = max(0, min(L, O - o0))
    nwc = (TW + twc - 1) // twc
    items = (r1 - r0) * nwc
    Smax = mw * twc * L
    Ybuf = np.empty(md * mh * Smax, dtype=DY.dtype)
    Tbuf = np.empty(ad * mh * Smax, dtype=DY.dtype)
    Rbuf = np.empty(ad * ah * Smax, dtype=DY.dtype)
    row = np.empty((mw * twc, L), dtype=DY.dtype)
    for it in range(task * items // ntasks, (task + 1) * items // ntasks):
        wc = it % nwc
        r = r0 + it // nwc
        n, rz, ry, rx, tz, ty = _split_row(r, TD, TH, dd, dh, dw)
        tw0 = wc * twc
        ntw = min(twc, TW - tw0)
        S = mw * ntw * L  # one W row, phase-split: sample mw*tw + kw at [kw, tw]
        Y5 = Ybuf[: md * mh * S].reshape(md, mh, mw, ntw, L)
        w0 = rx + dw * tw0 * mw  # as in _output_worker
        nw = max(0, min(mw * ntw, (Wo - 1 - w0) // dw + 1))
        # Gather dy lane by lane (unit-stride loads), then split the phases; zeros
        # beyond the output (partial tiles at the far faces) and in lanes >= no.
        for kz in range(md):
            z = rz + dd * (tz * md + kz)
            for ky in range(mh):
                yy = ry + dh * (ty * mh + ky)
                if z >= Do or yy >= Ho:
                    for kw in range(mw):
                        for tw in range(ntw):
                            for k in range(L):
                                Y5[kz, ky, kw, tw, k] = 0
                    continue
                if nw < mw * ntw or no < L:
                    for q in range(mw * ntw):
                        for k in range(L):
                            row[q, k] = 0
                if cl:
                    for q in range(nw):
                        src = dy[n, z, yy, w0 + dw * q]
                        for k in range(no):
                            row[q, k] = src[o0 + k]
                else:
                    for k in range(no):
                        for q in range(nw):
                            row[q, k] = dy[n, o0 + k, z, yy, w0 + dw * q]
                for kw in range(mw):
                    for tw in range(ntw):
                        for k in range(L):
                            Y5[kz, ky, kw, tw, k] = row[tw * mw + kw, k]
        # A along D (rows kz -> iz), along H (iz*mh + ky -> iz*ah + iy), along W into DY
        T2 = Tbuf[: ad * mh * S].reshape(ad * mh, S)
        R2 = Rbuf[: ad * ah * S].reshape(ad * ah, S)
        Y2 = Ybuf[: md * mh * S].reshape(md, mh * S)
        if pz == ad:
            _a(md, Y2, 0, 0, T2.reshape(ad, mh * S), 0, 0, mh * S)
        else:
            _a_slab(md, Y2, a0, pz, T2.reshape(ad, mh * S), mh * S)
        for iz in range(a0, a0 + pz):
            _a(mh, T2, iz * mh, 0, R2, iz * ah, 0, S)
        R3 = R2.reshape(ad * ah * mw, ntw * L)
        col = ((r - r0) * TW + tw0) * L
        for izy in range(a0 * ah, (a0 + pz) * ah):
            _a(mw, R3, izy * mw, 0, DY2, (izy - a0 * ah) * aw, col, ntw * L)


@compile_once
def _kernels() -> dict:
    """Import numba and compile (or load from the cache) the kernels, once per process."""
    import numba

    # Contraction into FMAs only: no reassociation, NaN/inf semantics kept; each output's
    # arithmetic is fixed by the geometry (bitwise reproducible).
    fm = {"contract"}
    module = globals()
    inline = numba.njit(inline="always", fastmath=fm, cache=True)
    helpers = ("_alpha", "_taps", "_split_row", "_bt4", "_bt2", "_bt", "_at", "_a", "_g", "_gt")
    helpers += ("_combine", "_at_slab", "_a_slab")
    for name in helpers:
        module[name] = inline(module[name])
    jit = numba.njit(nogil=True, fastmath=fm, cache=True)
    return {
        "numba": numba,
        "weight": jit(_weight_worker),
        "input": jit(_input_worker),
        "output": jit(_output_worker),
        "grad": jit(_grad_worker),
        "weight_out": jit(_weight_out_worker),
    }


_run = run_tasks  # see _numba_runtime.py


# ------------------------------------------------------------------------- entry points


#: The forward adds a bias itself, in its output transform.
FUSED_BIAS = True


def forward(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias=None, channels_last: bool = False
) -> np.ndarray:
    """The forward convolution, ``(N, O, Do, Ho, Wo)`` from ``x (N, C, D, H, W)``; with
    ``channels_last``, ``(N, Do, Ho, Wo, O)`` from ``x (N, D, H, W, C)`` (the transforms
    read and write either layout: no transpose)."""
    kernels = _kernels()
    nw = _threads()
    dtype = x.dtype
    plan = _plan(geom, dtype.itemsize, nw)
    if plan is None:  # pragma: no cover - supports() rejects these
        raise ValueError("winograd: the workspace cap cannot hold one tile row")
    O, C = geom.O, geom.C
    x = np.ascontiguousarray(x)
    w3 = np.ascontiguousarray(w.reshape(O, C, geom.taps), dtype=dtype)
    geo_in, geo_out = _geos(geom, plan)
    y = np.empty(layout_shape(geom.out_shape, channels_last), dtype=dtype)
    b = np.zeros(0, dtype=dtype) if bias is None else np.asarray(bias, dtype=dtype).reshape(O)
    Ps, Cp, ob, tb = plan.Ps, plan.Cp, plan.ob, plan.rb * plan.grid[2]
    Ubuf = np.empty(Ps * Cp * ob, dtype=dtype)
    Vbuf = np.empty(Ps * tb * Cp, dtype=dtype)
    Mbuf = np.empty(Ps * tb * ob, dtype=dtype)
    cl = channels_last
    no_bias = b[:0]
    with single_threaded_blas() as split:
        for a0, r0, r1, V, o0, o1 in _block_chunks(plan, kernels, nw, x, geo_in, Vbuf, cl):
            P, nb = V.shape[:2]  # (the slab's points)
            U = Ubuf[: P * Cp * (o1 - o0)].reshape(P, Cp, o1 - o0)
            if not plan.whole or r0 == 0:  # the slab's U once, or each block's chunk again
                _run(kernels["weight"], nw, w3, plan.ms, o0, a0, U)
            M = Mbuf[: P * nb * (o1 - o0)].reshape(P, nb, o1 - o0)
            # P GEMMs (nb x Cp) @ (Cp x Ob): numpy's matmul loops over P in C (the
            # same calls through ctypes, _blas.gemm_batch, measured 8% slower on
            # U-Net enc2's 32 x 64 products), split over the threads (see _gemms).
            _gemms(np.matmul, split, nw, V, U, M)
            # the first slab writes y (with the bias), the others add their share
            bias_or_none = b if a0 == 0 else no_bias
            _run(kernels["output"], nw, M, geo_out, r0, r1, o0, a0, y, bias_or_none, a0 > 0, cl)
    return y


def _block_chunks(plan: _Plan, kernels, nw: int, x, geo_in, Vbuf, channels_last: bool):
    """``(a0, r0, r1, V, o0, o1)`` for every slab of depth points from ``a0``, block of
    tile rows ``[r0, r1)`` and chunk of output channels ``[o0, o1)``, with ``V`` the
    block's transformed input on the slab's points (computed once per slab and block, in
    ``Vbuf``)."""
    Cp, TW = plan.Cp, plan.grid[2]
    ad = _points(plan.ms)[0]
    for a0 in plan.slabs:
        P = plan.P // ad * (min(ad, a0 + plan.pz) - a0)
        for r0 in range(0, plan.rows, plan.rb):
            r1 = min(plan.rows, r0 + plan.rb)
            V = Vbuf[: P * (r1 - r0) * TW * Cp].reshape(P, (r1 - r0) * TW, Cp)
            _run(kernels["input"], nw, x, geo_in, r0, r1, a0, V, channels_last)
            for o0 in range(0, plan.Op, plan.ob):
                yield a0, r0, r1, V, o0, min(plan.Op, o0 + plan.ob)


def _geos(geom: ConvGeometry, plan: _Plan) -> tuple[tuple, tuple]:
    """The geometry tuples of the input-side and output-side transform kernels: tile grid,
    tile sizes, low pads, W tiles per item and dilation."""
    common = (*plan.grid, *plan.ms, *(p[0] for p in geom.pads))
    return (*common, plan.items[0], *geom.dilation), (*common, plan.items[1], *geom.dilation)


def _gemms(mm, split: bool, nw: int, V, U, M, beta: float = 0.0) -> None:
    """``M[p] = V[p] @ U[p] (+ beta M[p])`` for every ``p`` by ``mm`` (``np.matmul``, or
    ``_blas.gemm_batch`` with ``beta``). With ``split`` (BLAS single-threaded, see
    ``_blas.single_threaded_blas``) the stack is divided over the engine's threads: no
    OpenBLAS thread is left spinning into the next transform, and each product is
    computed by one thread whichever runs it (measured: C3D conv3a forward 68 vs 80 ms
    with BLAS's own two threads, U-Net 16^3 48 vs 61)."""

    def share(p0: int, p1: int) -> None:
        if mm is np.matmul:
            mm(V[p0:p1], U[p0:p1], out=M[p0:p1])
        else:
            mm(V[p0:p1], U[p0:p1], M[p0:p1], beta=beta)

    run_shares(share, V.shape[0], nw if split else 1)


def backward_weight(
    x: np.ndarray, dy: np.ndarray, geom: ConvGeometry, channels_last: bool = False
) -> np.ndarray:
    """``dw = (G^T (x) G^T (x) G^T) sum_tiles (A (x) A (x) A) dy_tile * (B^T (x) B^T (x) B^T)
    x_tile`` (see the module docstring), shape ``geom.w_shape``.

    Non-finite data: an Inf/NaN in ``x`` or ``dy`` always makes this ``dw`` non-finite
    (every sample reaches some transformed position with a nonzero coefficient, and the
    sums and G^T keep it), and so does float32 overflow in the transforms; a non-finite
    result is therefore recomputed by the GEMM family, which propagates Inf/NaN exactly
    (``FINITE_ONLY``). Checking the small ``dw`` instead of both inputs saves a pass over
    them (13 ms of 155 on unet3d_enc2).

    With ``channels_last``, ``x`` and ``dy`` are NDHWC (read as they are).
    """
    kernels = _kernels()
    nw = _threads()
    dtype = x.dtype
    plan = _plan_weight(geom, dtype.itemsize, nw)
    if plan is None:  # pragma: no cover - supports() rejects these
        raise ValueError("winograd: the workspace cap cannot hold one tile row")
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=dtype)
    dw = np.empty((geom.O, geom.C, geom.taps), dtype=dtype)
    with single_threaded_blas() as split:
        _weight_blocks(kernels, nw, split, x, dy, dw, plan, *_geos(geom, plan), channels_last)
    if not np.isfinite(dw).all():
        if channels_last:
            x, dy = transpose_channels(x, to_last=False), transpose_channels(dy, to_last=False)
        return _gemm_weight(x, dy, geom)
    return dw.reshape(geom.w_shape)


def _weight_blocks(kernels, nw, split, x, dy, dw, plan: _Plan, geo_in, geo_gr, cl) -> None:
    """The blocked loop of :func:`backward_weight` into ``dw (O, C, taps)``: ``Mw`` whole,
    accumulated over the blocks and transformed once at the end, or per chunk of output
    channels and block, each transformed and added to ``dw`` in turn."""
    Ps, Cp, ob, tb = plan.Ps, plan.Cp, plan.ob, plan.rb * plan.grid[2]
    dtype = dw.dtype
    # Mw (P, X, Y): Y, the lanes of BLAS's m, is the smaller of (C, O) (gemm_nt_acc)
    o_first = Cp <= ob
    Mbuf = np.empty(Ps * Cp * ob, dtype=dtype)
    Vbuf = np.empty(Ps * tb * Cp, dtype=dtype)
    Dbuf = np.empty(Ps * tb * ob, dtype=dtype)
    for a0, r0, r1, V, o0, o1 in _block_chunks(plan, kernels, nw, x, geo_in, Vbuf, cl):
        P, nb = V.shape[:2]  # (the slab's points)
        L = o1 - o0
        X, Y = (L, Cp) if o_first else (Cp, L)
        Mw = Mbuf[: P * X * Y].reshape(P, X, Y)
        DY = Dbuf[: P * nb * L].reshape(P, nb, L)
        _run(kernels["grad"], nw, dy, geo_gr, r0, r1, o0, a0, DY, cl)
        a, b = (V, DY) if o_first else (DY, V)  # a has the Y lanes, b the X lanes
        # Mw[p] (X x Y) (+)= b[p]^T @ a[p]: whole, it accumulates over the slab's blocks
        beta = 1.0 if plan.whole and r0 > 0 else 0.0
        _gemms(gemm_batch, split, nw, b.transpose(0, 2, 1), a, Mw, beta=beta)
        # through G^T into dw: a chunk per block, or the whole slab after its last block;
        # the first writes dw, the others add their share
        if not plan.whole:
            _run(kernels["weight_out"], nw, Mw, plan.ms, o_first, o0, a0, r0 > 0 or a0 > 0, dw)
        elif r1 == plan.rows:
            _run(kernels["weight_out"], nw, Mw, plan.ms, o_first, 0, a0, a0 > 0, dw)


def _gemm_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """The weight gradient of the GEMM family (the engine's pick without Winograd)."""
    from . import ALGORITHMS, _hwunfold_fits, _preferred_gemm, hwunfold

    name = hwunfold.NAME if _hwunfold_fits(geom) else _preferred_gemm(geom)
    return ALGORITHMS[name].backward_weight(x, dy, geom)
