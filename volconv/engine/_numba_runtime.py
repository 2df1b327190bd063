"""Shared runtime of the numba kernels (depthwise, Winograd, FFT, the in-plane unfolding):
the availability probe, compile-once, the engine's thread count and its one parallel-for.

``compile_once`` wraps each algorithm's ``_kernels()`` (import numba, wrap the kernels)
so that it runs once per process, under a lock.

``numba_available()`` imports numba on the first call that needs it, not at import of
volconv (``import numba`` alone takes ~0.4 s); a numba too old for the installed numpy
raises on import and counts as absent, so the chooser falls back to the GEMM algorithms.

``run_tasks(kernel, nw, *args)`` calls ``kernel(task, ntasks, *args)`` for every task
on ``nw`` threads (the calling thread works too), the threads taking tasks from a
shared counter. Task ``t`` of ``ntasks`` does work items ``t, t + ntasks, ...``; each
kernel computes every output element inside one work item in an order fixed by the
geometry, so which thread runs which task never changes a bit of the result.

Plain threads over ``nogil`` kernels rather than numba's ``parallel=True``/``prange``:
the same speed, half the first-call JIT time (the parfor pipeline doubled it), no
OpenMP threads spin-waiting against OpenBLAS for the cores between the transforms and
the GEMMs, and safe to call from several Python threads at once.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_HAVE_NUMBA: bool | None = None


def numba_available() -> bool:
    """Whether numba imports (tried once, on first use)."""
    global _HAVE_NUMBA
    if _HAVE_NUMBA is None:
        try:  # a numba too old for this numpy raises ImportError: treat it as absent
            import numba  # noqa: F401
        except Exception:
            _HAVE_NUMBA = False
        else:
            _HAVE_NUMBA = True
    return _HAVE_NUMBA


def compile_once(build):
    """Decorator: ``build()`` (import numba, wrap the kernels) runs once per process and
    its result is kept; two first calls at once wait for one build (the builds rebind
    module globals, which must not happen twice)."""
    lock = threading.Lock()
    built: list = []

    @functools.wraps(build)
    def kernels():
        with lock:
            if not built:
                built.append(build())
        return built[0]

    return kernels


def engine_threads() -> int:
    """Threads of the engine's own parallel work (transforms, products, copies): numba's
    count where numba is present (``NUMBA_NUM_THREADS`` / ``numba.set_num_threads`` set
    it for all of them), else every CPU."""
    if numba_available():
        import numba

        return int(numba.get_num_threads())
    return os.cpu_count() or 1


#: Tasks per thread. More than one lets a thread that the OS preempts (a busy machine)
#: hand its remaining tasks to the other; 1 is a static split.
TASKS_PER_THREAD = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
#: ``in_task`` is True while this thread runs a task of :func:`run_tasks` (callers then
#: do not split their work over the pool again).
_local = threading.local()


def in_task() -> bool:
    """Whether the calling thread is running a task of :func:`run_tasks`."""
    return getattr(_local, "in_task", False)


def run_shares(fn, n: int, nw: int, per_thread: int = TASKS_PER_THREAD) -> None:
    """``fn(lo, hi)`` for each non-empty contiguous share ``[lo, hi)`` of ``range(n)``, on
    ``nw`` threads: ``nw * per_thread`` shares, set by ``n`` and the counts alone."""

    def task(t: int, ntasks: int) -> None:
        lo, hi = t * n // ntasks, (t + 1) * n // ntasks
        if hi > lo:
            fn(lo, hi)

    run_tasks(task, nw, per_thread=per_thread)


def run_tasks(kernel, nw: int, *args, per_thread: int = TASKS_PER_THREAD) -> None:
    """``kernel(task, ntasks, *args)`` for every task, on ``nw`` threads (``per_thread``
    tasks each). Called from inside a task, the tasks run on the calling thread: the
    pool's threads may all be busy with the outer tasks, and waiting for them there
    would never end (a copy on the engine's threads inside a threaded slab)."""
    global _pool
    if nw <= 1:
        kernel(0, 1, *args)
        return
    ntasks = nw * per_thread
    if in_task():
        for task in range(ntasks):
            kernel(task, ntasks, *args)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < nw - 1:
            _pool = ThreadPoolExecutor(max_workers=nw - 1, thread_name_prefix="volconv")
        pool = _pool
    tasks = iter(range(ntasks))
    lock = threading.Lock()

    def work() -> None:
        saved = in_task()
        _local.in_task = True
        try:
            while True:
                with lock:
                    task = next(tasks, None)
                if task is None:
                    return
                kernel(task, ntasks, *args)
        finally:
            _local.in_task = saved

    futures = [pool.submit(work) for _ in range(nw - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()
