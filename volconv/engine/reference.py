"""A float64 direct convolution: the oracle every algorithm is tested against.

Deliberately simple and independent of the fast paths: explicit zero padding,
then one multiply-accumulate per kernel tap, contracted over channels with
``einsum``. Only for tests and validation (it allocates freely).
"""

from __future__ import annotations

import numpy as np

from ._args import ConvGeometry


def conv3d_reference(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """float64 ``conv3d`` of ``x (N, C, D, H, W)`` with grouped ``w (G, Og, Cg, kd, kh, kw)``.

    >>> from volconv.engine._args import conv_geometry
    >>> g = conv_geometry((1, 1, 3, 3, 3), (1, 1, 1, 3, 3, 3), (1, 1, 1), ((0, 0),) * 3,
    ...                   (1, 1, 1), 1)
    >>> y = conv3d_reference(np.ones((1, 1, 3, 3, 3)), np.ones((1, 1, 1, 3, 3, 3)), g)
    >>> float(y[0, 0, 0, 0, 0])
    27.0
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    pad = [(0, 0), (0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in geom.pads]
    xp = np.pad(x, pad)
    # negative padding crops
    crop = tuple(
        slice(-min(lo, 0), xp.shape[2 + i] + min(hi, 0)) for i, (lo, hi) in enumerate(geom.pads)
    )
    xp = xp[(slice(None), slice(None), *crop)]
    N = x.shape[0]
    G, Og, Cg = geom.G, geom.Og, geom.Cg
    Do, Ho, Wo = geom.spatial_out
    sd, sh, sw = geom.stride
    dd, dh, dw = geom.dilation
    xg = xp.reshape(N, G, Cg, *xp.shape[2:])
    out = np.zeros((N, G, Og, Do, Ho, Wo))
    for a in range(geom.kernel[0]):
        for b in range(geom.kernel[1]):
            for c in range(geom.kernel[2]):
                patch = xg[
                    :,
                    :,
                    :,
                    a * dd : a * dd + (Do - 1) * sd + 1 : sd,
                    b * dh : b * dh + (Ho - 1) * sh + 1 : sh,
                    c * dw : c * dw + (Wo - 1) * sw + 1 : sw,
                ]
                out += np.einsum("ngcdhw,goc->ngodhw", patch, w[:, :, :, a, b, c])
    return out.reshape(N, G * Og, Do, Ho, Wo)
