"""Run-time settings of the convolution engine.

Attributes
----------
workspace_bytes : int
    Upper bound on the scratch memory one convolution call may allocate besides its
    input, weight and output (padded input blocks, im2col slabs, transformed tiles).
    Default 256 MiB. Every algorithm plans its slabs under this cap.
algorithm : str or None
    Force one forward algorithm by name (see ``volconv.engine.algorithms()``), or
    ``None`` to let the chooser pick. Meant for tests and benchmarks.
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
>>> volconv.config.workspace_bytes = 64 << 20   # 64 MiB
>>> volconv.config.workspace_bytes = 256 << 20
"""

from __future__ import annotations

workspace_bytes: int = 256 << 20
algorithm: str | None = None
deterministic: bool = False
