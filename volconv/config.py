"""Run-time settings of the convolution engine.

Attributes
----------
workspace_bytes : int
    Upper bound on the scratch memory one convolution call may allocate besides its
    input, weight and output (padded input blocks, im2col slabs, transformed tiles).
    Default 64 MiB: large enough that every GEMM stays efficient, small enough that
    peak memory stays near PyTorch's. Every algorithm plans its slabs under this cap.
algorithm : str or None
    Force one forward algorithm by name (see ``volconv.engine.algorithms()``), or
    ``None`` to let the chooser pick. Meant for tests and benchmarks.
autotune : bool
    When True, the first call for each (direction, shape, dtype, workspace cap) times
    every algorithm that supports it once and caches the fastest
    (``volconv.engine._autotune``); later calls use it. Default False, or True when the
    environment variable ``VOLCONV_AUTOTUNE=1`` is set at import. Ignored in
    deterministic mode and when ``algorithm`` is forced.
deterministic : bool
    When True the chooser only picks algorithms that are bitwise reproducible from call
    to call (``volconv.engine.reproducible``; an algorithm that is not, even when forced
    with ``algorithm``, is replaced by ``im2col``). Default False. Every algorithm in
    volconv is reproducible today, so results are already bitwise identical from call to
    call for the same inputs, configuration, machine, BLAS build and thread counts (also
    under concurrent Python threads: the engine runs one convolution at a time); the
    flag keeps it so as faster, timing-dependent algorithms or autotuning are added.
    Never guaranteed: equal results across BLAS/numba thread counts (numpy/numpy#25100),
    BLAS builds, CPUs, ``workspace_bytes`` values (slabs change the summation order of
    gradients), algorithms, or batch sizes.

Each setting is checked where it is assigned: a value of the wrong type or range raises
``TypeError`` / ``ValueError`` naming the setting and the value.

Examples
--------
>>> import volconv
>>> volconv.config.workspace_bytes = 16 << 20   # 16 MiB: less memory, smaller GEMMs
>>> volconv.config.workspace_bytes = 64 << 20   # back to the default
>>> volconv.config.workspace_bytes = -1
Traceback (most recent call last):
    ...
ValueError: config.workspace_bytes must be >= 0 bytes, got -1
"""

from __future__ import annotations

import numbers
import os
import sys
import types

import numpy as np

workspace_bytes: int = 64 << 20
algorithm: str | None = None
autotune: bool = os.environ.get("VOLCONV_AUTOTUNE", "") not in ("", "0")
deterministic: bool = False


def _check_workspace(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            "config.workspace_bytes must be an int number of bytes (e.g. 16 << 20), "
            f"got {value!r} of type {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"config.workspace_bytes must be >= 0 bytes, got {value}")
    return int(value)


def _check_algorithm(value):
    if value is None:
        return None
    from .engine import algorithms  # (the engine imports this module: no import cycle here)

    if not isinstance(value, str) or value not in algorithms():
        raise ValueError(f"config.algorithm={value!r} is not None or one of {algorithms()}")
    return value


def _flag(name: str):
    def check(value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"config.{name} must be True or False, got {value!r}")
        return bool(value)

    return check


_CHECKS = {
    "workspace_bytes": _check_workspace,
    "algorithm": _check_algorithm,
    "autotune": _flag("autotune"),
    "deterministic": _flag("deterministic"),
}


class _Settings(types.ModuleType):
    """This module's class: a setting is checked where it is assigned, so that a bad
    value raises there, naming the setting and the value, rather than in (or silently
    through) some later convolution."""

    def __setattr__(self, name: str, value) -> None:
        check = _CHECKS.get(name)
        super().__setattr__(name, value if check is None else check(value))


sys.modules[__name__].__class__ = _Settings
