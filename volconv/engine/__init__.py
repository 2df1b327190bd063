"""The convolution engine: one forward primitive, its two gradients, and a chooser.

Everything above this package (tensors, modules, autodiff) calls exactly three
functions, all on float32/float64 numpy arrays in NCDHW with the weight in grouped
form ``(G, Og, Cg, kd, kh, kw)`` and a validated :class:`ConvGeometry`:

- :func:`conv3d_forward` -- ``y = x (*) w``;
- :func:`conv3d_backward_input` -- ``dx``, which is also ``conv_transpose3d``;
- :func:`conv3d_backward_weight` -- ``dw``.

Which algorithm computes each is decided in :func:`choose` (one place to look):

=================  =================================================================
name               used for
=================  =================================================================
``depthwise``      grouped layers with <= 16 channels per group (depthwise first of
                   all), with numba: direct loops, both gradients too
``winograd``       dense 3x3x3 and in-plane 1x3x3 stride-1 layers with enough channels,
                   dilated too, with numba: F(4x4x4, 3x3x3) tiles (F(2) on axes of extent <= 2, no
                   transform on a 1-tap axis); the weight gradient too where
                   ``winograd.prefer_weight`` (else the GEMM family)
``fft``            dense stride-1 layers with large kernels (5^3, 7^3) on volumes
                   several times their extent, with numba: overlap-save blocks; the
                   weight gradient only where ``fft.prefer(kind="weight")``
``depthwinograd``  stems, first layers and depth-only (kd, 1, 1) layers (depth stride
                   1, an in-plane reduction ``C*kh*kw >= 27``, planes too large to
                   batch items), with numba: F(4, r) Winograd along depth over the
                   in-plane unfolding (7 depth taps in 13 plane products per 4 output
                   planes, not 28); the stems' gradients too, the others' the GEMM
                   family's
``hwunfold``       other dense layers whose in-plane unfolding gives BLAS a long
                   enough reduction (the first layers' gradients, the
                   1-channel first layer, tiny planes, depth-strided
                   layers): H and W unfolded plane by plane, the depth taps stacked
                   into the GEMMs; with numba its slabs run whole on the engine's
                   threads (unfold + single-threaded GEMMs)
``tapgemm``        dense (groups=1) stride-1 layers with enough channels: one BLAS
                   GEMM per kernel tap on a shifted window, no unfolding
``pointwise``      1x1x1 kernels without padding and depth-only (kd, 1, 1) kernels
                   without in-plane padding (the forward of large planes excepted):
                   GEMMs straight on x and y
``im2col``         everything else: unfolded slabs under the workspace cap, groups
                   as a batched-matmul axis; col2im for strided input gradients
=================  =================================================================

The input gradient has one algorithm of its own, ``polyphase`` (``polyphase.prefer``):
a strided dense layer's ``dx`` phase by phase, each phase a stride-1 correlation of
``dy`` with a sub-kernel, every ``dx`` element written once (no col2im).

Winograd takes dilated stride-1 layers too: its tiles run over the dilation phases
(the outputs ``d*z' + r`` read only the inputs congruent to ``r - lo`` modulo ``d``), so
no phase is copied out.

The input gradient of a stride-1 convolution is itself a stride-1 convolution
(flipped kernel, swapped channels, padding ``d*(k-1) - p``), so it goes back
through :func:`conv3d_forward` and the same chooser.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import config
from . import (
    _autotune,
    _blas,
    depthwinograd,
    depthwise,
    fft,
    hwunfold,
    im2col,
    pointwise,
    polyphase,
    tapgemm,
    winograd,
)
from ._args import ConvGeometry, conv_geometry, dilated_extent
from ._layout import transpose_channels
from ._numba_runtime import engine_threads, run_shares
from ._slabs import parallel_copy

ALGORITHMS = {
    im2col.NAME: im2col,
    tapgemm.NAME: tapgemm,
    depthwise.NAME: depthwise,
    hwunfold.NAME: hwunfold,
    winograd.NAME: winograd,
    pointwise.NAME: pointwise,
    fft.NAME: fft,
    depthwinograd.NAME: depthwinograd,
}

__all__ = [
    "ALGORITHMS",
    "ConvGeometry",
    "add_channel_bias",
    "algorithms",
    "channel_sums",
    "channels_last",
    "choose",
    "conv3d_backward_input",
    "conv3d_backward_weight",
    "conv3d_forward",
    "conv_geometry",
    "ndhwc_backward_input",
    "ndhwc_backward_weight",
    "ndhwc_forward",
]


def algorithms() -> list[str]:
    """Names of the registered forward algorithms."""
    return sorted(ALGORITHMS)


def _supports(name: str, geom: ConvGeometry) -> bool:
    module = ALGORITHMS[name]
    return getattr(module, "supports", lambda g: True)(geom)


def _with(method: str) -> list[str]:
    """Reproducible algorithms that implement ``method`` themselves (autotune candidates)."""
    return [n for n, m in ALGORITHMS.items() if hasattr(m, method) and reproducible(n)]


def reproducible(name: str) -> bool:
    """Whether algorithm ``name`` gives bitwise identical results from call to call.

    For the same inputs, configuration, machine and thread counts. An algorithm module
    that cannot promise this (say, a parallel reduction whose order depends on timing)
    declares ``DETERMINISTIC = False``; every algorithm in volconv today is reproducible
    (``tests/test_determinism.py``).
    """
    return bool(getattr(ALGORITHMS[name], "DETERMINISTIC", True))


def choose(geom: ConvGeometry, dtype: np.dtype) -> str:
    """Name of the algorithm that computes this forward convolution.

    A forced ``volconv.config.algorithm`` wins when it supports the geometry. With
    ``volconv.config.deterministic`` the pick must be :func:`reproducible`; one that is
    not (forced or preferred) is replaced by ``im2col``, whose GEMMs have a fixed order.
    """
    name = _preferred(geom, dtype)
    if config.deterministic and not reproducible(name):
        return im2col.NAME
    return name


def _preferred(geom: ConvGeometry, dtype: np.dtype) -> str:
    """The chooser's pick before the deterministic-mode filter of :func:`choose`."""
    forced = config.algorithm
    if forced is not None:
        if forced not in ALGORITHMS:
            raise ValueError(f"config.algorithm={forced!r} is not one of {algorithms()}")
        if _supports(forced, geom):
            return forced
    # Depthwise / few channels per group: too little work per output for a GEMM.
    if depthwise.supports(geom) and geom.G > 1:
        return depthwise.NAME
    # Dense 3x3x3 / 1x3x3 stride-1 layers with enough channels: 3.4-8x (1x3x3: 4x) fewer
    # multiplications.
    if winograd.prefer(geom, dtype):
        return winograd.NAME
    # Large kernels (5x5x5, 7x7x7) on volumes several times their extent.
    if fft.prefer(geom, dtype):
        return fft.NAME
    # Stems, first layers, depth-only kernels (depth stride 1, large planes): Winograd
    # along depth over the in-plane unfolding, 2x (3 taps) / 2.15x (7 taps) fewer plane
    # products.
    if depthwinograd.prefer(geom, dtype):
        return depthwinograd.NAME
    return _preferred_gemm(geom)


def _preferred_gemm(geom: ConvGeometry) -> str:
    """The GEMM-family pick (also for Winograd's non-finite weight gradients)."""
    # 1x1x1 and (kd, 1, 1) kernels: GEMMs on the arrays themselves, no block copies.
    if pointwise.supports(geom):
        return pointwise.NAME
    kd, kh, kw = geom.kernel
    # In-plane kernels (1, k, k): no depth taps for the unfoldings to reuse, so one long
    # im2col GEMM wins (r2plus1d_spatial fwd/dx/dw 69/77/67 ms against per-tap GEMM's
    # 86/83/71 and the in-plane unfolding's 90/161/72).
    if kd == 1 and kh * kw > 1 and geom.G == 1:
        return im2col.NAME
    # Depth taps stacked into one GEMM beat a GEMM per tap where the unfolding fits and
    # the kernel is not dilated (r2plus1d_temporal 113 vs 168 ms, vnet 126 vs 210;
    # dilated_d2: 312 vs 176, every dilated tap being its own GEMM there).
    if _hwunfold_fits(geom) and geom.dilation == (1, 1, 1):
        return hwunfold.NAME
    # Per-tap GEMM needs K = C large enough for BLAS to run well, and little junk fringe.
    if tapgemm.supports(geom) and geom.C >= 16 and tapgemm.waste(geom) < 1.35:
        return tapgemm.NAME
    if _hwunfold_fits(geom):
        return hwunfold.NAME
    return im2col.NAME


def _hwunfold_fits(geom: ConvGeometry) -> bool:
    """Dense layers whose unfolding gives BLAS a long enough reduction (``kd*C*kh*kw``:
    its GEMMs stack the depth taps), few-channel first layers included (c3d_conv1a
    forward 45 vs 84 ms for im2col, dx 32 vs 58, dw 35 vs 65; unet3d_enc1 37 vs 61,
    24 vs 49, 32 vs 50). With a depth stride only where its slabs run on the engine's
    threads (numba; strided_down_s2 forward 59-63 vs 70-72 ms for im2col, weight
    gradient 63 vs 80); plane by plane, full im2col measured faster (93 vs 139)."""
    long_enough = geom.C * geom.taps >= 27
    if not (hwunfold.supports(geom) and long_enough):
        return False
    return geom.stride[0] == 1 or hwunfold.threaded_columns(geom)  # (float32 sizes)


def conv3d_forward(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias: np.ndarray | None = None
) -> np.ndarray:
    """Forward convolution ``(N, C, D, H, W) -> (N, O, Do, Ho, Wo)``, plus ``bias[o]`` per
    output channel when given (``(O,)``, x's dtype). Algorithms that declare
    ``FUSED_BIAS`` add it while they write the output (the plane is in cache then: a
    separate pass after a BLAS-heavy forward cost 5-7 ms on the first layers, whose
    outputs are 100+ MB); for the others it is one pass after."""
    if geom.N == 0 or geom.O == 0 or geom.C == 0:
        y = np.zeros(geom.out_shape, dtype=x.dtype)
        if bias is not None:
            add_channel_bias(y, bias)
        return y
    finite = None  # computed only if an algorithm that needs finite data comes up

    def allowed(name: str) -> bool:
        nonlocal finite
        if not getattr(ALGORITHMS[name], "FINITE_ONLY", False):
            return True
        if finite is None:
            finite = _all_finite(x) and _all_finite(w)
        return finite

    if _autotune.active():
        names = [n for n in ALGORITHMS if _supports(n, geom) and reproducible(n) and allowed(n)]
        y = _autotune.run(
            "forward", geom, x.dtype, names, lambda n: ALGORITHMS[n].forward(x, w, geom)
        )
        if bias is not None:
            add_channel_bias(y, bias)
        return y
    name = choose(geom, x.dtype)
    if not allowed(name):  # keep IEEE propagation of Inf/NaN exact
        name = _preferred_gemm(geom)
    algorithm = ALGORITHMS[name]
    if bias is None:
        return algorithm.forward(x, w, geom)
    bias = np.ascontiguousarray(bias, dtype=x.dtype).reshape(geom.O)
    if getattr(algorithm, "FUSED_BIAS", False):
        return algorithm.forward(x, w, geom, bias=bias)
    y = algorithm.forward(x, w, geom)
    add_channel_bias(y, bias)
    return y


def _all_finite(a: np.ndarray) -> bool:
    """Whether the data may take a ``FINITE_ONLY`` algorithm. One pass, no temporary: a
    finite sum in the array's own dtype proves every element finite; a non-finite one (an
    Inf/NaN, or an overflow of huge finite values) only sends the call to the GEMM
    family, which is exact either way. (Summing float32 in float64, which never
    overflows, took twice as long: 1.5 against 0.7 ms on vnet's 16 MB.)"""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here
        return bool(np.isfinite(np.add.reduce(a, axis=None)))


def _finite_or(algorithm, fallback, *arrays: np.ndarray):
    """``algorithm``, or ``fallback`` where ``algorithm`` is ``FINITE_ONLY`` and one of
    ``arrays`` holds an Inf/NaN (its transforms would spread them over a tile; the
    GEMM family propagates them exactly)."""
    if getattr(algorithm, "FINITE_ONLY", False) and not all(map(_all_finite, arrays)):
        return fallback
    return algorithm


def transposed_geometry(geom: ConvGeometry) -> ConvGeometry:
    """The stride-1 forward convolution that computes ``dx`` from ``dy``."""
    assert geom.stride == (1, 1, 1)
    pads = []
    for axis in range(3):
        ext = dilated_extent(geom.kernel[axis], geom.dilation[axis])
        lo = ext - 1 - geom.pads[axis][0]
        hi = geom.spatial_in[axis] - 1 + ext - geom.spatial_out[axis] - lo
        pads.append((lo, hi))
    return conv_geometry(
        geom.out_shape,
        (geom.G, geom.Cg, geom.Og, *geom.kernel),
        (1, 1, 1),
        tuple(pads),
        geom.dilation,
        geom.G,
    )


def flip_weight(w: np.ndarray) -> np.ndarray:
    """``(G, Og, Cg, k...)`` -> ``(G, Cg, Og, k reversed)``: the weight of the adjoint
    (copied on the engine's threads: 512 x 512 x 27, 5.5 -> 2.5 ms)."""
    return parallel_copy(w[:, :, :, ::-1, ::-1, ::-1].transpose(0, 2, 1, 3, 4, 5), axis=1)


def conv3d_backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Gradient with respect to the input, shape ``geom.in_shape``."""
    if geom.N == 0 or geom.C == 0 or geom.O == 0:
        return np.zeros(geom.in_shape, dtype=dy.dtype)
    route, own_threads = _input_gradient_route(geom, dy.dtype)
    if route == _ADJOINT:
        return conv3d_forward(dy, flip_weight(w), transposed_geometry(geom))
    if route == _AUTOTUNE:
        finite = _all_finite(dy) and _all_finite(w)
        candidates = {
            n: ALGORITHMS[n]
            for n in _with("backward_input")
            if _supports(n, geom) and (finite or not getattr(ALGORITHMS[n], "FINITE_ONLY", False))
        }
        if polyphase.supports(geom):
            candidates[polyphase.NAME] = polyphase
        return _autotune.run(
            "input",
            geom,
            dy.dtype,
            list(candidates),
            lambda n: candidates[n].backward_input(dy, w, geom),
        )
    algorithm = polyphase if route == polyphase.NAME else ALGORITHMS[route]
    algorithm = _finite_or(algorithm, ALGORITHMS[_preferred_gemm(geom)], dy, w)
    gradient = getattr(algorithm, "backward_input", im2col.backward_input)
    with _blas.own_threads() if own_threads else contextlib.nullcontext():
        return gradient(dy, w, geom)


def _gradient_pick(name: str, geom: ConvGeometry) -> str:
    """The algorithm whose gradients go with forward pick ``name``: the depth-Winograd
    forward has none of its own, its gradients are the GEMM family's (the in-plane
    unfolding's for stems, ``pointwise``'s for depth-only kernels)."""
    return _preferred_gemm(geom) if name == depthwinograd.NAME else name


#: Routes of :func:`_input_gradient_route` besides an algorithm's name.
_ADJOINT, _AUTOTUNE = "forward of the adjoint", "autotune"


def _input_gradient_route(geom: ConvGeometry, dtype) -> tuple[str, bool]:
    """How :func:`conv3d_backward_input` computes ``dx``: ``(_ADJOINT, False)`` (the
    forward convolution of the adjoint, ``transposed_geometry``), ``(_AUTOTUNE, False)``,
    or ``(name, own_threads)``: that algorithm's ``backward_input`` (im2col's where it has
    none), under ``_blas.own_threads`` when ``own_threads``."""
    # Stride 1: dx is a forward convolution (and gets Winograd, depthwise, ...), except
    # when dx has few channels (first layers): that forward would be a GEMM with 1-15
    # outputs per position, while GEMM + col2im keeps the long side in BLAS; and except
    # in-plane (1, k, k) kernels that Winograd does not take, whose col2im measured
    # faster than im2col on the transposed geometry (r2plus1d_spatial 77 vs 115 ms;
    # with Winograd 26 ms).
    # Nor where that forward would be the in-plane unfolding: its own col2im skips the
    # weight flip and measured faster (c3d_conv5a 75 vs 100 ms; 256 channels on 4^3:
    # 9 vs 12).
    kd, kh, kw = geom.kernel
    if geom.stride == (1, 1, 1) and config.algorithm != im2col.NAME and geom.C >= 16:
        adjoint = transposed_geometry(geom)
        in_plane = kd == 1 and kh * kw > 1
        unfolded = (
            config.algorithm is None
            and not _autotune.active()
            and choose(adjoint, dtype) == hwunfold.NAME
        )
        if not unfolded and (not in_plane or winograd.prefer(adjoint, dtype)):
            return _ADJOINT, False
    if _autotune.active():
        return _AUTOTUNE, False
    name = choose(geom, dtype)
    # The stems: the depth transform's own input gradient (I3D 46-47 vs 73-78 ms, R3D
    # 42-44 vs 80-82 for the unfolding's col2im); its other layers take the GEMM family's.
    if name == depthwinograd.NAME and depthwinograd.prefer_input(geom, dtype):
        return name, False
    name = _gradient_pick(name, geom)
    # Strided dense layers (whose forward is a GEMM-family pick) with 16+ channels: phase
    # by phase, no col2im (strided_down_s2 83 vs 115 ms for the in-plane unfolding's
    # col2im; 32 -> 64 channels on 64^3, 40 vs 59; a 1x1x1 stride-2 shortcut 10 vs 19).
    strided_gemm = (
        config.algorithm is None
        and geom.stride != (1, 1, 1)
        and name in (im2col.NAME, hwunfold.NAME)
    )
    if strided_gemm and polyphase.prefer(geom):
        return polyphase.NAME, False
    # Strided dense layers: the in-plane unfolding's col2im beats im2col's
    # (strided_down_s2 dx 120 vs 174 ms).
    if strided_gemm and hwunfold.supports(geom):
        # With a depth stride its weight gradient is im2col on the engine's threads (no
        # unfolding across a depth stride): BLAS threads woken by this dx would spin into
        # it. With the GEMMs split over the engine's threads instead, strided_down_s2 dw
        # + dx in a loop took 159-165 ms against 215-228 (same process).
        return hwunfold.NAME, geom.stride[0] > 1
    return name, False


def conv3d_backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Gradient with respect to the grouped weight, shape ``geom.w_shape``."""
    if geom.N == 0 or geom.C == 0 or geom.O == 0:
        return np.zeros(geom.w_shape, dtype=x.dtype)
    if _autotune.active():
        names = [n for n in _with("backward_weight") if _supports(n, geom)]
        return _autotune.run(
            "weight", geom, x.dtype, names, lambda n: ALGORITHMS[n].backward_weight(x, dy, geom)
        )
    return ALGORITHMS[_weight_gradient_algorithm(geom, x.dtype)].backward_weight(x, dy, geom)


def _weight_gradient_algorithm(geom: ConvGeometry, dtype) -> str:
    """The algorithm whose ``backward_weight`` :func:`conv3d_backward_weight` calls (not
    autotuned)."""
    name = choose(geom, dtype)
    # The stems: the depth transform's own weight gradient (I3D 53-56 vs 74-80 ms, R3D
    # 49-54 vs 78-82 for the unfolding's).
    if name == depthwinograd.NAME and depthwinograd.prefer_weight(geom, dtype):
        return name
    name = _gradient_pick(name, geom)
    # The weight gradient's best GEMM differs from the forward's: the in-plane unfolding
    # won on every dense suite layer where it fits (vnet 276 vs 414 ms for per-tap GEMM,
    # c3d_conv3a 95 vs 137, dilated_d2 162 vs 241).
    # Factorised (1,k,k) / (k,1,1) kernels keep per-tap GEMM (r2plus1d: 55 vs 64 ms).
    kd, kh, kw = geom.kernel
    factorised = kd == 1 or kh * kw == 1
    # Winograd keeps its own F(4, 3) weight gradient where that measured faster
    # (winograd.prefer_weight: c3d_conv3a 61 vs 105 ms, unet3d_enc2 161 vs 263,
    # r2plus1d_spatial 28 vs 50 for im2col).
    if config.algorithm is None and name != depthwise.NAME:
        if name == winograd.NAME and winograd.prefer_weight(geom, dtype):
            pass
        elif factorised:
            name = _preferred_gemm(geom) if name == winograd.NAME else name
        elif fft.prefer(geom, dtype, kind="weight"):
            name = fft.NAME
        elif _hwunfold_fits(geom):
            name = hwunfold.NAME
    return name


def _native_layout(geom: ConvGeometry, dtype) -> str | None:
    """The algorithm that computes this layer's NDHWC form as it is, or None."""
    if config.algorithm in (None, pointwise.NAME) and pointwise.channels_last(geom):
        return pointwise.NAME
    forced = (None, winograd.NAME, depthwise.NAME, hwunfold.NAME, depthwinograd.NAME)
    if config.algorithm in forced and not _autotune.active():
        name = choose(geom, np.dtype(dtype))
        if name == winograd.NAME:
            return name
        if name == depthwise.NAME and depthwise.channels_last(geom):
            return name
        # The unfolding only where both gradients are its own too: it transposes x for
        # the forward and for the weight gradient, which only pays where dy is not
        # transposed as well (strided_down_s2, whose dx is polyphase's and dw im2col's:
        # training step 338-380 ms against 331-342 through NCDHW).
        # (The depth transform reads and writes NDHWC as it lies too; where its gradients
        # are not its own they are the unfolding's.)
        unfolding = _gradient_pick(name, geom)
        input_route = _input_gradient_route(geom, dtype)[0]
        if unfolding == hwunfold.NAME and input_route in (unfolding, name):
            if _weight_gradient_algorithm(geom, dtype) in (unfolding, name):
                return name
    return None


def channels_last(geom: ConvGeometry, dtype=np.float32) -> bool:
    """Whether the engine computes this layer's NDHWC form without a transpose (with
    :func:`ndhwc_forward` and its two gradients):

    - dense stride-1 unpadded 1x1x1 layers: one GEMM on the arrays as they are, and
      depth-only ``(kd, 1, 1)`` ones without in-plane padding: a GEMM per depth tap;
    - layers whose forward is Winograd's (dense 3x3x3 / 1x3x3 stride-1 layers with
      enough channels): its transforms gather and scatter whole channel vectors, so an
      NDHWC sample is read as it lies. Its gradients are NDHWC where they are Winograd's
      too; the others (and non-finite data, see ``FINITE_ONLY``) go through NCDHW
      between transposes, inside these functions;
    - depthwise layers (one channel per group, multiplier 1: X3D's, MobileNet's), any
      stride: the channels are the vector lanes of direct loops. The input gradient of
      a strided one goes through NCDHW between transposes;
    - layers whose forward and both gradients are the in-plane unfolding's (stems and
      first layers): its GEMMs write the output and read ``dy`` as they lie, by
      transposing their operands in BLAS; the unfolding reads ``x``, and its col2im
      writes ``dx``, in NCDHW, so those (the small side of a first layer) are
      transposed.

    Not with an autotuned or forced other algorithm: those layers are computed in NCDHW.
    """
    return _native_layout(geom, dtype) is not None


def _via_ncdhw(fn, *arrays: np.ndarray) -> np.ndarray:
    """``fn`` on the NCDHW forms of NDHWC ``arrays``, its result back in NDHWC."""
    return transpose_channels(fn(*(transpose_channels(a, to_last=False) for a in arrays)), True)


def ndhwc_forward(
    x: np.ndarray, w: np.ndarray, geom: ConvGeometry, bias: np.ndarray | None = None
) -> np.ndarray:
    """:func:`conv3d_forward` on ``x (N, D, H, W, C)``, giving ``(N, Do, Ho, Wo, O)``,
    for a layer with :func:`channels_last`."""
    native = _native_layout(geom, x.dtype)
    if native == pointwise.NAME:
        return pointwise.forward_channels_last(x, w, geom, bias)
    if native == depthwise.NAME:
        return depthwise.forward_channels_last(x, w, geom, bias)
    if native == hwunfold.NAME:
        return hwunfold.forward(x, w, geom, bias=bias, channels_last=True)
    if native == depthwinograd.NAME:
        algorithm = _finite_or(depthwinograd, hwunfold, x, w)
        return algorithm.forward(x, w, geom, bias=bias, channels_last=True)
    if _all_finite(x) and _all_finite(w):
        return winograd.forward(x, w, geom, bias=bias, channels_last=True)
    return _via_ncdhw(lambda xc: conv3d_forward(xc, w, geom, bias), x)


def ndhwc_backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """:func:`conv3d_backward_input` in NDHWC, for a layer with :func:`channels_last`:
    the forward of the adjoint where that is Winograd's (as :func:`conv3d_backward_input`
    takes it: 16+ input channels), the in-plane unfolding's col2im where that is its
    pick."""
    native = _native_layout(geom, dy.dtype)
    if native == pointwise.NAME:
        return pointwise.backward_input_channels_last(dy, w, geom)
    if native == depthwise.NAME:
        if geom.stride != (1, 1, 1):
            return _via_ncdhw(lambda g: conv3d_backward_input(g, w, geom), dy)
        adjoint = transposed_geometry(geom)  # depthwise too, with the flipped kernel
        return depthwise.forward_channels_last(dy, flip_weight(w), adjoint)
    route, own_threads = _input_gradient_route(geom, dy.dtype)
    if route == depthwinograd.NAME:
        algorithm = _finite_or(depthwinograd, hwunfold, dy, w)
        return algorithm.backward_input(dy, w, geom, channels_last=True)
    if route == hwunfold.NAME:
        with _blas.own_threads() if own_threads else contextlib.nullcontext():
            return hwunfold.backward_input(dy, w, geom, channels_last=True)
    if route == _ADJOINT:
        adjoint = transposed_geometry(geom)
        if winograd.prefer(adjoint, dy.dtype) and _all_finite(dy) and _all_finite(w):
            return winograd.forward(dy, flip_weight(w), adjoint, channels_last=True)
    return _via_ncdhw(lambda g: conv3d_backward_input(g, w, geom), dy)


def ndhwc_backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """:func:`conv3d_backward_weight` from NDHWC data, for a layer with
    :func:`channels_last`: Winograd's or the in-plane unfolding's own where
    :func:`conv3d_backward_weight` takes it."""
    native = _native_layout(geom, x.dtype)
    if native == pointwise.NAME:
        return pointwise.backward_weight_channels_last(x, dy, geom)
    if native == depthwise.NAME:
        return depthwise.backward_weight_channels_last(x, dy, geom)
    name = _weight_gradient_algorithm(geom, x.dtype)
    if name == winograd.NAME:
        return winograd.backward_weight(x, dy, geom, channels_last=True)
    if name == depthwinograd.NAME:
        return depthwinograd.backward_weight(x, dy, geom, channels_last=True)
    if name == hwunfold.NAME:
        return hwunfold.backward_weight(x, dy, geom, channels_last=True)
    xc, dyc = transpose_channels(x, to_last=False), transpose_channels(dy, to_last=False)
    return conv3d_backward_weight(xc, dyc, geom)


#: Below this many bytes the bias add and sum stay on the calling thread.
_SPLIT_BYTES = 4 << 20
#: Smallest channel (bytes) for which :func:`channel_sums` sums channels on threads.
_SPLIT_CHANNEL_BYTES = 512 << 10


def add_channel_bias(y: np.ndarray, bias: np.ndarray) -> None:
    """``y[:, o] += bias[o]`` in place for ``y (N, O, D, H, W)``, the channels divided over
    the engine's threads (a pass over the whole output: 6.3 -> 3.5 ms on U-Net enc1's 113
    MB, measured)."""
    O = y.shape[1]
    column = np.asarray(bias, dtype=y.dtype).reshape(O, 1, 1, 1)
    if y.nbytes < _SPLIT_BYTES or O < 2:
        y += column
        return

    def share(lo: int, hi: int) -> None:
        y[:, lo:hi] += column[lo:hi]

    run_shares(share, O, engine_threads())


def channel_sums(g: np.ndarray) -> np.ndarray:
    """``g.sum(axis=(0, 2, 3, 4))`` in ``g``'s dtype (the bias gradient), the channels
    divided over the engine's threads; each channel is one reduction over its own block,
    whichever thread computes it (10 -> 4 ms on U-Net enc1's 113 MB)."""
    O = g.shape[1]
    # numpy's own reduction wins on many small channels (one Python call per channel
    # here): 6x128x16^3 0.5 against 1.5 ms; the split on large ones (1x32x96^3 4 vs 10)
    if g.nbytes < _SPLIT_BYTES or O < 2 or g.nbytes // O < _SPLIT_CHANNEL_BYTES:
        return g.sum(axis=(0, 2, 3, 4), dtype=g.dtype)
    out = np.empty(O, dtype=g.dtype)

    def share(lo: int, hi: int) -> None:
        for o in range(lo, hi):
            out[o] = g[:, o].sum(dtype=g.dtype)

    run_shares(share, O, engine_threads())
    return out
