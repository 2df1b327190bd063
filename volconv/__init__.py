"""volconv: MegEngine's Conv3d for NumPy -- forward, backward, fast, bounded memory.

``import volconv as mge`` and ``import volconv.module as M`` run MegEngine 3D
convolution code unchanged.

Layout (API layer above one engine above numpy/BLAS):

- :mod:`volconv.tensor`, :mod:`volconv.autodiff` -- Tensor, Parameter, GradManager
- :mod:`volconv.functional` -- ``conv3d``, ``conv_transpose3d``, activations, losses
- :mod:`volconv.module`, :mod:`volconv.optimizer` -- layers and training
- :mod:`volconv.engine` -- geometry checks, algorithm choice and the kernels
- :mod:`volconv.serialization` -- MegEngine-compatible, code-free checkpoints

>>> import numpy as np
>>> import volconv as mge
>>> import volconv.module as M
>>> m = M.Conv3d(in_channels=3, out_channels=1, kernel_size=3)
>>> inp = mge.tensor(np.arange(0, 384).astype("float32").reshape(2, 3, 4, 4, 4))
>>> m(inp).numpy().shape
(2, 1, 2, 2, 2)
"""

from . import autodiff, config, engine, functional, module, optimizer, random  # noqa: E402,I001  (they build on the names above)
from .serialization import load, save
from .tensor import Parameter, Tensor, tensor

__version__ = "0.1.0"

__all__ = [
    "Parameter",
    "Tensor",
    "autodiff",
    "config",
    "engine",
    "functional",
    "load",
    "module",
    "optimizer",
    "random",
    "save",
    "tensor",
]
