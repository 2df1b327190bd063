"""Functional API: ``volconv.functional`` is MegEngine's ``megengine.functional``.

``F.conv3d is F.nn.conv3d`` and ``F.conv_transpose3d is F.nn.conv_transpose3d``,
as in MegEngine.
"""

from . import nn
from .math import exp, flatten, log, matmul, mean, reshape, sum, transpose
from .nn import conv3d, conv_transpose3d, cross_entropy, linear, log_softmax, relu, softmax

__all__ = [
    "conv3d",
    "conv_transpose3d",
    "cross_entropy",
    "exp",
    "flatten",
    "linear",
    "log",
    "log_softmax",
    "matmul",
    "mean",
    "nn",
    "relu",
    "reshape",
    "softmax",
    "sum",
    "transpose",
]
