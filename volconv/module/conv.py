"""``Conv3d`` and ``ConvTranspose3d`` with MegEngine 1.13's signatures, shapes and init.

Parameter shapes (MegEngine's): ``Conv3d`` weight ``(O, I, kd, kh, kw)``, or
``(G, O/G, I/G, kd, kh, kw)`` when ``groups > 1``; ``ConvTranspose3d`` weight
``(I, O, kd, kh, kw)`` or ``(G, I/G, O/G, kd, kh, kw)``; bias ``(1, O, 1, 1, 1)``.
The weight starts as ``Normal(0, sqrt(1 / fan_in))`` with
``fan_in = in_channels * kd * kh * kw`` (not divided by groups, for both
classes) and the bias as zeros.

Differences from MegEngine (all deliberate):

- Bad arguments raise ``ValueError``/``TypeError`` at construction, naming the
  argument and the numbers (MegEngine: ``AssertionError``, ``ZeroDivisionError``,
  or for ``conv_mode`` a bare ``AssertionError`` deferred to the first forward).
- ``ConvTranspose3d`` stores ``output_padding`` as a 3-tuple and checks
  ``output_padding < stride`` at construction; its ``groups`` work (MegEngine's
  forward fails for ``groups > 1``).
- ``forward`` also accepts a numpy array (MegEngine raises ``TypeError``).

Extensions (keyword-only, defaults keep MegEngine's behaviour): ``padding="same"`` /
``"valid"`` (stored as that string), ``padding_mode`` (``Conv3d``: ``"zeros"``,
``"reflect"``, ``"replicate"``, ``"circular"``; ``ConvTranspose3d``: ``"zeros"`` only)
and ``format="NCDHW" | "NDHWC"`` for the input and output layout. Their defaults are
class attributes, and an instance stores them only when they differ, so that
``vars(m)`` of a default layer is exactly MegEngine's; the repr shows them only then.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..engine._args import conv_mode as _check_conv_mode
from ..engine._args import positive_int, triple
from ..functional import _padding
from ..functional.nn import conv3d, conv_transpose3d
from ..tensor import Parameter, Tensor
from . import init
from .module import Module

__all__ = ["Conv3d", "ConvTranspose3d"]


def _count(value, name: str, minimum: int) -> int:
    """A channel count: a Python int (not a float or bool) ``>= minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    for name, count in (("in_channels", in_channels), ("out_channels", out_channels)):
        if count % groups:
            raise ValueError(
                f"{name} must be divisible by groups, got {name}={count} and groups={groups}"
            )


class _ConvNd(Module):
    """Shared construction, initialisation and repr of the 3D convolution layers."""

    # Extensions beyond MegEngine; set on an instance only when not the default.
    padding_mode = "zeros"
    format = "NCDHW"

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding,
        output_padding,
        dilation,
        groups,
        bias,
        padding_mode="zeros",
        format="NCDHW",
    ) -> None:
        super().__init__()
        groups = positive_int(groups, "groups")
        in_channels = _count(in_channels, "in_channels", 1)
        out_channels = _count(out_channels, "out_channels", 0)
        _check_groups(in_channels, out_channels, groups)
        op = type(self).__name__
        padding_mode = _padding.check_padding_mode(padding_mode, op)
        format = _padding.check_format(format, op)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = triple(kernel_size, "kernel_size", 1)
        self.stride = triple(stride, "stride", 1)
        self.padding = _padding.normalize_padding(padding, self.stride, op)
        self.output_padding = output_padding
        self.dilation = triple(dilation, "dilation", 1)
        self.groups = groups
        self.weight = Parameter(np.zeros(self._infer_weight_shape(), dtype=np.float32))
        self.bias = None
        if bias:
            self.bias = Parameter(np.zeros(self._infer_bias_shape(), dtype=np.float32))
        if padding_mode != _ConvNd.padding_mode:
            self.padding_mode = padding_mode
        if format != _ConvNd.format:
            self.format = format
        self.reset_parameters()

    def _get_fanin(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)

    def _infer_bias_shape(self) -> tuple[int, ...]:
        return (1, self.out_channels, 1, 1, 1)

    def _infer_weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Draw the weight from ``Normal(0, sqrt(1 / fan_in))`` and zero the bias."""
        init.normal_(self.weight, 0.0, math.sqrt(1 / self._get_fanin()))
        if self.bias is not None:
            init.zeros_(self.bias)

    def _module_info_string(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1, 1):
            s += f", stride={self.stride}"
        if isinstance(self.padding, str):
            s += f", padding={self.padding!r}"
        elif self.padding != (0, 0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.format != "NCDHW":
            s += f", format={self.format!r}"
        return s


class Conv3d(_ConvNd):
    r"""3D convolution (cross-correlation) over an ``(N, C, D, H, W)`` input.

    ``out(N_i, C_out_j) = bias(C_out_j) + sum_k weight(C_out_j, k) * input(N_i, k)``
    where ``*`` is the valid 3D cross-correlation. With ``groups == in_channels``
    and ``out_channels == K * in_channels`` this is a depthwise convolution.

    Parameters
    ----------
    in_channels : int
        Number of input channels (>= 1).
    out_channels : int
        Number of output channels (>= 0).
    kernel_size : int or tuple of 3 ints
        Spatial size of the weight (>= 1).
    stride, dilation : int or tuple of 3 ints
        Default 1 (>= 1).
    padding : int, tuple of 3 ints, "same" or "valid"
        Padding on both sides of each spatial axis. Default 0. Extension: ``"same"``
        (stride 1 only; output as large as the input, an odd total's extra element on
        the high side) and ``"valid"`` (no padding), stored as the lower-case string.
    groups : int
        Channel groups; ``in_channels`` and ``out_channels`` must be divisible by
        it. The weight is then ``(groups, out/groups, in/groups, kd, kh, kw)``.
    bias : bool
        Add a learnable bias of shape ``(1, out_channels, 1, 1, 1)``.
    conv_mode : str
        Only ``"cross_correlation"`` (checked here, not at the first forward).
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, keyword-only
        Extension: what the padding holds (PyTorch's names and meaning, see
        :func:`volconv.functional.conv3d`).
    format : {"NCDHW", "NDHWC"}, keyword-only
        Extension: layout of the input and output; the weight keeps its layout.

    Examples
    --------
    >>> import numpy as np
    >>> import volconv as mge, volconv.module as M
    >>> m = M.Conv3d(in_channels=3, out_channels=1, kernel_size=3)
    >>> inp = mge.tensor(np.arange(0, 384).astype("float32").reshape(2, 3, 4, 4, 4))
    >>> oup = m(inp)
    >>> oup.numpy().shape
    (2, 1, 2, 2, 2)
    >>> M.Conv3d(4, 8, 3, padding=1, groups=2, bias=False)
    Conv3d(4, 8, kernel_size=(3, 3, 3), padding=(1, 1, 1), groups=2, bias=False)

    The extensions, shown in the repr only when they are not the default:

    >>> m = M.Conv3d(3, 1, 3, padding="same", padding_mode="reflect", format="NDHWC")
    >>> m
    Conv3d(3, 1, kernel_size=(3, 3, 3), padding='same', padding_mode='reflect', format='NDHWC')
    >>> m(np.ones((2, 4, 4, 4, 3), dtype=np.float32)).shape
    (2, 4, 4, 4, 1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        conv_mode: str = "cross_correlation",
        *,
        padding_mode: str = "zeros",
        format: str = "NCDHW",
    ) -> None:
        _check_conv_mode(conv_mode)
        self.conv_mode = conv_mode
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            0,
            dilation,
            groups,
            bias,
            padding_mode,
            format,
        )

    def _infer_weight_shape(self) -> tuple[int, ...]:
        g, i, o = self.groups, self.in_channels, self.out_channels
        if g == 1:
            return (o, i, *self.kernel_size)
        return (g, o // g, i // g, *self.kernel_size)

    def calc_conv(self, inp, weight, bias) -> Tensor:
        """Run this layer's convolution with the given weight and bias.

        >>> import numpy as np, volconv.module as M
        >>> m = M.Conv3d(1, 1, 2)
        >>> x, w = np.ones((1, 1, 2, 2, 2), np.float32), np.ones((1, 1, 2, 2, 2), np.float32)
        >>> m.calc_conv(x, w, None).numpy()
        array([[[[[8.]]]]], dtype=float32)
        """
        return conv3d(
            inp,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.conv_mode,
            padding_mode=self.padding_mode,
            format=self.format,
        )

    def forward(self, inp) -> Tensor:
        """Convolve ``inp`` (a Tensor or numpy array, ``(N, C, D, H, W)`` or in ``format``)."""
        return self.calc_conv(inp, self.weight, self.bias)


class ConvTranspose3d(_ConvNd):
    r"""Transposed 3D convolution (the gradient of :class:`Conv3d` with respect to its input).

    Output size per axis: ``(in - 1) * stride - 2 * padding + dilation * (k - 1) + 1
    + output_padding``.

    Parameters
    ----------
    in_channels : int
        Number of input channels (>= 1).
    out_channels : int
        Number of output channels (>= 0).
    kernel_size : int or tuple of 3 ints
    stride, dilation : int or tuple of 3 ints
        Default 1.
    padding : int, tuple of 3 ints, "same" or "valid"
        Removed from both sides of each output axis. Default 0. Extension: ``"valid"``
        (0) and ``"same"`` (stride 1 only: the adjoint of ``Conv3d(padding="same")``,
        output as large as the input).
    output_padding : int or tuple of 3 ints
        Extra size on the high side of each axis; ``0 <= output_padding < stride``.
        Stored as a 3-tuple. Never shown in the repr (as in MegEngine).
    groups : int
        Channel groups. The weight is then ``(groups, in/groups, out/groups, kd, kh, kw)``.
    bias : bool
        Add a learnable bias of shape ``(1, out_channels, 1, 1, 1)``.
    padding_mode : {"zeros"}, keyword-only
        Only ``"zeros"`` (as in PyTorch); anything else is a ``ValueError``.
    format : {"NCDHW", "NDHWC"}, keyword-only
        Extension: layout of the input and output; the weight keeps its layout.

    Examples
    --------
    >>> import numpy as np, volconv.module as M
    >>> m = M.ConvTranspose3d(2, 4, 3, stride=2, output_padding=1)
    >>> m(np.ones((1, 2, 3, 3, 3), dtype=np.float32)).shape
    (1, 4, 8, 8, 8)
    >>> m
    ConvTranspose3d(2, 4, kernel_size=(3, 3, 3), stride=(2, 2, 2))
    """

    output_padding = 0  # class attribute, as in MegEngine

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        output_padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        padding_mode: str = "zeros",
        format: str = "NCDHW",
    ) -> None:
        if padding_mode != "zeros":
            _padding.check_padding_mode(padding_mode, "ConvTranspose3d")
            raise ValueError(
                f"ConvTranspose3d supports only padding_mode='zeros' (as in PyTorch), "
                f"got {padding_mode!r}"
            )
        stride_t = triple(stride, "stride", 1)
        output_padding = triple(output_padding, "output_padding", 0)
        if any(op >= s for op, s in zip(output_padding, stride_t, strict=True)):
            raise ValueError(
                "output_padding must be smaller than stride on every axis, got "
                f"output_padding={output_padding} with stride={stride_t}"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            output_padding,
            dilation,
            groups,
            bias,
            padding_mode,
            format,
        )

    def _infer_weight_shape(self) -> tuple[int, ...]:
        g, i, o = self.groups, self.in_channels, self.out_channels
        if g == 1:
            return (i, o, *self.kernel_size)
        return (g, i // g, o // g, *self.kernel_size)

    def forward(self, inp) -> Tensor:
        """Transposed-convolve ``inp`` (a Tensor or numpy array ``(N, C, D, H, W)``)."""
        return conv_transpose3d(
            inp,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups,
            format=self.format,
        )
