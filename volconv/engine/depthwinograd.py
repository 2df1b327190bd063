"""Winograd along depth over the in-plane unfolding: stems, first layers, depth-only layers.

A stem (I3D's 7x7x7 and R3D's 3x7x7 at stride (1, 2, 2), three input channels) spends
its forward in GEMMs that the in-plane unfolding (``hwunfold``) already runs near the
machine's GEMM peak, and its in-plane stride leaves the plane no fast algorithm; a first
layer (C3D's conv1a, 3 channels) has too few input channels for Winograd's 3-D tiles,
and a depth-only (kd, 1, 1) layer (R(2+1)D's temporal one) has no in-plane taps at all
(its "unfolding" is the plane itself, not copied). All have depth stride 1, and there a
1-D Winograd transform shares multiplications between neighbouring output planes. With
``(*)`` the in-plane (strided, dilated, padded) convolution of a plane -- one GEMM on the
plane's unfolding -- a depth tile of ``m`` output planes from ``z0`` is::

    y[z0 + i] = sum_k W_k (*) x[z0 - lo + k + i]                       (i < m)
              = sum_a AT[i, a] (U_a (*) V_a),    U_a = sum_k G[a, k] W_k,
                                                 V_a = sum_j BT[a, j] x[z0 - lo + j]

F(m, r) -- ``m`` outputs, ``r`` taps -- takes ``alpha = m + r - 1`` plane products where
direct convolution takes ``m * r``. Here ``m = 4``; a kernel deeper than 4 taps is split
into chunks of 4, 3 (or 2) consecutive taps (kernel splitting: each chunk a convolution
of its own, their outputs summed), each by its own F(4, r): 3 taps take 6 products per 4
output planes instead of 12, I3D's 7 taps 7 + 6 = 13 instead of 28. The GEMMs keep
their shape (``O x C*kh*kw`` times the plane's unfolding), so the saving is the whole
product count; the transforms cost little: ``V_a`` combines planes of the few-channel
input (before the unfolding multiplies them by ``kh*kw``), ``U_a`` is computed once per
call from the small weight (in float64, rounded once), and the output combination is one
pass over the products of a chunk.

Measured (2 threads, interleaved fresh processes, forward ms with the bias, against the
unfolding): I3D stem 62-65 -> 43-45, R3D stem 64-67 -> 47-51, C3D conv1a 45-46 -> 36-41;
against ``pointwise``'s per-tap GEMMs, R(2+1)D's depth-only 3x1x1 layer (144 channels:
the "unfolding" is the plane itself) 84-87 -> 60.

The transforms are Toom-Cook's from the points in :data:`POINTS` (0, +-1, 1/2, +-2 and
infinity: every entry of ``AT`` and ``BT`` is exact in binary, checked when they are
built). Error in float32, relative to ``max |x| (*) |w|``: 2-6e-7 against 0.7e-7 for
the direct sum; relative to ``max |y|`` on the suite's layers 0.5-1.4e-6 against
0.2-0.4e-6 for the unfolding (one transform axis only; the tests bound it like every
algorithm's).

Work: a task is one depth tile of one batch item, on the engine's threads with BLAS
single-threaded (as ``hwunfold``'s threaded slabs). For each chunk and each of its
points ``a``, the task forms ``V_a`` (``C`` planes), unfolds it (``hwunfold``'s kernel) and
multiplies, ``M_a = U_a @ unfold(V_a)``, into a buffer of the chunk's products; then
``y[z0 + i] (+)= sum_a AT[i, a] M_a`` (+ the bias, with the first chunk) writes the tile's
output planes in NCDHW or, with ``channels_last``, NDHWC. Points whose input planes all
lie in the depth padding are skipped. A tile's arithmetic is fixed by the geometry, so
no result depends on the thread count.

The input gradient (:func:`backward_input`) is the same transform on the adjoint: along
depth ``dx`` is the stride-1 correlation of the ``dy`` planes with the flipped taps, so
tiles of ``dx`` planes combine ``dy`` planes, each product (the in-plane adjoint's
columns) is folded into ``C`` planes of its own, and ``AT`` combines those. The weight
gradient (:func:`backward_weight`) is the adjoint of the forward's identity: ``Mw_a +=
DY_a @ unfold(V_a)^T`` with ``DY_a`` combining ``dy`` planes by ``A = AT^T``, then ``dw_k
= sum_a G[a, k] Mw_a``. The engine takes both for the stems (:func:`prefer_input`,
:func:`prefer_weight`: long in-plane reductions); elsewhere the gradients are the GEMM
family's (C3D conv1a's the unfolding's, R(2+1)D's temporal layer's ``pointwise``'s).

Non-finite data: a transform mixes the planes of a tile (an Inf becomes NaN in every
output of its tile), so the engine takes the GEMM family for such inputs
(``FINITE_ONLY``), in the forward and in the input gradient.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from .. import config
from . import hwunfold
from ._args import ConvGeometry
from ._blas import gemm_f, single_threaded_blas
from ._layout import layout_shape, transpose_channels
from ._numba_runtime import (
    compile_once,
    engine_threads,
    numba_available,
    run_shares,
    run_tasks,
)

NAME = "depthwinograd"
FINITE_ONLY = True
FUSED_BIAS = True

#: Output planes per depth tile.
TILE = 4
#: Finite interpolation points of F(4, r) per chunk size ``r`` (infinity is the last
#: point of each). r = 3 is the Winograd module's F(4, 3).
POINTS = {
    2: (0.0, 1.0, -1.0, 2.0),
    3: (0.0, 1.0, -1.0, 0.5, -2.0),
    4: (0.0, 1.0, -1.0, 0.5, -2.0, 2.0),
}
#: The transforms' entries are rounded to this grid (all of them are multiples of it) and
#: the Toom-Cook identity is checked to this accuracy after rounding.
_GRID = 4096.0
_IDENTITY_TOL = 1e-12

#: The chooser takes the depth transform where it needs at most this share of the direct
#: plane products per output plane (partial tiles at the far face included): R3D's stem
#: 1.5 / 3 = 0.5, I3D's 3.25 / 7 = 0.46.
MAX_PRODUCT_SHARE = 0.6
#: Shortest in-plane reduction ``C*kh*kw`` (the GEMMs' inner dimension): C3D conv1a's 27
#: (3 channels, 3x3) won, forward 36-39 ms against the unfolding's 42-44; the U-Net's
#: 1-channel first layer (9) lost, 35-36 against 31.
MIN_PLANE_REDUCTION = 27
#: Fewest output channels (the GEMMs' rows): the stems have 64; a layer with a handful
#: (the adjoint of a stem) keeps the unfolding.
MIN_OUTPUT_CHANNELS = 16


def chunks(kd: int) -> list[int]:
    """Depth taps per chunk: 4s, then the rest, never a single tap (7 -> [4, 3], 5 -> [3, 2]).

    Examples
    --------
    >>> chunks(7), chunks(3), chunks(5), chunks(8)
    ([4, 3], [3], [3, 2], [4, 4])
    """
    if kd < 2:
        raise ValueError(f"depth Winograd needs a kernel depth >= 2, got {kd}")
    sizes = []
    while kd > 4:
        take = 3 if kd == 5 else 4  # 5 -> 3 + 2: never leave a single tap
        sizes.append(take)
        kd -= take
    sizes.append(kd)
    return sizes


@functools.cache
def transforms(r: int, m: int = TILE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(AT (m, alpha), G (alpha, r), BT (alpha, alpha))`` of F(m, r), float64, from the
    points :data:`POINTS` ``[r]`` and infinity: ``AT @ ((G @ g) * (BT @ d))`` is the
    correlation ``sum_k g[k] d[i + k]`` (``i < m``) for any ``g`` (r) and ``d`` (alpha).

    ``AT`` and ``G`` are the Vandermonde-type interpolation matrices; ``BT`` solves the
    identity (exactly, then rounded to the binary grid its entries lie on). Built once
    per ``(r, m)``; the arrays are read-only.

    Examples
    --------
    >>> AT, G, BT = transforms(3)
    >>> AT.shape, G.shape, BT.shape
    ((4, 6), (6, 3), (6, 6))
    >>> d, g = np.arange(6.0), np.array([1.0, -2.0, 0.5])
    >>> bool(np.allclose(AT @ ((G @ g) * (BT @ d)), np.correlate(d, g, "valid")))
    True
    """
    points = POINTS[r]
    alpha = len(points) + 1
    if alpha != m + r - 1:
        raise ValueError(f"F({m}, {r}) needs {m + r - 2} finite points, got {len(points)}")
    AT = np.zeros((m, alpha))
    G = np.zeros((alpha, r))
    for j, p in enumerate(points):
        AT[:, j] = p ** np.arange(m)
        G[j] = p ** np.arange(r) / np.prod([p - q for q in points if q != p])
    AT[m - 1, alpha - 1] = G[alpha - 1, r - 1] = 1.0  # the point at infinity
    # sum_a AT[i, a] G[a, k] BT[a, l] = [l == i + k] for all i, k, l: linear in BT
    E = np.einsum("ia,ak->ika", AT, G).reshape(m * r, alpha)
    pairs = [(i, k) for i in range(m) for k in range(r)]
    target = np.array([[float(i + k == n) for n in range(alpha)] for i, k in pairs])
    BT = np.round(np.linalg.lstsq(E, target, rcond=None)[0] * _GRID) / _GRID
    residual = float(np.abs(E @ BT - target).max())
    if residual > _IDENTITY_TOL:  # pragma: no cover - a bad POINTS entry
        raise ValueError(f"F({m}, {r}): the transforms miss the identity by {residual:g}")
    for a in (AT, G, BT):
        a.flags.writeable = False
    return AT, G, BT


def _identity_unfolding(geom: ConvGeometry) -> bool:
    """Whether the in-plane unfolding is the plane itself (a (1, 1) in-plane kernel at
    in-plane stride 1 without in-plane padding: R(2+1)D's temporal layers)."""
    unpadded = geom.pads[1:] == ((0, 0), (0, 0))
    return geom.kernel[1:] == (1, 1) and geom.stride[1:] == (1, 1) and unpadded


class _Plan:
    """The depth chunks of a pass, its tasks and the threads' scratch sizes. ``kind`` is
    ``"forward"`` (tiles of output planes, the products ``O x P``), ``"input"`` (the
    input gradient: tiles of input planes, the products unfolded ``K2 x P`` and folded
    into ``C`` planes) or ``"weight"`` (tiles of output planes in ``partials`` fixed
    groups, each accumulating its own ``Mw (points, O, K2)``)."""

    def __init__(self, geom: ConvGeometry, itemsize: int, threads: int, kind: str):
        kd, kh, kw = geom.kernel
        Do, Ho, Wo = geom.spatial_out
        D, H, W = geom.spatial_in
        self.P = Ho * Wo
        self.K2 = geom.C * kh * kw
        self.ld = hwunfold._leading_dim(self.P, itemsize)
        self.chunks = []  # (first tap, taps, AT, G, BT)
        k0 = 0
        for r in chunks(kd):
            self.chunks.append((k0, r, *transforms(r)))
            k0 += r
        alphas = [AT.shape[1] for _, _, AT, _, _ in self.chunks]
        self.points, self.most = sum(alphas), max(alphas)  # all points, and a chunk's most
        unfolding = 0 if _identity_unfolding(geom) else self.K2 * self.ld
        transformed = self.points * geom.O * self.K2  # U (or the weight gradient's Mw)
        if kind == "forward":  # V_a (C planes), one unfolding, a chunk's products
            per_thread = geom.C * H * W + unfolding + self.most * geom.O * self.P
        elif kind == "input":  # V_a (O planes of dy), one unfolding, a chunk's products folded
            per_thread = geom.O * self.P + self.K2 * self.ld + self.most * geom.C * H * W
        else:  # "weight": V_a, its unfolding, DY_a; Mw per partial sum, then float64
            per_thread = geom.C * H * W + unfolding + geom.O * self.P
        if kind == "weight":
            self.partials = min(WEIGHT_PARTIALS, geom.N * -(-Do // TILE))
            weights = self.partials * transformed + 2 * transformed * 8 // itemsize
        else:  # U, and the two float64 planes it is computed in
            weights = transformed + 2 * geom.O * self.K2 * 8 // itemsize
        self.depth_tiles = -(-(D if kind == "input" else Do) // TILE)
        self.tiles = geom.N * self.depth_tiles  # the tasks: (item, depth tile)
        budget = config.workspace_bytes // itemsize - weights
        self.threads = max(0, min(threads, self.tiles, budget // max(1, per_thread)))
        self.workspace = itemsize * (weights + self.threads * per_thread)

    def tables(self, dtype) -> list:
        """``(k0, first, AT, BT)`` per chunk: its first tap, the index of its first point
        among all points (in ``U`` / ``Mw``), and its transforms in ``dtype``."""
        out, first = [], 0
        for k0, _, AT, _, BT in self.chunks:
            out.append((k0, first, AT.astype(dtype), BT.astype(dtype)))
            first += BT.shape[0]
        return out

    def tile(self, t: int) -> tuple[int, int]:
        """Task ``t``: its batch item and first depth plane."""
        return t // self.depth_tiles, t % self.depth_tiles * TILE


def _plan(
    geom: ConvGeometry, itemsize: int, threads: int | None = None, kind: str = "forward"
) -> _Plan | None:
    """The plan, or None where not even one thread's scratch fits the cap."""
    if min(geom.N, geom.C, geom.O, *geom.spatial_out) == 0:
        return None
    plan = _Plan(geom, itemsize, engine_threads() if threads is None else threads, kind)
    return plan if plan.threads > 0 else None


def _plan_or_raise(geom: ConvGeometry, itemsize: int, kind: str = "forward") -> _Plan:
    """:func:`_plan` on the engine's threads, raising where it is None."""
    plan = _plan(geom, itemsize, kind=kind)
    if plan is None:
        raise ValueError("depthwinograd: the workspace cap cannot hold one thread's scratch")
    return plan


def supports(geom: ConvGeometry) -> bool:
    """Dense kernels with >= 2 depth taps at depth stride and dilation 1 (any in-plane
    stride, dilation and padding), with numba, where one thread's scratch fits the cap
    in the forward and in the input gradient (planned for float64)."""
    return (
        geom.G == 1
        and geom.kernel[0] >= 2
        and geom.stride[0] == 1
        and geom.dilation[0] == 1
        and numba_available()
        and _plan(geom, 8, 1) is not None
        and _plan(geom, 8, 1, "input") is not None
        and _plan(geom, 8, 1, "weight") is not None
    )


def product_share(geom: ConvGeometry) -> float:
    """Plane products per output plane against the direct ``kd`` (partial tiles count
    whole)."""
    Do = geom.spatial_out[0]
    points = sum(r + TILE - 1 for r in chunks(geom.kernel[0]))
    return points * -(-Do // TILE) / (Do * geom.kernel[0])


def prefer(geom: ConvGeometry, dtype) -> bool:
    """Whether the chooser takes the depth transform: a long enough in-plane reduction
    (:data:`MIN_PLANE_REDUCTION`: stems, first layers, depth-only kernels over many
    channels) on planes too large to batch items (``hwunfold._max_batch``), with enough
    output channels, saving enough products (:data:`MAX_PRODUCT_SHARE`) and with both
    threads' scratch under the cap. (R(2+1)D's temporal 3x1x1 layer, 144 -> 64
    channels on 56 x 56 planes, fresh processes with its bias: forward 84-87 -> 60 ms
    against ``pointwise``'s GEMMs, backward 184-192 -> 169-180 with its input gradient
    the adjoint's depth transform too.)"""
    kh, kw = geom.kernel[1:]
    if geom.O < MIN_OUTPUT_CHANNELS or not supports(geom):
        return False
    if geom.C * kh * kw < MIN_PLANE_REDUCTION or hwunfold._max_batch(geom) > 1:
        return False
    plan = _plan(geom, np.dtype(dtype).itemsize)
    return (
        plan is not None
        and plan.threads == min(engine_threads(), plan.tiles)
        and product_share(geom) <= MAX_PRODUCT_SHARE
    )


#: Shortest in-plane reduction for the weight gradient: the stems' 147 won (2 threads, in
#: one process, dw ms against the unfolding's: I3D 53-56 vs 74-80, R3D 49-54 vs 78-82),
#: C3D conv1a's 27 lost (37-38 vs 33-34).
MIN_WEIGHT_REDUCTION = 64
#: Partial sums of the weight gradient: tile ``t`` of ``T`` goes to group ``t * P // T``
#: whatever the thread count, and the groups are summed in order (as ``hwunfold``'s).
WEIGHT_PARTIALS = 8

#: Shortest in-plane reduction for the input gradient (its GEMMs' columns ``C*kh*kw``):
#: the stems' 147 won (2 threads, in one process, dx ms against the unfolding's: I3D
#: 46-47 vs 73-78, R3D 42-44 vs 80-82), C3D conv1a's 27 did not (40 vs 39).
MIN_INPUT_REDUCTION = 64


def prefer_input(geom: ConvGeometry, dtype) -> bool:
    """Whether the engine takes this algorithm's input gradient: where it takes its
    forward (:func:`prefer`) with an in-plane reduction of at least
    :data:`MIN_INPUT_REDUCTION`, and the input gradient's plan runs on all threads."""
    if geom.C * geom.kernel[1] * geom.kernel[2] < MIN_INPUT_REDUCTION:
        return False
    if not prefer(geom, dtype):
        return False
    plan = _plan(geom, np.dtype(dtype).itemsize, kind="input")
    return plan is not None and plan.threads == min(engine_threads(), plan.tiles)


def prefer_weight(geom: ConvGeometry, dtype) -> bool:
    """Whether the engine takes this algorithm's weight gradient: where it takes its
    forward (:func:`prefer`), the in-plane reduction is at least
    :data:`MIN_WEIGHT_REDUCTION` (in-plane taps too) and the plan runs on all threads."""
    kh, kw = geom.kernel[1:]
    # depth-only kernels keep ``pointwise``'s GEMMs on the arrays (R(2+1)D's temporal
    # layer: 87-90 ms against 86-96, even)
    if geom.C * kh * kw < MIN_WEIGHT_REDUCTION or kh * kw == 1:
        return False
    if not prefer(geom, dtype):
        return False
    plan = _plan(geom, np.dtype(dtype).itemsize, kind="weight")
    return plan is not None and plan.threads == min(engine_threads(), plan.tiles)


def workspace_bytes(geom: ConvGeometry, itemsize: int) -> int:
    """Bytes the forward allocates besides its input, weight and output."""
    return _plan_or_raise(geom, itemsize).workspace


# ----------------------------------------------------------------- kernels (numba)


def _depth_point(x4, n, zb, bt, V2):  # pragma: no cover - compiled
    """``V2[c, :] = sum_j bt[j] x4[n, c, zb + j, :]`` over the planes inside the input
    (the others are depth padding); returns whether any term was taken (else ``V2`` is
    left as it was: the point's products are zero)."""
    C, D, HW = x4.shape[1], x4.shape[2], x4.shape[3]
    any_term = False
    for j in range(bt.shape[0]):
        if bt[j] != 0 and 0 <= zb + j < D:
            any_term = True
    if not any_term:
        return False
    for c in range(C):
        dst = V2[c]
        started = False
        for j in range(bt.shape[0]):
            coef = bt[j]
            z = zb + j
            if coef == 0 or z < 0 or z >= D:
                continue
            src = x4[n, c, z]
            if started:
                for k in range(HW):
                    dst[k] += coef * src[k]
            else:
                for k in range(HW):
                    dst[k] = coef * src[k]
                started = True
    return True


def _combine(M, used, AT, y4, n, z0, zz, add, bias, cl):  # pragma: no cover - compiled
    """``y[n, z0 + i] (+)= sum_a AT[i, a] M[a]`` for ``i < zz`` and the points with
    ``used[a]``, plus ``bias`` (when not empty) where the planes are written (``add``
    False). ``M (A, O, P)``; ``y4 (N, O, Do, P)``, or ``(N, Do, P, O)`` with ``cl``. Every
    output sums its terms in the same order (bias, then ``a``) in either layout, so NDHWC
    is exactly the transposed NCDHW result."""
    A, O, P = M.shape
    nb = bias.shape[0]
    if not cl:
        for o in range(O):
            b = bias[o] if nb else 0
            for i in range(zz):
                if not add:
                    dst = y4[n, o, z0 + i]
                    for p in range(P):
                        dst[p] = b
            for a in range(A):
                if not used[a]:
                    continue
                src = M[a, o]
                for i in range(zz):
                    coef = AT[i, a]
                    if coef != 0:
                        dst = y4[n, o, z0 + i]
                        for p in range(P):
                            dst[p] += coef * src[p]
        return
    # channels-last: blocks of positions summed channel-major in ``acc``, then transposed
    # into the output (whose block stays in cache)
    PB = 256
    acc = np.empty((O, PB), dtype=M.dtype)
    for i in range(zz):
        for p0 in range(0, P, PB):
            pb = min(PB, P - p0)
            out = y4[n, z0 + i, p0 : p0 + pb]
            for o in range(O):
                row = acc[o]
                if add:
                    for p in range(pb):
                        row[p] = out[p, o]
                else:
                    b = bias[o] if nb else 0
                    for p in range(pb):
                        row[p] = b
                for a in range(A):
                    coef = AT[i, a]
                    if used[a] and coef != 0:
                        src = M[a, o, p0:]
                        for p in range(pb):
                            row[p] += coef * src[p]
            for p in range(pb):
                dst = out[p]
                for o in range(O):
                    dst[o] = acc[o, p]


@compile_once
def _kernels() -> dict:
    """Compile (or load from numba's cache) the kernels, once per process."""
    import numba

    # fastmath off: every sum keeps the order written here.
    jit = numba.njit(cache=True, fastmath=False, nogil=True)
    return {"point": jit(_depth_point), "combine": jit(_combine)}


# ------------------------------------------------------------------------- forward


def _transformed_weights(w: np.ndarray, geom: ConvGeometry, plan: _Plan, dtype) -> np.ndarray:
    """``U (points, O, C*kh*kw)``: per chunk and point ``a``, ``sum_k G[a, k] w[:, :, k0 +
    k]`` in float64, rounded once (the unfolding's row order ``(c, b, e)``). Point by
    point: the float64 scratch is two ``(O, C*kh*kw)`` planes, not a copy of ``w``."""
    w4 = np.asarray(w).reshape(geom.O, geom.C, geom.kernel[0], -1)
    U = np.empty((plan.points, geom.O, plan.K2), dtype=dtype)
    acc = np.empty((geom.O, geom.C, w4.shape[3]))
    tap = np.empty_like(acc)
    a = 0
    for k0, r, _, G, _ in plan.chunks:
        for row in G:
            acc[...] = 0
            for k in range(r):
                if row[k] != 0:
                    np.multiply(w4[:, :, k0 + k], row[k], out=tap)
                    acc += tap
            U[a] = acc.reshape(geom.O, plan.K2)
            a += 1
    return U


def forward(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias=None, channels_last: bool = False
) -> np.ndarray:
    """The forward convolution, ``(N, O, Do, Ho, Wo)``; with ``channels_last``, ``(N, Do,
    Ho, Wo, O)`` from ``x (N, D, H, W, C)`` (``x`` is transposed in, as the unfolding reads
    NCDHW; the output is written as it lies)."""
    x = hwunfold._input_side(x, channels_last)
    dtype, cl = x.dtype, channels_last
    plan = _plan_or_raise(geom, x.itemsize)  # (supports() rejects geometries it fails)
    kernels = _kernels()
    unfold = hwunfold._kernels()["unfold"]
    O, C, P, K2, ld = geom.O, geom.C, plan.P, plan.K2, plan.ld
    _, H, W = geom.spatial_in
    Do, Ho = geom.spatial_out[:2]
    lo = geom.pads[0][0]
    U = _transformed_weights(w, geom, plan, dtype)
    y = np.empty(layout_shape(geom.out_shape, cl), dtype=dtype)
    y4 = y.reshape(geom.N, Do, P, O) if cl else y.reshape(geom.N, O, Do, P)
    x4 = x.reshape(geom.N, C, geom.spatial_in[0], H * W)
    b = np.zeros(0, dtype=dtype) if bias is None else np.asarray(bias, dtype=dtype).reshape(O)
    geo = hwunfold._geo(geom, 1)
    tables = plan.tables(dtype)
    identity = _identity_unfolding(geom)
    local = threading.local()

    def scratch():
        if not hasattr(local, "V"):
            local.V = np.empty((1, C, 1, H, W), dtype=dtype)
            local.col = np.empty((1, K2, 0 if identity else ld), dtype=dtype)
            local.M = np.empty((plan.most, O, P), dtype=dtype)
        return local.V, local.col, local.M

    def work(task: int, ntasks: int) -> None:
        V, col, Mbuf = scratch()
        V2 = V.reshape(C, H * W)
        for tile in range(task, plan.tiles, ntasks):
            n, z0 = plan.tile(tile)
            zz = min(TILE, Do - z0)
            for ci, (k0, first, AT, BT) in enumerate(tables):
                A = len(BT)
                used = np.zeros(A, dtype=np.bool_)
                for a in range(A):
                    # V_a from the chunk's input planes z0 - lo + k0 + j
                    if not kernels["point"](x4, n, z0 - lo + k0, BT[a], V2):
                        continue
                    used[a] = True
                    if identity:  # a (1, 1) in-plane kernel unfolds nothing: V_a as it is
                        src, lds = V.ctypes.data, P
                    else:
                        unfold(0, 1, V, col, 0, 0, geo, Ho)
                        src, lds = col.ctypes.data, ld
                    # M_a = U_a (O x K2) @ unfold(V_a) (K2 x P)
                    hwunfold._gemm_out(
                        dtype, False, P, O, K2,
                        src, lds,
                        U[first + a].ctypes.data, K2,
                        Mbuf[a].ctypes.data, P,
                        0.0,
                    )  # fmt: skip
                kernels["combine"](Mbuf[:A], used, AT, y4, n, z0, zz, ci > 0, b, cl)

    with single_threaded_blas():
        run_tasks(work, plan.threads)
    return y


def backward_input(
    dy: np.ndarray, w: np.ndarray, geom: ConvGeometry, channels_last: bool = False
) -> np.ndarray:
    """The input gradient, ``(N, C, D, H, W)`` from ``dy (N, O, Do, Ho, Wo)``; with
    ``channels_last``, NDHWC from NDHWC (both read and written as they lie).

    Along depth this is the stride-1 correlation of the ``dy`` planes with the flipped
    taps (low padding ``kd - 1 - lo``), so the same F(4, r) applies to tiles of ``dx``
    planes: ``V_a`` combines ``dy`` planes, ``U'_a`` the flipped taps, and each product
    ``U'_a^T @ V_a`` (``C*kh*kw x P``, the in-plane adjoint's columns) is folded (the
    unfolding's col2im) into ``C`` planes of its own, which ``AT`` then combines into
    the tile's ``dx`` planes: the folds work on the few-channel side of a stem."""
    dtype, cl = dy.dtype, channels_last
    dy = np.ascontiguousarray(dy)
    plan = _plan_or_raise(geom, dy.itemsize, "input")
    kernels = _kernels()
    fold = hwunfold._kernels()["fold"]
    O, C, P, K2, ld = geom.O, geom.C, plan.P, plan.K2, plan.ld
    D, H, W = geom.spatial_in
    Do = geom.spatial_out[0]
    kh, sh, dh = geom.kernel[1], geom.stride[1], geom.dilation[1]
    lo_adj = geom.kernel[0] - 1 - geom.pads[0][0]  # the adjoint's low depth padding
    U = _transformed_weights(w.reshape(geom.w_shape)[..., ::-1, :, :], geom, plan, dtype)
    dx = np.empty(layout_shape(geom.in_shape, cl), dtype=dtype)
    dx4 = dx.reshape(geom.N, D, H * W, C) if cl else dx.reshape(geom.N, C, D, H * W)
    # dy's planes for the depth transform: per channel (NCDHW) or whole (NDHWC)
    dy4 = dy.reshape(geom.N, 1, Do, P * O) if cl else dy.reshape(geom.N, O, Do, P)
    geo = hwunfold._geo(geom, 1)
    band = geom.spatial_out[1] + ((kh - 1) * dh) // sh  # every phase row: one fold step
    tables = plan.tables(dtype)
    no_bias = np.zeros(0, dtype=dtype)
    local = threading.local()

    def scratch():
        if not hasattr(local, "V"):
            local.V = np.empty(O * P, dtype=dtype)
            local.col = np.empty((1, K2, ld), dtype=dtype)
            local.F = np.empty((1, C, plan.most, H, W), dtype=dtype)
        return local.V, local.col, local.F

    def work(task: int, ntasks: int) -> None:
        V, col, F = scratch()
        V2 = V.reshape(dy4.shape[1], -1)
        for tile in range(task, plan.tiles, ntasks):
            n, d0 = plan.tile(tile)
            zz = min(TILE, D - d0)
            for ci, (k0, first, AT, BT) in enumerate(tables):
                A = len(BT)
                used = np.zeros(A, dtype=np.bool_)
                F[0, :, :A] = 0
                for a in range(A):
                    # V_a from the chunk's dy planes d0 - lo_adj + k0 + j
                    if not kernels["point"](dy4, n, d0 - lo_adj + k0, BT[a], V2):
                        continue
                    used[a] = True
                    # columns (K2 x P) = U'_a^T (K2 x O) @ V_a (O x P), then folded
                    gemm_f(
                        dtype, cl, True, P, K2, O,
                        V.ctypes.data, O if cl else P,
                        U[first + a].ctypes.data, K2,
                        col.ctypes.data, ld,
                        0.0,
                    )  # fmt: skip
                    fold(0, 1, F, col, 0, a, geo, band)
                Fa = F[0, :, :A].reshape(C, A, H * W).transpose(1, 0, 2)  # (A, C, H*W)
                kernels["combine"](Fa, used, AT, dx4, n, d0, zz, ci > 0, no_bias, cl)

    with single_threaded_blas():
        run_tasks(work, plan.threads)
    return dx


def backward_weight(
    x: np.ndarray, dy: np.ndarray, geom: ConvGeometry, channels_last: bool = False
) -> np.ndarray:
    """The weight gradient, ``geom.w_shape``; with ``channels_last``, from NDHWC ``x``
    and ``dy`` (``x`` is transposed in, as the unfolding reads NCDHW; ``dy`` is read as
    it lies).

    The adjoint of the forward's identity: per depth tile, chunk and point ``a``,
    ``Mw_a += DY_a @ unfold(V_a)^T`` with ``DY_a = sum_i AT[i, a] dy[z0 + i]`` and
    ``V_a`` the forward's, and at the end ``dw_k = sum_a G[a, k] Mw_a`` (in float64).
    The tiles go to :data:`WEIGHT_PARTIALS` fixed groups, each with its own ``Mw``,
    summed in order. A non-finite result (an Inf/NaN in the data, or a float32
    overflow in a transform) is computed again by the unfolding, which propagates
    Inf/NaN exactly (as Winograd's weight gradient does).
    """
    x = hwunfold._input_side(x, channels_last)
    dtype, cl = x.dtype, channels_last
    dy = np.ascontiguousarray(dy, dtype=dtype)
    plan = _plan_or_raise(geom, x.itemsize, "weight")
    kernels = _kernels()
    unfold = hwunfold._kernels()["unfold"]
    O, C, P, K2, ld = geom.O, geom.C, plan.P, plan.K2, plan.ld
    D, H, W = geom.spatial_in
    Do, Ho = geom.spatial_out[:2]
    lo = geom.pads[0][0]
    x4 = x.reshape(geom.N, C, D, H * W)
    dy4 = dy.reshape(geom.N, 1, Do, P * O) if cl else dy.reshape(geom.N, O, Do, P)
    geo = hwunfold._geo(geom, 1)
    identity = _identity_unfolding(geom)
    # per chunk: its first point, BT, and A (= AT^T: the coefficients of dy's planes)
    tables = [
        (k0, first, BT, np.ascontiguousarray(AT.T)) for k0, first, AT, BT in plan.tables(dtype)
    ]
    Mw = np.zeros((plan.partials, plan.points, O, K2), dtype=dtype)
    local = threading.local()

    def scratch():
        if not hasattr(local, "V"):
            local.V = np.empty((1, C, 1, H, W), dtype=dtype)
            local.col = np.empty((1, K2, 0 if identity else ld), dtype=dtype)
            local.DY = np.empty(O * P, dtype=dtype)
        return local.V, local.col, local.DY

    def work(g0: int, g1: int) -> None:
        V, col, DY = scratch()
        V2, DY2 = V.reshape(C, H * W), DY.reshape(dy4.shape[1], -1)
        for g in range(g0, g1):
            for tile in range(
                g * plan.tiles // plan.partials, (g + 1) * plan.tiles // plan.partials
            ):
                n, z0 = plan.tile(tile)
                for k0, first, BT, A in tables:
                    for a in range(BT.shape[0]):
                        # DY_a from the tile's dy planes z0 + i, V_a as in the forward
                        if not kernels["point"](dy4, n, z0, A[a], DY2):
                            continue
                        if not kernels["point"](x4, n, z0 - lo + k0, BT[a], V2):
                            continue
                        if identity:
                            src, lds = V.ctypes.data, P
                        else:
                            unfold(0, 1, V, col, 0, 0, geo, Ho)
                            src, lds = col.ctypes.data, ld
                        # Mw_a (O x K2) += DY_a (O x P) @ unfold(V_a)^T (P x K2)
                        gemm_f(
                            dtype, True, cl, K2, O, P,
                            src, lds,
                            DY.ctypes.data, O if cl else P,
                            Mw[g, first + a].ctypes.data, K2,
                            1.0,
                        )  # fmt: skip

    with single_threaded_blas():
        run_shares(work, plan.partials, plan.threads)
    dw = np.empty((O, C, geom.kernel[0], K2 // C), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # (non-finite: recomputed below)
        total = Mw.sum(axis=0, dtype=np.float64)  # the groups in order
        for (k0, r, _, G, _), (_, first, _, _) in zip(plan.chunks, tables, strict=True):
            for k in range(r):  # dw_k = sum_a G[a, k] Mw_a
                part = np.tensordot(G[:, k], total[first : first + G.shape[0]], axes=1)
                dw[:, :, k0 + k] = part.reshape(O, C, -1)
        dw = dw.astype(dtype).reshape(geom.w_shape)
    if not np.isfinite(dw).all():
        if cl:  # (x is NCDHW already)
            dy = transpose_channels(dy, to_last=False)
        return hwunfold.backward_weight(x, dy, geom)
    return dw
