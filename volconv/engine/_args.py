"""Argument normalisers and the convolution geometry.

Tiny private helpers in the spirit of ``scipy.ndimage._ni_support``: each public
function normalises its arguments here, so that every algorithm sees one
validated :class:`ConvGeometry` and never re-checks anything. Every check raises
one ``ValueError``/``TypeError`` that names the argument and the numbers.
All size arithmetic is done on Python ints (arbitrary precision), never int32.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

Triple = tuple[int, int, int]
Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _as_int(value, name: str) -> int:
    """One integer from an int, numpy integer, bool or an integral float."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise TypeError(f"{name} must contain integers, got {value!r} of type {type(value).__name__}")


def triple(value, name: str, minimum: int) -> Triple:
    """Normalise an int or a length-3 sequence to a tuple of three ints >= ``minimum``.

    >>> triple(3, "kernel_size", 1)
    (3, 3, 3)
    >>> triple((1, 2, 3), "stride", 1)
    (1, 2, 3)
    """
    if isinstance(value, str) or value is None:
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (numbers.Number, np.number)):
        result = (_as_int(value, name),) * 3
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an int or a sequence of 3 ints, got {type(value).__name__}"
            ) from None
        if len(items) != 3:
            raise ValueError(f"{name} must have 3 elements (D, H, W), got {len(items)}: {value!r}")
        result = tuple(_as_int(v, name) for v in items)
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in every dimension, got {result}")
    return result  # type: ignore[return-value]


def positive_int(value, name: str) -> int:
    """An int >= 1 (``groups``)."""
    result = _as_int(value, name)
    if result < 1:
        raise ValueError(f"{name} must be a positive integer, got {result}")
    return result


def conv_mode(value) -> str:
    """MegEngine accepts ``cross_correlation`` in any case; nothing else is implemented."""
    if not isinstance(value, str) or value.lower() != "cross_correlation":
        raise ValueError(f"conv_mode must be 'cross_correlation' (any case), got {value!r}")
    return "cross_correlation"


def symmetric_pads(padding: Triple) -> Pads:
    return tuple((p, p) for p in padding)  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    """Every size a forward convolution needs, validated once.

    The weight is always seen in grouped form ``(G, Og, Cg, kd, kh, kw)``;
    ``pads`` holds ``(low, high)`` zero padding per spatial axis.
    """

    N: int
    C: int
    O: int
    G: int
    spatial_in: Triple
    kernel: Triple
    stride: Triple
    pads: Pads
    dilation: Triple
    spatial_out: Triple

    @property
    def Cg(self) -> int:
        return self.C // self.G

    @property
    def Og(self) -> int:
        return self.O // self.G

    @property
    def taps(self) -> int:
        kd, kh, kw = self.kernel
        return kd * kh * kw

    @property
    def reduction(self) -> int:
        """Length of each output's dot product: Cin/groups * kd*kh*kw."""
        return self.Cg * self.taps

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.N, self.C, *self.spatial_in)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.N, self.O, *self.spatial_out)

    @property
    def w_shape(self) -> tuple[int, ...]:
        return (self.G, self.Og, self.Cg, *self.kernel)

    def flops(self) -> int:
        """Nominal multiply-add flops (2 per MAC), taps on padding included."""
        Do, Ho, Wo = self.spatial_out
        return 2 * self.N * self.O * Do * Ho * Wo * self.reduction


def dilated_extent(k: int, d: int) -> int:
    return d * (k - 1) + 1


def conv_geometry(
    in_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    stride: Triple,
    pads: Pads,
    dilation: Triple,
    groups: int,
    *,
    input_name: str = "inp",
) -> ConvGeometry:
    """Validate a forward convolution and compute its output size.

    ``w_shape`` is the grouped weight shape ``(G, Og, Cg, kd, kh, kw)``.
    """
    N, C = in_shape[0], in_shape[1]
    G, Og, Cg = w_shape[:3]
    kernel = tuple(w_shape[3:])
    if G != groups:
        raise ValueError(f"groups={groups} does not match the weight's {G} groups")
    if Cg * G != C:
        raise ValueError(
            f"channel mismatch: {input_name} has {C} channels but the weight expects "
            f"{Cg * G} (groups={G} x {Cg} per group)"
        )
    out, effective_stride = [], []
    for axis, (size, k, s, (lo, hi), d) in enumerate(
        zip(in_shape[2:], kernel, stride, pads, dilation, strict=True)
    ):
        if size < 1:
            raise ValueError(
                f"{input_name} has size 0 on spatial axis {axis} (shape {tuple(in_shape)}): "
                "a convolution needs at least one sample per spatial axis"
            )
        if k < 1:
            raise ValueError(
                f"the weight has kernel size {k} on spatial axis {axis} (kernel {kernel}): "
                "kernel sizes must be >= 1"
            )
        extent = dilated_extent(k, d)
        padded = size + lo + hi
        # A stride beyond the padded size leaves one output; clamping it changes no result
        # and keeps every algorithm's stride-sized buffers bounded.
        effective_stride.append(min(s, padded))
        if padded < extent:
            raise ValueError(
                f"kernel too large on spatial axis {axis}: {input_name} size {size} + padding "
                f"{lo}+{hi} = {padded} is smaller than the dilated kernel extent {extent} "
                f"(kernel {k}, dilation {d})"
            )
        out.append((padded - extent) // s + 1)
    return ConvGeometry(
        N=N,
        C=C,
        O=G * Og,
        G=G,
        spatial_in=tuple(in_shape[2:]),
        kernel=kernel,
        stride=tuple(effective_stride),
        pads=pads,
        dilation=dilation,
        spatial_out=tuple(out),
    )


def transpose_out_size(size: int, k: int, s: int, lo: int, hi: int, d: int, op: int) -> int:
    """Output length of a transposed convolution along one axis."""
    return (size - 1) * s - lo - hi + dilated_extent(k, d) + op
