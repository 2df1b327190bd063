"""Measured algorithm choice, cached per shape (``volconv.config.autotune``).

The chooser's heuristic picks well on most layers but not all: which of per-tap GEMM,
in-plane unfolding or full im2col wins depends on the BLAS, the cache sizes and the
exact shape. With autotuning on, the first call for a (direction, geometry, dtype,
workspace cap) runs every algorithm that supports it twice, on the real operands,
keeps the fastest result (the call returns it: no extra work after tuning) and remembers the winner;
later calls go straight to it. Off by default, and never used in deterministic mode:
a timing-based choice could differ from run to run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .. import config
from ._args import ConvGeometry

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def active() -> bool:
    """True when measured choices are enabled for this call."""
    return bool(config.autotune) and config.algorithm is None and not config.deterministic


def choices() -> dict[tuple, str]:
    """A copy of the cache: ``(direction, geometry, dtype, cap) -> algorithm``."""
    with _lock:
        return dict(_cache)


def clear() -> None:
    """Forget every measured choice."""
    with _lock:
        _cache.clear()


def run(
    direction: str,
    geom: ConvGeometry,
    dtype: np.dtype,
    candidates: Sequence[str],
    compute: Callable[[str], np.ndarray],
) -> np.ndarray:
    """``compute(best)`` for the fastest of ``candidates``, measuring them on first use."""
    key = (direction, geom, np.dtype(dtype).str, config.workspace_bytes)
    with _lock:
        known = _cache.get(key)
    if known is not None:
        return compute(known)
    # Two rounds, best of each: the first also absorbs one-time costs (numba compiling
    # or loading its kernels, first-touch page faults) that later calls never pay.
    best_name, best_time, best_result = None, float("inf"), None
    for _ in range(2):
        for name in candidates:
            start = time.perf_counter()
            result = compute(name)
            elapsed = time.perf_counter() - start
            if elapsed < best_time:
                best_name, best_time, best_result = name, elapsed, result
            del result
    with _lock:
        _cache[key] = best_name
    return best_result
