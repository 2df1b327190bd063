"""Slab planning and padded input blocks, shared by every algorithm.

An algorithm never pads or unfolds the whole input. It walks the output in
*slabs*: either several whole batch items, or a range of output depth planes of
one item. For each slab it gathers the input window those outputs read into a
zero-padded block, and works on that block. ``plan_slabs`` sizes the slabs so
that the algorithm's scratch memory stays under ``volconv.config.workspace_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ._args import ConvGeometry, dilated_extent
from ._memory import check_allocation
from ._numba_runtime import engine_threads, run_shares


@dataclass(frozen=True)
class Slab:
    n0: int
    n1: int
    d0: int
    d1: int

    @property
    def nb(self) -> int:
        return self.n1 - self.n0

    @property
    def dz(self) -> int:
        return self.d1 - self.d0


def plan_slabs(geom: ConvGeometry, cost: Callable[[int, int], int], cap: int) -> Iterator[Slab]:
    """Yield slabs covering all ``N x Do`` output planes with ``cost(nb, dz) <= cap``.

    ``cost(nb, dz)`` is the scratch bytes for ``nb`` items of ``dz`` planes each.
    A single output plane is the smallest unit; if even that exceeds the cap the
    slab is one plane (the caller's size checks bound that case).
    """
    N = geom.N
    Do = geom.spatial_out[0]
    if N == 0 or Do == 0:
        return
    if cost(1, Do) <= cap:
        nb = max(1, min(N, cap // max(1, cost(1, Do))))
        while nb > 1 and cost(nb, Do) > cap:
            nb -= 1
        for n0 in range(0, N, nb):
            yield Slab(n0, min(N, n0 + nb), 0, Do)
        return
    lo, hi = 1, Do
    while lo < hi:  # largest dz with cost(1, dz) <= cap
        mid = (lo + hi + 1) // 2
        if cost(1, mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    dz = lo
    if cost(1, 1) > cap:
        # The smallest slab is one output plane; refuse it before allocating if it could
        # never fit in memory (it only exceeds the cap on enormous planes).
        check_allocation((cost(1, 1),), np.uint8, "one output plane of convolution scratch")
    for n in range(N):
        for d0 in range(0, Do, dz):
            yield Slab(n, n + 1, d0, min(Do, d0 + dz))


def input_window(geom: ConvGeometry, dz: int, d0: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start (may be negative: padding) and length per axis of the input read by
    output planes ``d0 : d0 + dz``."""
    starts, lengths = [], []
    for axis in range(3):
        k, s, d = geom.kernel[axis], geom.stride[axis], geom.dilation[axis]
        lo = geom.pads[axis][0]
        n_out = dz if axis == 0 else geom.spatial_out[axis]
        first = d0 if axis == 0 else 0
        starts.append(first * s - lo)
        lengths.append((n_out - 1) * s + dilated_extent(k, d))
    return tuple(starts), tuple(lengths)


def _overlap(start: int, length: int, size: int) -> tuple[slice, slice]:
    """Slices (into the array, into the block) of the part of a window inside the array."""
    a0, a1 = max(start, 0), min(start + length, size)
    if a1 <= a0:
        return slice(0, 0), slice(0, 0)
    return slice(a0, a1), slice(a0 - start, a1 - start)


def gather_block(
    x: np.ndarray,
    n0: int,
    n1: int,
    starts: tuple[int, ...],
    lengths: tuple[int, ...],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Copy ``x[n0:n1, :, window]`` into a zero-padded block ``(nb, C, *lengths)``.

    ``out`` may be any array view of that shape (e.g. a channel-major view of a
    flat buffer); it must be zero outside the window's intersection with ``x``.
    """
    if out is None:
        out = np.zeros((n1 - n0, x.shape[1], *lengths), dtype=x.dtype)
    src, dst = [slice(n0, n1), slice(None)], [slice(None), slice(None)]
    for axis in range(3):
        s_src, s_dst = _overlap(starts[axis], lengths[axis], x.shape[2 + axis])
        src.append(s_src)
        dst.append(s_dst)
    out[tuple(dst)] = x[tuple(src)]
    return out


def scatter_block_add(
    dx: np.ndarray, block: np.ndarray, n0: int, n1: int, starts: tuple[int, ...]
) -> None:
    """``dx[n0:n1, :, window] += block`` for the part of the window inside ``dx``."""
    src, dst = [slice(None), slice(None)], [slice(n0, n1), slice(None)]
    for axis in range(3):
        s_dst, s_src = _overlap(starts[axis], block.shape[2 + axis], dx.shape[2 + axis])
        src.append(s_src)
        dst.append(s_dst)
    dx[tuple(dst)] += block[tuple(src)]


#: Copies smaller than this stay on the calling thread (thread hand-off costs ~50 us).
PARALLEL_COPY_BYTES = 1 << 20


def copy_parallel(dst: np.ndarray, src: np.ndarray, axis: int = 0) -> None:
    """``np.copyto(dst, src)`` split along ``axis`` over the engine's threads.

    numpy releases the GIL while it copies, so strided gathers (the im2col unfolding)
    run on both cores: strided_down_s2's 28 MiB slabs take 1.7 ms instead of 3.1."""
    threads = engine_threads()
    n = dst.shape[axis] if dst.ndim else 0
    if threads < 2 or n < 2 or dst.nbytes < PARALLEL_COPY_BYTES:
        np.copyto(dst, src)
        return

    def share(lo: int, hi: int) -> None:
        part = (slice(None),) * axis + (slice(lo, hi),)
        np.copyto(dst[part], src[part])

    run_shares(share, n, threads)


def parallel_copy(src: np.ndarray, axis: int = 0) -> np.ndarray:
    """A new C-contiguous copy of ``src`` (any strided view: a transposed or flipped
    weight), made by :func:`copy_parallel` split along ``axis``."""
    out = np.empty(src.shape, dtype=src.dtype)
    copy_parallel(out, src, axis=axis)
    return out


def tap_windows(block: np.ndarray, geom: ConvGeometry, dz: int) -> np.ndarray:
    """A read/write strided view ``(G, Cg, kd, kh, kw, nb, dz, Ho, Wo)`` of a block.

    Element ``[g, c, a, b, e, n, z, h, w]`` is the input sample that kernel tap
    ``(a, b, e)`` of group ``g``, channel ``c`` meets at output ``(n, z, h, w)``.
    Copying it is im2col; adding into one tap of it is col2im.
    """
    nb, C = block.shape[:2]
    sN, sC, sZ, sH, sW = block.strides
    Cg = geom.Cg
    dd, dh, dw = geom.dilation
    st_d, st_h, st_w = geom.stride
    _, Ho, Wo = geom.spatial_out
    shape = (geom.G, Cg, *geom.kernel, nb, dz, Ho, Wo)
    strides = (sC * Cg, sC, sZ * dd, sH * dh, sW * dw, sN, sZ * st_d, sH * st_h, sW * st_w)
    return np.lib.stride_tricks.as_strided(block, shape, strides, writeable=True)
