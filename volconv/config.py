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
    When True the chooser only picks algorithms whose summation order does not depend
    on timing (all of volconv's do, for a fixed thread count); autotuning is disabled
    so the same shapes always take the same algorithm.

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
