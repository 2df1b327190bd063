"""One process-wide lock around the convolution engine's entry points.

``volconv.functional`` takes :data:`ENGINE_LOCK` around every call into
:mod:`volconv.engine` (forward, input gradient, weight gradient), so at most one
convolution computes at a time; argument checks, dtype conversion, bias and layout
work stay outside the lock. Why serialise:

- **numba initialisation is not thread-safe.** Algorithms compile (or load) their
  kernels lazily on the first call; eight threads making their first depthwise call
  at once made seven of them fail with ``TypeError: A jit decorator was called on an
  already jitted function`` (``tests/test_concurrency.py``). numba's ``workqueue``
  threading layer, the only one guaranteed to exist (no TBB, no OpenMP), is documented
  as not thread-safe: concurrent ``parallel=True`` launches from several Python
  threads terminate the process.
- **BLAS under concurrent callers.** OpenBLAS has returned wrong results when called
  from several Python threads at once (numpy/numpy#11046, #29391, #31618), and a busy
  thread pool can change how a call is split across threads -- which changes the
  summation order, so results would stop being bitwise reproducible (they already
  differ between BLAS thread counts: numpy/numpy#25100).
- **Little to lose.** BLAS and the numba kernels already use every core inside one
  call, so running two convolutions at once mostly makes them compete for the same cores.

Callers that want parallel convolutions across cores should use processes, or one
thread per call and ``OPENBLAS_NUM_THREADS``/``NUMBA_NUM_THREADS`` per process.
"""

from __future__ import annotations

import threading

__all__ = ["ENGINE_LOCK"]

#: Re-entrant, so that an engine function may call another through the public API.
ENGINE_LOCK = threading.RLock()
