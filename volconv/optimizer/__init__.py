"""Optimizers with MegEngine's semantics: ``volconv.optimizer`` is ``megengine.optimizer``.

>>> import numpy as np, volconv as mge
>>> import volconv.optimizer as optim
>>> from volconv.autodiff import GradManager
>>> w = mge.Parameter(np.array([3.0], dtype=np.float32))
>>> gm = GradManager().attach([w])
>>> opt = optim.SGD([w], lr=0.25)
>>> with gm:
...     gm.backward((w * w).sum())    # d/dw w^2 = 6
>>> opt.step().clear_grad()
>>> w.numpy(), w.grad
(array([1.5], dtype=float32), None)
"""

from .adam import Adam
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["SGD", "Adam", "Optimizer"]
