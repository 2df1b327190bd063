"""The OpInfo-style table of convolution cases that drives forward, backward and error tests.

Each :class:`ConvCase` is one call of ``F.conv3d`` (or ``F.conv_transpose3d`` for
:data:`TRANSPOSE_CASES`). Shapes are small so the float64 reference and the finite
differences stay fast, but they cover odd and 1-wide sizes, kernels 1..7 and
asymmetric ones, stride, padding, dilation, groups (incl. depthwise), bias on/off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from volconv.engine._args import ConvGeometry, conv_geometry, symmetric_pads, triple
from volconv.engine.reference import conv3d_reference


@dataclass(frozen=True)
class ConvCase:
    name: str
    x_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, int, int] | int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    output_padding: object = 0  # transposed convolutions only
    dtypes: tuple = field(default=(np.float32, np.float64))

    @property
    def k(self) -> tuple[int, int, int]:
        return triple(self.kernel, "kernel", 1)

    @property
    def w_shape(self) -> tuple[int, ...]:
        """The MegEngine weight shape (5-D dense, 6-D grouped) of a conv3d."""
        C, O, G = self.x_shape[1], self.out_channels, self.groups
        if G == 1:
            return (O, C, *self.k)
        return (G, O // G, C // G, *self.k)

    @property
    def wt_shape(self) -> tuple[int, ...]:
        """The MegEngine weight shape of a conv_transpose3d (in, out per group)."""
        C, O, G = self.x_shape[1], self.out_channels, self.groups
        if G == 1:
            return (C, O, *self.k)
        return (G, C // G, O // G, *self.k)

    def geometry(self) -> ConvGeometry:
        w6 = self.w_shape if self.groups > 1 else (1, *self.w_shape)
        return conv_geometry(
            self.x_shape,
            w6,
            triple(self.stride, "stride", 1),
            symmetric_pads(triple(self.padding, "padding", 0)),
            triple(self.dilation, "dilation", 1),
            self.groups,
        )

    def kwargs(self) -> dict:
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )

    def arrays(self, seed: int = 0, transpose: bool = False):
        """float64 x, w, b (b None without bias), seeded by the case name."""
        rng = np.random.default_rng(seed + sum(map(ord, self.name)))
        x = rng.standard_normal(self.x_shape)
        w = rng.standard_normal(self.wt_shape if transpose else self.w_shape)
        b = rng.standard_normal((1, self.out_channels, 1, 1, 1)) if self.bias else None
        return x, w, b

    def __str__(self) -> str:
        return self.name


CASES: list[ConvCase] = [
    ConvCase("dense_k3_p1", (2, 3, 6, 6, 6), 4, 3, padding=1),
    ConvCase("k1", (2, 5, 3, 4, 5), 3, 1),
    ConvCase("k2_even", (1, 2, 5, 5, 5), 3, 2),
    ConvCase("k5_p2", (1, 2, 7, 6, 5), 2, 5, padding=2),
    ConvCase("k7_p3_s2", (1, 1, 9, 9, 9), 2, 7, stride=2, padding=3),
    ConvCase("asym_k135", (1, 2, 4, 6, 8), 3, (1, 3, 5), padding=(0, 1, 2)),
    ConvCase("asym_all", (2, 2, 5, 6, 7), 3, (1, 2, 3), (1, 2, 1), (1, 0, 1), (1, 1, 2)),
    ConvCase("stride2", (2, 3, 7, 8, 9), 4, 3, stride=2, padding=1),
    ConvCase("stride3_k2", (1, 2, 8, 7, 6), 2, 2, stride=3),
    ConvCase("stem_s122", (1, 3, 6, 10, 10), 4, (3, 5, 5), (1, 2, 2), (1, 2, 2)),
    ConvCase("dilation2", (1, 2, 8, 8, 8), 3, 3, padding=2, dilation=2),
    ConvCase("dilation_asym", (1, 2, 7, 9, 8), 2, 3, padding=(1, 0, 3), dilation=(1, 3, 2)),
    ConvCase("groups2", (2, 4, 5, 5, 5), 6, 3, padding=1, groups=2),
    ConvCase("groups3_s2", (1, 6, 6, 7, 5), 3, (2, 3, 1), stride=(2, 1, 2), groups=3),
    ConvCase("depthwise", (2, 4, 5, 6, 5), 4, 3, padding=1, groups=4),
    ConvCase("depthwise_mult2_s2", (1, 3, 7, 7, 7), 6, 3, stride=2, padding=1, groups=3),
    ConvCase("depthwise_dil2", (1, 4, 8, 7, 9), 4, 3, padding=2, dilation=2, groups=4),
    ConvCase("cin1_first_layer", (2, 1, 6, 7, 8), 4, 3, padding=1),
    ConvCase("one_wide", (1, 2, 1, 1, 5), 2, (1, 1, 3), padding=(0, 0, 1)),
    ConvCase("kernel_equals_input", (1, 2, 3, 4, 5), 3, (3, 4, 5), bias=False),
    ConvCase("kernel_equals_padded", (1, 2, 3, 4, 5), 3, (5, 6, 7), padding=1),
    ConvCase("no_bias_s2_p0", (2, 3, 6, 6, 6), 2, 3, stride=2, bias=False),
    ConvCase("big_pad", (1, 2, 3, 3, 3), 2, 2, padding=3),
    ConvCase("many_channels", (1, 24, 4, 5, 6), 20, 3, padding=1),
    ConvCase("batch_zero", (0, 2, 4, 4, 4), 3, 3, padding=1),
    ConvCase("out_channels_zero", (1, 2, 4, 4, 4), 0, 3),
]

TRANSPOSE_CASES: list[ConvCase] = [
    ConvCase("t_dense_k3", (2, 3, 4, 4, 4), 2, 3),
    ConvCase("t_stride2_p1", (1, 2, 3, 4, 3), 3, 3, stride=2, padding=1),
    ConvCase("t_up2x2x2", (2, 4, 3, 3, 3), 2, 2, stride=2, bias=False),
    ConvCase("t_outpad", (1, 2, 3, 3, 4), 2, 3, stride=2, padding=1, output_padding=1),
    ConvCase(
        "t_asym",
        (1, 2, 3, 4, 3),
        3,
        (2, 3, 2),
        (1, 2, 3),
        (0, 1, 1),
        (2, 1, 1),
        output_padding=(0, 1, 2),
    ),
    ConvCase("t_groups2", (1, 4, 3, 3, 3), 6, 3, stride=2, padding=1, groups=2, output_padding=1),
    ConvCase("t_depthwise", (1, 3, 4, 4, 4), 3, 3, padding=1, groups=3),
    ConvCase("t_dilated", (1, 2, 4, 3, 4), 2, 3, dilation=2, padding=1),
    ConvCase("t_batch_zero", (0, 2, 3, 3, 3), 2, 3, stride=2),
]


def reference_forward(case: ConvCase, x, w, b) -> np.ndarray:
    """float64 conv3d of the case via the direct reference."""
    geom = case.geometry()
    y = conv3d_reference(x, np.asarray(w, np.float64).reshape(geom.w_shape), geom)
    return y if b is None else y + b


def reference_transpose(case: ConvCase, x, w, b) -> np.ndarray:
    """float64 conv_transpose3d by its definition: scatter every input sample."""
    N, C = case.x_shape[:2]
    G = case.groups
    Cg, Og = C // G, case.out_channels // G
    k = case.k
    s = triple(case.stride, "stride", 1)
    p = triple(case.padding, "padding", 0)
    d = triple(case.dilation, "dilation", 1)
    op = triple(case.output_padding, "output_padding", 0)
    w6 = np.asarray(w, np.float64).reshape(G, Cg, Og, *k)
    full = [(case.x_shape[2 + i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 + op[i] for i in range(3)]
    out = np.zeros((N, G, Og, *full))
    xg = np.asarray(x, np.float64).reshape(N, G, Cg, *case.x_shape[2:])
    D, H, W = case.x_shape[2:]
    for a in range(k[0]):
        for bb in range(k[1]):
            for c in range(k[2]):
                contrib = np.einsum("ngcdhw,gco->ngodhw", xg, w6[:, :, :, a, bb, c])
                out[
                    :,
                    :,
                    :,
                    a * d[0] : a * d[0] + (D - 1) * s[0] + 1 : s[0],
                    bb * d[1] : bb * d[1] + (H - 1) * s[1] + 1 : s[1],
                    c * d[2] : c * d[2] + (W - 1) * s[2] + 1 : s[2],
                ] += contrib
    out = out[:, :, :, p[0] : full[0] - p[0], p[1] : full[1] - p[1], p[2] : full[2] - p[2]]
    out = out.reshape(N, G * Og, *out.shape[3:])
    return out if b is None else out + b


def tolerance(case: ConvCase, dtype, abs_ref: np.ndarray, factor: float = 4.0) -> float:
    """Absolute tolerance ``factor * eps(dtype) * sqrt(K) * max(|x| (*) |w|)``.

    ``K = Cin/groups * kd*kh*kw`` is the reduction length and ``|x| (*) |w|`` (the
    convolution of the absolute values, ``abs_ref``) is the sum of the magnitudes that
    each output's roundings act on; random-walk rounding grows like ``sqrt(K)``.
    """
    k = case.k
    K = max(1, case.x_shape[1] // case.groups * k[0] * k[1] * k[2])
    scale = float(np.abs(abs_ref).max()) if abs_ref.size else 0.0
    return factor * float(np.finfo(dtype).eps) * np.sqrt(K) * max(scale, 1e-30)
