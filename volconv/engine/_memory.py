"""Size checks before allocating: a clear MemoryError instead of a giant allocation."""

from __future__ import annotations

import os

import numpy as np


def physical_memory_bytes() -> int:
    """Total physical memory, or 2**62 where the platform cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 62


def check_allocation(shape, dtype, what: str) -> int:
    """Raise ``MemoryError`` if an array of ``shape`` could never fit in this machine's memory.

    The size is computed with Python ints, so it cannot overflow.
    """
    elems = 1
    for n in shape:
        elems *= int(n)
    nbytes = elems * np.dtype(dtype).itemsize
    limit = physical_memory_bytes()
    if nbytes > limit:
        raise MemoryError(
            f"{what} of shape {tuple(shape)} needs {nbytes / 2**30:.1f} GiB, more than this "
            f"machine's {limit / 2**30:.1f} GiB of memory"
        )
    return nbytes
