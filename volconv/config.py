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

Examples
--------
>>> import volconv
>>> volconv.config.workspace_bytes = 16 << 20   # 16 MiB: less memory, smaller GEMMs
>>> volconv.config.workspace_bytes = 64 << 20   # back to the default
"""

from __future__ import annotations

import os

workspace_bytes: int = 64 << 20
algorithm: str | None = None
autotune: bool = os.environ.get("VOLCONV_AUTOTUNE", "") not in ("", "0")
deterministic: bool = False
