"""The convolution engine: one forward primitive, its two gradients, and a chooser.

Everything above this package (tensors, modules, autodiff) calls exactly three
functions, all on float32/float64 numpy arrays in NCDHW with the weight in grouped
form ``(G, Og, Cg, kd, kh, kw)`` and a validated :class:`ConvGeometry`:

- :func:`conv3d_forward` -- ``y = x (*) w``;
- :func:`conv3d_backward_input` -- ``dx``, which is also ``conv_transpose3d``;
- :func:`conv3d_backward_weight` -- ``dw``.

Which algorithm computes each is decided in :func:`choose` (one place to look):

==============  =================================================================
name            used for
==============  =================================================================
``depthwise``   grouped layers with <= 16 channels per group (depthwise first of
                all), with numba: direct loops, both gradients too
``tapgemm``     dense (groups=1) stride-1 layers with enough channels: one BLAS
                GEMM per kernel tap on a shifted window, no unfolding
``im2col``      everything else: unfolded slabs under the workspace cap, groups
                as a batched-matmul axis; col2im for strided input gradients
==============  =================================================================

The input gradient of a stride-1 convolution is itself a stride-1 convolution
(flipped kernel, swapped channels, padding ``d*(k-1) - p``), so it goes back
through :func:`conv3d_forward` and the same chooser.
"""

from __future__ import annotations

import numpy as np

from .. import config
from . import depthwise, hwunfold, im2col, tapgemm
from ._args import ConvGeometry, conv_geometry, dilated_extent

ALGORITHMS = {
    im2col.NAME: im2col,
    tapgemm.NAME: tapgemm,
    depthwise.NAME: depthwise,
    hwunfold.NAME: hwunfold,
}

__all__ = [
    "ALGORITHMS",
    "ConvGeometry",
    "algorithms",
    "choose",
    "conv3d_backward_input",
    "conv3d_backward_weight",
    "conv3d_forward",
    "conv_geometry",
]


def algorithms() -> list[str]:
    """Names of the registered forward algorithms."""
    return sorted(ALGORITHMS)


def _supports(name: str, geom: ConvGeometry) -> bool:
    module = ALGORITHMS[name]
    return getattr(module, "supports", lambda g: True)(geom)


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
    # Per-tap GEMM needs K = C large enough for BLAS to run well, and little junk fringe.
    if tapgemm.supports(geom) and geom.C >= 16 and tapgemm.waste(geom) < 1.35:
        return tapgemm.NAME
    # Dense layers whose in-plane unfolding gives BLAS a long enough reduction.
    if hwunfold.supports(geom) and geom.C * geom.kernel[1] * geom.kernel[2] >= 32:
        return hwunfold.NAME
    return im2col.NAME


def conv3d_forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Forward convolution ``(N, C, D, H, W) -> (N, O, Do, Ho, Wo)``."""
    if geom.N == 0 or geom.O == 0:
        return np.zeros(geom.out_shape, dtype=x.dtype)
    if geom.C == 0:
        return np.zeros(geom.out_shape, dtype=x.dtype)
    return ALGORITHMS[choose(geom, x.dtype)].forward(x, w, geom)


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
    """``(G, Og, Cg, k...)`` -> ``(G, Cg, Og, k reversed)``: the weight of the adjoint."""
    return np.ascontiguousarray(w[:, :, :, ::-1, ::-1, ::-1].transpose(0, 2, 1, 3, 4, 5))


def conv3d_backward_input(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Gradient with respect to the input, shape ``geom.in_shape``."""
    if geom.N == 0 or geom.C == 0 or geom.O == 0:
        return np.zeros(geom.in_shape, dtype=dy.dtype)
    if geom.stride == (1, 1, 1) and config.algorithm != im2col.NAME:
        return conv3d_forward(dy, flip_weight(w), transposed_geometry(geom))
    algorithm = ALGORITHMS[choose(geom, dy.dtype)]
    if hasattr(algorithm, "backward_input"):
        return algorithm.backward_input(dy, w, geom)
    return im2col.backward_input(dy, w, geom)


def conv3d_backward_weight(x: np.ndarray, dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Gradient with respect to the grouped weight, shape ``geom.w_shape``."""
    if geom.N == 0 or geom.C == 0 or geom.O == 0:
        return np.zeros(geom.w_shape, dtype=x.dtype)
    name = choose(geom, x.dtype)
    return ALGORITHMS[name].backward_weight(x, dy, geom)
