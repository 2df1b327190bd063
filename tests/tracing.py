"""Scratch memory of one call, measured with ``tracemalloc``.

numpy reports its allocations to ``tracemalloc``, so the traced peak during one call
minus what the call must return (its result) is the scratch the call used.
"""

from __future__ import annotations

import tracemalloc


def scratch_bytes(fn, result_bytes: int) -> int:
    """Traced peak bytes of ``fn()`` above the bytes before it, less ``result_bytes``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return peak - result_bytes
