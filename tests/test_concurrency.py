"""Many Python threads calling conv3d / conv_transpose3d and their backward at once.

Every thread has its own GradManager and Parameters; the results must be bitwise the
results of serial calls. The problems are chosen so that the chooser picks different
algorithms (BLAS GEMMs, batched matmul, numba kernels), large enough for BLAS and numba to
use their own worker threads. The autodiff tape is thread-local: recording in one thread
must not record or change anything in another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import volconv as mge
import volconv.functional as F
from volconv import engine
from volconv.autodiff import GradManager, is_recording
from volconv.engine._args import conv_geometry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 8

# (x shape, weight shape, kwargs); weights 6-D when grouped
PROBLEMS = [
    ((2, 8, 9, 9, 9), (8, 1, 1, 3, 3, 3), dict(padding=1, groups=8)),  # depthwise
    ((1, 16, 4, 20, 20), (16, 16, 1, 3, 3), dict(padding=(0, 1, 1))),  # per-tap GEMM
    ((1, 4, 8, 12, 12), (8, 4, 3, 3, 3), dict(stride=(1, 2, 2), padding=1)),  # hwunfold
    ((2, 2, 7, 8, 9), (4, 2, 3, 3, 3), dict(stride=2)),  # im2col
    ((1, 34, 4, 5, 4), (2, 3, 17, 2, 2, 2), dict(groups=2)),  # grouped, too wide for direct
    ((2, 24, 5, 6, 7), (16, 24, 1, 1, 1), dict(stride=(1, 2, 1))),  # pointwise
    ((1, 16, 8, 12, 12), (16, 16, 3, 3, 3), dict(padding=1)),  # winograd
]


def _geometry(x_shape, w_shape, kw):
    w6 = w_shape if len(w_shape) == 6 else (1, *w_shape)
    t = lambda v: (v,) * 3 if isinstance(v, int) else tuple(v)  # noqa: E731
    p = t(kw.get("padding", 0))
    return conv_geometry(
        x_shape,
        w6,
        t(kw.get("stride", 1)),
        tuple((q, q) for q in p),
        t(kw.get("dilation", 1)),
        kw.get("groups", 1),
    )


def _jobs():
    """(label, fn, operands, dy, kwargs): every problem as conv3d and conv_transpose3d."""
    rng = np.random.default_rng(0)
    jobs = []
    for i, (xs, ws, kw) in enumerate(PROBLEMS):
        geom = _geometry(xs, ws, kw)
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(xs).astype(dtype)
            w = rng.standard_normal(ws).astype(dtype)
            b = rng.standard_normal((1, geom.O, 1, 1, 1)).astype(dtype)
            dy = rng.standard_normal(geom.out_shape).astype(dtype)
            name = engine.choose(geom, np.dtype(dtype))
            jobs.append((f"conv3d-{i}-{name}-{np.dtype(dtype).name}", F.conv3d, (x, w, b), dy, kw))
            op = tuple(
                (n + 2 * q - (d * (k - 1) + 1)) % s
                for n, (q, _), d, k, s in zip(
                    geom.spatial_in, geom.pads, geom.dilation, geom.kernel, geom.stride, strict=True
                )
            )
            bt = rng.standard_normal((1, geom.C, 1, 1, 1)).astype(dtype)
            jobs.append(
                (
                    f"conv_transpose3d-{i}-{np.dtype(dtype).name}",
                    F.conv_transpose3d,
                    (dy, w, bt),
                    x,
                    dict(kw, output_padding=op),
                )
            )
    return jobs


def _run(fn, operands, dy, kw):
    params = [mge.Parameter(a) for a in operands]
    gm = GradManager().attach(params)
    with gm:
        y = fn(*params, **kw)
        gm.backward(y, mge.tensor(dy))
    return [y.numpy()] + [p.grad.numpy() for p in params]


def test_problems_cover_several_algorithms():
    chosen = {engine.choose(_geometry(*p), np.dtype(np.float32)) for p in PROBLEMS}
    assert len(chosen) >= 3, chosen


def test_threads_give_bitwise_the_serial_results():
    jobs = _jobs()
    serial = [_run(fn, ops, dy, kw) for _, fn, ops, dy, kw in jobs]
    barrier = threading.Barrier(THREADS)
    mismatches, errors = [], []

    def worker(t: int):
        try:
            barrier.wait()
            for j in range(len(jobs)):
                k = (j + t * 3) % len(jobs)  # the threads run different jobs at once
                label, fn, ops, dy, kw = jobs[k]
                got = _run(fn, ops, dy, kw)
                for what, g, s in zip(("y", "dx", "dw", "db"), got, serial[k], strict=True):
                    if not np.array_equal(g, s):
                        mismatches.append((t, label, what, float(np.abs(g - s).max())))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append((t, repr(exc)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors[:5]
    assert not mismatches, mismatches[:10]


def test_first_calls_from_many_threads_at_once():
    """A fresh process: lazy initialisation (numba kernels) raced by 8 threads."""
    code = f"""
    import sys, threading
    sys.path.insert(0, {ROOT!r})
    import numpy as np
    import volconv.functional as F
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6, 6))
    cases = [
        (np.ones((8, 1, 1, 3, 3, 3)), dict(padding=1, groups=8)),
        (np.ones((8, 8, 3, 3, 3)), dict(padding=1)),
        (np.ones((8, 8, 1, 3, 3)), dict(stride=2)),
    ]
    results, errors = {{}}, []
    barrier = threading.Barrier({THREADS})
    def worker(t):
        barrier.wait()
        try:
            for i, (w, kw) in enumerate(cases):
                results[(t, i)] = F.conv3d(x, w, **kw).numpy()
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=worker, args=(t,)) for t in range({THREADS})]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not errors, errors[:3]
    for (t, i), y in results.items():
        assert np.array_equal(y, F.conv3d(x, cases[i][0], **cases[i][1]).numpy()), (t, i)
    print("OK", len(results))
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"OK {3 * THREADS}", proc.stdout + proc.stderr[-2000:]


def test_recording_in_one_thread_does_not_leak_into_another():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 5, 5, 5))
    w = mge.Parameter(rng.standard_normal((3, 2, 3, 3, 3)))
    dy = rng.standard_normal((1, 3, 3, 3, 3))
    expected = _run(F.conv3d, (x, w.numpy()), dy, {})[2]

    recording = threading.Event()
    other_done = threading.Event()
    seen = {}

    def recorder():
        gm = GradManager().attach([w])
        with gm:
            y = F.conv3d(x, w)
            recording.set()
            other_done.wait(timeout=60)
            gm.backward(y, mge.tensor(dy))

    def other():
        recording.wait(timeout=60)
        seen["recording_here"] = is_recording()
        # w is attached and recorded in the other thread; here nothing records
        y = F.conv3d(x, w)
        seen["node"] = y._node
        # and this thread's own manager records only its own work
        xo = mge.Parameter(x)
        gm2 = GradManager().attach([xo])
        with gm2:
            gm2.backward(F.conv3d(xo, w).sum())
        seen["xo_grad"] = xo.grad is not None
        other_done.set()

    threads = [threading.Thread(target=recorder), threading.Thread(target=other)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert seen == {"recording_here": False, "node": None, "xo_grad": True}
    np.testing.assert_array_equal(w.grad.numpy(), expected)  # the other thread added nothing


@pytest.mark.parametrize("name", engine.algorithms())
def test_each_algorithm_alone_under_threads(name, algorithm):
    """Forced algorithms (config is process-wide: set once, then the threads start)."""
    algorithm(name)
    jobs = [j for j in _jobs() if j[1] is F.conv3d and j[2][0].dtype == np.float32]
    usable = [
        j
        for j, (xs, ws, kw) in zip(jobs, PROBLEMS, strict=True)
        if engine._supports(name, _geometry(xs, ws, kw))
    ]
    if not usable:
        pytest.skip(f"{name} supports none of the problems")
    serial = [_run(fn, ops, dy, kw) for _, fn, ops, dy, kw in usable]
    out = {}

    def worker(t):
        for k, (_, fn, ops, dy, kw) in enumerate(usable):
            out[(t, k)] = _run(fn, ops, dy, kw)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert len(out) == 4 * len(usable)
    for (_, k), got in out.items():
        for g, s in zip(got, serial[k], strict=True):
            assert np.array_equal(g, s), usable[k][0]


def test_compile_once_builds_once_under_concurrent_first_calls():
    """The algorithms' ``_kernels()`` rebind module globals when they build: two first
    calls at once must run the build once and both get its result."""
    import threading
    import time

    from volconv.engine._numba_runtime import compile_once

    builds = []

    @compile_once
    def kernels():
        builds.append(1)
        time.sleep(0.05)  # a slow build: the second caller arrives while it runs
        return {"built": len(builds)}

    results = []
    threads = [threading.Thread(target=lambda: results.append(kernels())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1]
    assert all(r is results[0] for r in results) and results[0] == {"built": 1}
    assert kernels.__name__ == "kernels"


@pytest.mark.parametrize(
    ("n", "nw", "per_thread"), [(0, 2, 4), (1, 2, 4), (7, 2, 4), (100, 2, 1), (5, 1, 4)]
)
def test_run_shares_covers_the_range_once(n, nw, per_thread):
    """``run_shares`` hands out contiguous, non-empty, disjoint shares covering range(n)."""
    import threading

    from volconv.engine._numba_runtime import run_shares

    seen, lock = [], threading.Lock()

    def share(lo, hi):
        assert hi > lo
        with lock:
            seen.append((lo, hi))

    run_shares(share, n, nw, per_thread=per_thread)
    assert sorted(i for lo, hi in seen for i in range(lo, hi)) == list(range(n))
    assert len(seen) <= max(1, nw * per_thread)


def test_run_tasks_inside_a_task_runs_on_the_calling_thread():
    """A parallel-for inside a task (a copy on the engine's threads within a threaded
    slab) runs all its tasks once, on that thread, instead of waiting forever for pool
    threads busy with the outer tasks. Run on a watchdog thread so that a regression
    fails here rather than hanging the suite."""
    from volconv.engine._numba_runtime import run_tasks

    seen, lock, done = [], threading.Lock(), []

    def inner(task, ntasks, outer_task):
        with lock:
            seen.append((outer_task, task, ntasks, threading.get_ident()))

    def outer(task, ntasks):
        caller = threading.get_ident()
        run_tasks(inner, 2, task)
        assert all(t[3] == caller for t in seen if t[0] == task)

    watchdog = threading.Thread(target=lambda: (run_tasks(outer, 2), done.append(1)), daemon=True)
    watchdog.start()
    watchdog.join(timeout=30)
    assert done == [1], "nested run_tasks did not finish"
    assert sorted(t[:3] for t in seen) == [(o, i, 8) for o in range(8) for i in range(8)]
