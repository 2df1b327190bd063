"""Layers: ``import volconv.module as M`` is MegEngine's ``megengine.module`` for 3D CNNs.

>>> import volconv.module as M
>>> M.Conv3d(2, 4, 3)
Conv3d(2, 4, kernel_size=(3, 3, 3))
"""

from . import init
from .activation import ReLU
from .conv import Conv3d, ConvTranspose3d
from .identity import Identity
from .linear import Linear
from .module import Module
from .sequential import Sequential

__all__ = [
    "Conv3d",
    "ConvTranspose3d",
    "Identity",
    "Linear",
    "Module",
    "ReLU",
    "Sequential",
    "init",
]
