"""The global random generator used by parameter initialisation.

``volconv.random.seed(s)`` makes initialisation reproducible (numpy's global seed
has no effect, as in MegEngine). The draws are not bit-identical to MegEngine's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["get_rng", "normal", "seed", "uniform"]

_rng = np.random.default_rng()


def seed(s: int) -> None:
    """Reseed the global generator.

    >>> import volconv
    >>> volconv.random.seed(0); a = volconv.random.normal(size=(2,)).numpy()
    >>> volconv.random.seed(0); b = volconv.random.normal(size=(2,)).numpy()
    >>> bool((a == b).all())
    True
    """
    global _rng
    _rng = np.random.default_rng(int(s))


def get_rng() -> np.random.Generator:
    return _rng


def normal(mean: float = 0.0, std: float = 1.0, size=None):
    """float32 samples from ``Normal(mean, std)`` as a Tensor.

    >>> import volconv
    >>> volconv.random.normal(size=(3,)).dtype
    dtype('float32')
    """
    from .tensor import Tensor

    return Tensor._wrap(np.asarray(_rng.normal(mean, std, size), dtype=np.float32))


def uniform(low: float = 0.0, high: float = 1.0, size=None):
    """float32 samples from ``Uniform(low, high)`` as a Tensor.

    >>> import volconv
    >>> volconv.random.uniform(size=(3,)).shape
    (3,)
    """
    from .tensor import Tensor

    return Tensor._wrap(np.asarray(_rng.uniform(low, high, size), dtype=np.float32))
