"""Out-of-core and distributed 3D convolution of dask arrays and zarr volumes.

:func:`conv3d` convolves a :mod:`dask.array` chunked in space, block by block, and
returns a dask array equal to :func:`volconv.functional.conv3d` of the whole volume
(within float32 rounding: each block is one engine call, so BLAS may sum in another
order). :func:`conv3d_zarr` reads a zarr array and writes the result to a zarr store
with chunks that match the computation's, so that writes need no locks.

How a block is computed
-----------------------
Along each spatial axis output ``i`` is *anchored* at input position ``i*stride``
(its window is ``[i*stride - pad_low, i*stride - pad_low + d*(k-1) + 1)``), and
belongs to the chunk that holds its anchor. A chunk ``[a, b)`` whose size is a
multiple of the stride therefore owns ``(b - a) / stride`` outputs, and for stride
1 with ``padding="same"`` the output chunks are the input chunks. Every block is
extended by an exact halo from its neighbours (:func:`dask.array.map_overlap` with
``boundary="none"``, ``trim=False`` and the output ``chunks`` computed here):

- low side: ``pad_low`` samples;
- high side: ``d*(k-1) - pad_low + 1 - stride`` samples (none if negative),

the exact maxima over the chunks (:func:`halo` gives them). The volume's faces are
never extended by dask; padding exists only there:

- ``padding_mode="zeros"``: each block at a face asks the engine for the zero
  padding that face needs (asymmetric, no copy);
- ``"reflect"``, ``"replicate"``, ``"circular"``: the volume is first padded lazily
  with thin slabs (for ``circular`` the slabs are copies of the opposite face, which
  no single block holds), each slab is merged into the chunk at its face, and the
  blocks are convolved without padding.

Chunks of any size are computed exactly. Sizes that are multiples of the stride (the
last chunk excepted) give regular output chunks; other sizes give irregular ones,
which :func:`conv3d_zarr` rechunks before writing. A chunk smaller than the halo is
merged into its neighbour first (as :func:`dask.array.map_overlap` would). The batch
axis may be chunked; the channel axis must be one chunk (the convolution sums over
it).

Each block calls the numpy engine, which bounds its own scratch memory
(``volconv.config.workspace_bytes``) and runs one convolution per process at a time;
nothing global is set inside the tasks. Under ``distributed`` each worker process
runs its own engine: with several worker processes on one machine, set
``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` so that processes x BLAS threads does not
exceed the cores.

Requires ``dask[array]`` (and ``zarr`` for :func:`conv3d_zarr`, ``distributed`` for a
cluster): ``pip install "volconv[dask]"``. ``import volconv`` does not import dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError(
        'volconv.dask needs dask: pip install "dask[array]" (or "volconv[dask]")'
    ) from exc

from . import engine
from .engine._args import conv_geometry, dilated_extent, positive_int, triple
from .engine._args import conv_mode as _check_conv_mode
from .engine._lock import ENGINE_LOCK
from .engine._memory import check_allocation
from .functional import _padding
from .functional.nn import _as_tensor, _bias_shape, _grouped_weight, resolve_dtypes

__all__ = ["conv3d", "conv3d_zarr", "halo"]


# ---- the per-axis plan --------------------------------------------------------------------
@dataclass(frozen=True)
class _AxisPlan:
    """How one spatial axis is split: per chunk, its outputs and the input it reads."""

    depth: tuple[int, int]  # halo (low, high) that dask adds between chunks
    out_chunks: tuple[int, ...]  # outputs per chunk
    slices: tuple[tuple[int, int], ...]  # input to use, in the overlapped block's coordinates
    pads: tuple[tuple[int, int], ...]  # zero padding the engine adds to that input


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _plan_axis(
    chunks: tuple[int, ...], n_out: int, stride: int, extent: int, zlo: int, shift: int
) -> _AxisPlan:
    """Plan one axis of an array of chunk sizes ``chunks``.

    Output ``i`` reads ``[i*stride - zlo, i*stride - zlo + extent)`` of the array
    (negative or past-the-end positions are the engine's zero padding) and is owned by
    the chunk holding its anchor ``i*stride + shift``. A plan without ``slices`` means
    that some chunk is smaller than the halo.
    """
    n = sum(chunks)
    bounds = np.cumsum((0, *chunks)).tolist()
    m = len(chunks)
    ranges, need = [], []
    for j in range(m):
        lo_i = 0 if j == 0 else _ceil_div(bounds[j] - shift, stride)
        hi_i = n_out if j == m - 1 else _ceil_div(bounds[j + 1] - shift, stride)
        lo_i = min(max(lo_i, 0), n_out)
        hi_i = min(max(hi_i, lo_i), n_out)
        ranges.append((lo_i, hi_i))
        if hi_i > lo_i:
            need.append((lo_i * stride - zlo, (hi_i - 1) * stride - zlo + extent))
        else:
            need.append(None)
    depth_lo = max([bounds[j] - max(r[0], 0) for j, r in enumerate(need) if r and j > 0] or [0])
    depth_hi = max(
        [min(r[1], n) - bounds[j + 1] for j, r in enumerate(need) if r and j < m - 1] or [0]
    )
    depth = (max(depth_lo, 0), max(depth_hi, 0))
    slices, pads = [], []
    if m > 1 and max(depth) > min(chunks):  # dask takes halos from the next chunk only
        return _AxisPlan(depth, (), (), ())
    for j, r in enumerate(need):
        start = bounds[j] - (depth[0] if j > 0 else 0)  # array position of the block's [0]
        stop = bounds[j + 1] + (depth[1] if j < m - 1 else 0)
        if r is None:
            slices.append((0, 0))
            pads.append((0, 0))
            continue
        lo, hi = max(r[0], 0), min(r[1], n)
        pad_lo, pad_hi = lo - r[0], r[1] - hi
        if hi <= lo:  # every window lies in the zero padding: read one sample anyway
            if r[1] <= 0:
                lo, hi = 0, 1
                pad_lo, pad_hi = -r[0], 0
            else:
                lo, hi = n - 1, n
                pad_lo, pad_hi = 0, r[1] - n
        assert start <= lo and hi <= stop, (j, start, stop, lo, hi)
        slices.append((lo - start, hi - start))
        pads.append((pad_lo, pad_hi))
    return _AxisPlan(
        depth=depth,
        out_chunks=tuple(r[1] - r[0] for r in ranges),
        slices=tuple(slices),
        pads=tuple(pads),
    )


def _plan(chunks, n_out, stride, extent, zlo, shift) -> tuple[_AxisPlan, tuple[int, ...]]:
    """:func:`_plan_axis`, merging chunks smaller than the halo into a neighbour first."""
    chunks = tuple(chunks)
    while True:
        plan = _plan_axis(chunks, n_out, stride, extent, zlo, shift)
        if plan.slices:
            return plan, chunks
        chunks = da.overlap.ensure_minimum_chunksize(max(plan.depth), chunks)


def halo(kernel_size, stride=1, padding=0, dilation=1) -> tuple[tuple[int, int], ...]:
    """The ``(low, high)`` halo per spatial axis of a block-wise convolution.

    For chunk sizes that are multiples of the stride: ``low = pad_low`` and
    ``high = max(d*(k-1) - pad_low + 1 - stride, 0)``, where ``pad_low`` is the low
    padding (``padding="same"`` pads ``total // 2`` low).

    Parameters
    ----------
    kernel_size, stride, dilation : int or tuple of 3 ints
    padding : int, tuple of 3 ints, "same" or "valid"

    Returns
    -------
    tuple of 3 (low, high) pairs

    Examples
    --------
    >>> halo(3, padding=1)
    ((1, 1), (1, 1), (1, 1))
    >>> halo((4, 3, 3), padding="same")[0]
    (1, 2)
    >>> halo(3, stride=2, padding=1)
    ((1, 0), (1, 0), (1, 0))
    """
    kernel = triple(kernel_size, "kernel_size", 1)
    stride = triple(stride, "stride", 1)
    dilation = triple(dilation, "dilation", 1)
    pads = _padding.resolve_pads(padding, kernel, stride, dilation, "halo")
    return tuple(
        (lo, max(dilated_extent(k, d) - lo - s, 0))
        for k, s, d, (lo, _) in zip(kernel, stride, dilation, pads, strict=True)
    )


# ---- padding slabs for the non-zero modes ----------------------------------------------
def _pad_faces(x, axis: int, lo: int, hi: int, mode: str):
    """``x`` padded on ``axis`` with ``mode``, the slabs merged into the face chunks."""
    if lo == hi == 0:
        return x
    n = x.shape[axis]
    index = _padding._source_index(n, lo, hi, mode)
    parts = []
    if lo:
        parts.append(da.take(x, index[:lo], axis=axis))
    parts.append(x)
    if hi:
        parts.append(da.take(x, index[lo + n :], axis=axis))
    padded = da.concatenate(parts, axis=axis)
    chunks = list(x.chunks[axis])
    chunks[0] += lo
    chunks[-1] += hi
    return padded.rechunk({axis: tuple(chunks)})


# ---- the block function --------------------------------------------------------------------
def _conv_block(
    block, *, w6, bias, plans, spatial, fmt, stride, dilation, groups, cdt, out_dtype,
    block_id=None,
):  # fmt: skip
    """Convolve one overlapped block (a task; pure, sets nothing global)."""
    index = [block_id[a] for a in spatial]
    counts = [p.out_chunks[j] for p, j in zip(plans, index, strict=True)]
    n = block.shape[0]
    o = w6.shape[0] * w6.shape[1]
    if min(counts) == 0 or n == 0:
        shape = _padding.from_ncdhw(np.empty((n, o, *counts), dtype=out_dtype), fmt).shape
        return np.zeros(shape, dtype=out_dtype)
    view = [slice(None)] * 5
    for a, p, j in zip(spatial, plans, index, strict=True):
        view[a] = slice(*p.slices[j])
    xc = _padding.to_ncdhw(block[tuple(view)], fmt, cdt)
    pads = tuple(p.pads[j] for p, j in zip(plans, index, strict=True))
    geom = conv_geometry(xc.shape, w6.shape, stride, pads, dilation, groups)
    check_allocation(geom.out_shape, cdt, "conv3d block output")
    with ENGINE_LOCK:  # one convolution at a time per process: volconv/engine/_lock.py
        y = engine.conv3d_forward(xc, w6, geom)
    if tuple(counts) != geom.spatial_out:  # a block at a face may compute a few extra
        y = np.ascontiguousarray(y[(slice(None), slice(None), *(slice(0, c) for c in counts))])
    if bias is not None:
        y += bias.astype(cdt, copy=False).reshape(1, o, 1, 1, 1)
    return _padding.from_ncdhw(y, fmt, out_dtype)


# ---- public API ----------------------------------------------------------------------------
def conv3d(
    x,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    conv_mode: str = "cross_correlation",
    *,
    padding_mode: str = "zeros",
    format: str = "NCDHW",
):
    """3D convolution of a dask array chunked in space; the arguments of ``F.conv3d``.

    Parameters
    ----------
    x : dask.array.Array
        ``(N, C, D, H, W)`` (``(N, D, H, W, C)`` with ``format="NDHWC"``), chunked
        along D, H, W and optionally N; the channel axis must be a single chunk.
    weight : Tensor or ndarray
        ``(O, C, kd, kh, kw)``, or ``(G, O/G, C/G, kd, kh, kw)`` with ``groups > 1``.
    bias : Tensor or ndarray, optional
        One value per output channel.
    stride, padding, dilation, groups, conv_mode, padding_mode, format
        As in :func:`volconv.functional.conv3d` (``padding`` may be ``"same"`` or
        ``"valid"``; ``padding_mode`` one of ``zeros``, ``reflect``, ``replicate``,
        ``circular``).

    Returns
    -------
    dask.array.Array
        The lazy result, equal to ``F.conv3d`` of the computed ``x``. Chunk ``[a, b)``
        of an axis owns the outputs anchored at ``a <= i*stride < b``: with chunk sizes
        that are multiples of the stride, output chunks are ``chunk // stride`` (the
        input chunks themselves for stride 1 and ``padding="same"``). The channel axis
        is one chunk.

    Raises
    ------
    TypeError
        If ``x`` is not a dask array.
    ValueError
        If the channel axis is split into chunks, or for any argument error that
        ``F.conv3d`` raises.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> import volconv.dask as vd
    >>> x = da.ones((1, 1, 6, 6, 6), dtype=np.float32, chunks=(1, 1, 3, 3, 3))
    >>> w = np.ones((2, 1, 3, 3, 3), dtype=np.float32)
    >>> y = vd.conv3d(x, w, padding=1)
    >>> y.chunks[2:]
    ((3, 3), (3, 3), (3, 3))
    >>> y.compute()[0, 0, :, 0, 0]
    array([ 8., 12., 12., 12., 12.,  8.], dtype=float32)
    """
    if not isinstance(x, da.Array):
        raise TypeError(
            f"volconv.dask.conv3d needs a dask array, got {type(x).__name__}; wrap numpy "
            "data with dask.array.from_array(x, chunks=...) or use volconv.functional.conv3d"
        )
    w = _as_tensor(weight, "weight")
    b = None if bias is None else _as_tensor(bias, "bias")
    stride = triple(stride, "stride", 1)
    dilation = triple(dilation, "dilation", 1)
    groups = positive_int(groups, "groups")
    _check_conv_mode(conv_mode)
    mode = _padding.check_padding_mode(padding_mode, "conv3d")
    fmt = _padding.check_format(format, "conv3d")
    if x.ndim != 5:
        raise ValueError(f"x must be 5-D ({', '.join(fmt)}), got {x.ndim}-D shape {x.shape}")
    channel = fmt.index("C")
    spatial = tuple(fmt.index(a) for a in "DHW")
    if len(x.chunks[channel]) > 1:
        raise ValueError(
            f"volconv.dask.conv3d: the channel axis (axis {channel}) must be a single chunk, "
            f"got chunks {x.chunks[channel]}; rechunk it with x.rechunk({{{channel}: -1}})"
        )
    w6 = _grouped_weight(w, groups, "weight", "out_channels/groups, in_channels/groups")
    pads = _padding.resolve_pads(padding, w6[3:], stride, dilation, "conv3d")
    out_dtype, cdt = resolve_dtypes(
        ("inp", x.dtype), ("weight", w.dtype), ("bias", None if b is None else b.dtype)
    )
    in_shape = _padding.ncdhw_shape(x.shape, fmt)
    geom = conv_geometry(in_shape, w6, stride, pads, dilation, groups)  # checks everything
    bias_np = None
    if b is not None:
        _bias_shape(b, geom.O)
        bias_np = np.asarray(b._data).reshape(-1)
        bias_np = np.broadcast_to(bias_np, (geom.O,)) if bias_np.size == 1 else bias_np
    _padding.check_pad_fits(geom.spatial_in, pads, mode)

    arr = x
    if mode != "zeros":  # pad the faces lazily; blocks then convolve without padding
        for a, (lo, hi) in zip(spatial, pads, strict=True):
            arr = _pad_faces(arr, a, lo, hi, mode)
    plans, chunks = [], {}
    for axis, a in enumerate(spatial):
        lo = pads[axis][0]
        zlo = lo if mode == "zeros" else 0
        extent = dilated_extent(w6[3 + axis], dilation[axis])
        plan, new = _plan(
            arr.chunks[a], geom.spatial_out[axis], stride[axis], extent, zlo, lo - zlo
        )
        plans.append(plan)
        chunks[a] = new
    arr = arr.rechunk(chunks)  # a no-op unless a chunk was smaller than the halo

    out_chunks = [None] * 5
    out_chunks[0] = arr.chunks[0]
    out_chunks[channel] = (geom.O,)
    for p, a in zip(plans, spatial, strict=True):
        out_chunks[a] = p.out_chunks
    wc = np.ascontiguousarray(np.asarray(w._data, dtype=cdt).reshape(w6))
    # one task holds the weight, so a cluster ships it once per worker, not once per block
    w_task = dask.delayed(wc, pure=True) if wc.nbytes > (1 << 16) else wc
    depth = {a: p.depth for p, a in zip(plans, spatial, strict=True)}
    kwargs = {
        "plans": tuple(plans),
        "spatial": spatial,
        "fmt": fmt,
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "cdt": cdt,
        "out_dtype": out_dtype,
        "w6": w_task,
        "bias": bias_np,
    }
    meta = np.empty((0,) * 5, dtype=out_dtype)
    if all(d == (0, 0) for d in depth.values()):
        return da.map_blocks(_conv_block, arr, chunks=tuple(out_chunks), meta=meta, **kwargs)
    return da.map_overlap(
        _conv_block, arr, depth=depth, boundary="none", trim=False, allow_rechunk=False,
        chunks=tuple(out_chunks), meta=meta, **kwargs,
    )  # fmt: skip


def _regular_size(chunks: tuple[int, ...]) -> int:
    """The chunk size of a regular grid that covers an axis chunked as ``chunks``."""
    inner = chunks[:-1] if len(chunks) > 1 else chunks
    return max(max(inner), 1)


def _zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def _create_zarr(store, shape, chunks, dtype, **kwargs):
    """A new (overwritten) zarr array, through the API of the installed zarr major version.

    zarr 3: ``zarr.create_array(store, ..., overwrite=True, **kwargs)`` (compression with
    ``compressors=``); zarr 2: ``zarr.open_array(store, mode="w", ...)`` (``compressor=``).
    """
    import zarr

    if _zarr_major() >= 3:
        return zarr.create_array(
            store, shape=shape, chunks=chunks, dtype=dtype, overwrite=True, **kwargs
        )
    return zarr.open_array(store, mode="w", shape=shape, chunks=chunks, dtype=dtype, **kwargs)


def _open_zarr(src):
    import zarr

    if isinstance(src, zarr.Array):
        return src
    return zarr.open_array(src, mode="r")


def conv3d_zarr(
    src,
    dst,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    conv_mode: str = "cross_correlation",
    *,
    padding_mode: str = "zeros",
    format: str = "NCDHW",
    chunks=None,
    compute: bool = True,
    **zarr_kwargs,
):
    """Convolve a zarr array into a new zarr array, chunk by chunk, in bounded memory.

    The input is read with :func:`dask.array.from_zarr`, convolved with
    :func:`conv3d`, and stored with :func:`dask.array.store` (no locks: every output
    block is exactly one chunk of ``dst``). It runs on the current dask scheduler: the
    threaded one by default, or a ``distributed.Client`` when one is active.

    Parameters
    ----------
    src : zarr.Array, str, os.PathLike or zarr store
        The input volume, ``(N, C, D, H, W)`` (or ``NDHWC`` with ``format``).
    dst : str, os.PathLike or zarr store
        Where to create the output array (overwritten if it exists).
    weight, bias, stride, padding, dilation, groups, conv_mode, padding_mode, format
        As in :func:`conv3d`.
    chunks : int or tuple of 3 ints, optional
        Spatial (D, H, W) block size of the computation. Default: ``src``'s storage
        chunks. Use multiples of the storage chunks (so that no storage chunk is read
        by two blocks but for halos) and of the stride (so that the output blocks are
        regular). The output array's chunks are the output blocks: ``chunks // stride``
        per axis for stride-multiple chunks, all output channels in one chunk.
    compute : bool
        If False, return a ``dask.delayed.Delayed`` that performs the writes.
    **zarr_kwargs
        Passed on when creating ``dst``: to ``zarr.create_array`` with zarr 3 (for
        example ``compressors=None``), to ``zarr.open_array(mode="w")`` with zarr 2
        (``compressor=None``).

    Returns
    -------
    zarr.Array or dask.delayed.Delayed
        The output array (written), or the delayed writes with ``compute=False``.

    Examples
    --------
    >>> import os, tempfile, numpy as np, zarr
    >>> import volconv.dask as vd
    >>> tmp = tempfile.mkdtemp()
    >>> src = zarr.open_array(os.path.join(tmp, "in.zarr"), mode="w", shape=(1, 1, 8, 8, 8),
    ...                       chunks=(1, 1, 4, 4, 4), dtype="f4")
    >>> src[:] = 1.0
    >>> w = np.ones((2, 1, 3, 3, 3), dtype=np.float32)
    >>> out = vd.conv3d_zarr(src, os.path.join(tmp, "out.zarr"), w, padding=1)
    >>> out.shape, out.chunks, float(out[0, 1, 4, 4, 4])
    ((1, 2, 8, 8, 8), (1, 2, 4, 4, 4), 27.0)
    >>> import shutil; shutil.rmtree(tmp)
    """
    z = _open_zarr(src)
    fmt = _padding.check_format(format, "conv3d")
    if len(z.shape) != 5:
        raise ValueError(f"src must be 5-D ({', '.join(fmt)}), got shape {z.shape}")
    channel = fmt.index("C")
    spatial = tuple(fmt.index(a) for a in "DHW")
    read = list(z.chunks)
    read[channel] = z.shape[channel]
    if chunks is not None:
        for a, c in zip(spatial, triple(chunks, "chunks", 1), strict=True):
            read[a] = c
    x = da.from_zarr(z, chunks=tuple(read))
    y = conv3d(
        x, weight, bias, stride, padding, dilation, groups, conv_mode,
        padding_mode=padding_mode, format=format,
    )  # fmt: skip
    regular = {a: _regular_size(y.chunks[a]) for a in range(5)}
    y = y.rechunk(regular)  # a no-op unless strides or padding made the blocks uneven
    out = _create_zarr(dst, y.shape, y.chunksize, y.dtype, **zarr_kwargs)
    writes = da.store(y, out, lock=False, compute=compute)
    return out if compute else writes
