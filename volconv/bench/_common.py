"""Helpers shared by the benchmark workers: inputs, timing, memory, samples.

This module must only need the standard library and numpy: the PyTorch worker
(``_torch_worker.py``) runs it from its own directory under another interpreter,
possibly a virtual environment without volconv, as the top-level module ``_common``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: Number of output values (evenly spaced over the flat array) kept for the cross-check.
SAMPLE_SIZE = 512


# --------------------------------------------------------------------------- geometry


def out_spatial(layer: dict[str, Any]) -> tuple[int, int, int]:
    """Output spatial size ``(Do, Ho, Wo)`` of a suite layer (symmetric padding).

    Parameters
    ----------
    layer : dict
        A suite entry with ``D, H, W, kernel, stride, padding, dilation``.

    Returns
    -------
    tuple of int
        ``(Do, Ho, Wo)``.
    """
    sizes = (layer["D"], layer["H"], layer["W"])
    out = []
    for size, k, s, p, d in zip(
        sizes, layer["kernel"], layer["stride"], layer["padding"], layer["dilation"], strict=True
    ):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)  # type: ignore[return-value]


def layer_flops(layer: dict[str, Any]) -> int:
    """Nominal forward flops ``2*N*O*Do*Ho*Wo*Cin/G*kd*kh*kw`` (taps on padding included).

    Parameters
    ----------
    layer : dict
        A suite entry.

    Returns
    -------
    int
        Forward flops; the backward (``dx`` + ``dw``) counts twice as many.
    """
    do, ho, wo = out_spatial(layer)
    kd, kh, kw = layer["kernel"]
    cin_g = layer["Cin"] // layer["groups"]
    return 2 * layer["N"] * layer["Cout"] * do * ho * wo * cin_g * kd * kh * kw


# --------------------------------------------------------------------------- inputs


def make_inputs(layer: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 inputs, identical in every worker for the same layer and seed.

    Parameters
    ----------
    layer : dict
        A suite entry.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    dict of numpy.ndarray
        ``x`` (N, Cin, D, H, W), ``w`` (Cout, Cin/G, kd, kh, kw) scaled by
        ``1/sqrt(fan_in)``, ``b`` (Cout,) and ``dy`` (N, Cout, Do, Ho, Wo). All are
        C-contiguous float32 and drawn directly in float32 (no float64 temporaries,
        which would raise the memory high-water mark before the baseline).
    """
    rng = np.random.default_rng(seed)
    n, cin, cout, g = layer["N"], layer["Cin"], layer["Cout"], layer["groups"]
    kernel = tuple(layer["kernel"])
    x = rng.standard_normal((n, cin, layer["D"], layer["H"], layer["W"]), dtype=np.float32)
    w = rng.standard_normal((cout, cin // g, *kernel), dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt((cin // g) * int(np.prod(kernel))))
    b = rng.standard_normal(cout, dtype=np.float32)
    dy = rng.standard_normal((n, cout, *out_spatial(layer)), dtype=np.float32)
    return {"x": x, "w": w, "b": b, "dy": dy}


def sample(arr: np.ndarray, size: int = SAMPLE_SIZE) -> list[float]:
    """Evenly spaced values of ``arr`` (C order), as float64, for the cross-check.

    Parameters
    ----------
    arr : numpy.ndarray
        Any array.
    size : int
        Maximum number of values.

    Returns
    -------
    list of float
        The same positions for any array of the same number of elements.
    """
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size == 0:
        return []
    idx = np.unique(np.linspace(0, flat.size - 1, num=min(flat.size, size)).round())
    return flat[idx.astype(np.int64)].astype(np.float64).tolist()


def summary(arr: np.ndarray) -> dict[str, Any]:
    """Sample plus float64 sum and max-abs of one result array."""
    return {
        "sample": sample(arr),
        "sum": float(np.sum(arr, dtype=np.float64)),
        "max_abs": float(np.max(np.abs(arr))) if arr.size else 0.0,
    }


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    """``ru_maxrss`` in KiB (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


class PeakMemory:
    """Peak resident memory above a baseline, for one measured window.

    On Linux the kernel's per-process high-water mark (``VmHWM``) is reset to the
    current RSS by writing ``5`` to ``/proc/self/clear_refs``, so the baseline is the
    RSS at :meth:`start` and the peak is ``VmHWM`` at :meth:`stop`. Elsewhere (or if
    the reset is refused) the baseline is ``ru_maxrss`` at :meth:`start`, which can
    hide a peak that stays below an earlier, larger high-water mark.
    """

    def __init__(self) -> None:
        self.method = ""
        self.baseline_kib = 0

    def start(self) -> None:
        """Take the baseline (after imports and input allocation)."""
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            rss = _status_kib("VmRSS")
            if rss is None or _status_kib("VmHWM") is None:
                raise OSError("no VmRSS/VmHWM")
            self.method = "VmHWM after clear_refs"
            self.baseline_kib = rss
        except OSError:
            self.method = "ru_maxrss"
            self.baseline_kib = _maxrss_kib()

    def stop(self) -> dict[str, Any]:
        """Peak above baseline since :meth:`start`.

        Returns
        -------
        dict
            ``baseline_mib``, ``peak_mib`` (peak RSS above baseline) and ``method``.
        """
        peak = _status_kib("VmHWM") if self.method.startswith("VmHWM") else _maxrss_kib()
        peak = peak if peak is not None else _maxrss_kib()
        return {
            "baseline_mib": self.baseline_kib / 1024,
            "peak_mib": max(0, peak - self.baseline_kib) / 1024,
            "method": self.method,
        }


# --------------------------------------------------------------------------- timing


def release_free_memory() -> None:
    """Collect garbage and return the C heap's free pages to the OS (glibc ``malloc_trim``).

    Without this, memory that the allocator keeps after the warm-up call would sit in the
    next baseline and be reused unseen by the timed calls.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def time_calls(
    fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Warm up once, then time ``repeats`` calls, measuring peak memory of both stages.

    The warm-up pays one-time costs (numba JIT, oneDNN primitive creation, plan
    caches); their memory is reported separately as ``memory_first_call``. After it,
    its output is freed and :func:`release_free_memory` runs, then a new baseline is
    taken and ``memory`` is the peak above it over the timed calls (steady state:
    workspace plus output of one call).

    Parameters
    ----------
    fn : callable
        No-argument call to time; its result is dropped before the next call.
    repeats : int
        Timed calls after the warm-up (>= 1).
    before : callable, optional
        Untimed work before each call (e.g. dropping the previous gradients).

    Returns
    -------
    dict
        ``times_s`` (each timed call), ``median_s``, ``min_s``, ``warmup_s``,
        ``memory`` and ``memory_first_call`` (see :meth:`PeakMemory.stop`), plus
        ``result`` (the last call's return value).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    first = PeakMemory()
    first.start()
    if before is not None:
        before()
    t0 = time.perf_counter()
    result = fn()
    warmup = time.perf_counter() - t0
    result = None
    if before is not None:
        before()  # e.g. drop the warm-up's gradients before the baseline
    memory_first_call = first.stop()
    release_free_memory()
    mem = PeakMemory()
    mem.start()
    times = []
    for _ in range(repeats):
        result = None  # free the previous output before the next call, as a loop would
        if before is not None:
            before()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "warmup_s": warmup,
        "memory": mem.stop(),
        "memory_first_call": memory_first_call,
        "result": result,
    }


def sgemm_peak(n: int, repeats: int = 5) -> dict[str, Any]:
    """Best float32 ``(n x n) @ (n x n)`` matmul rate of numpy in this process.

    Parameters
    ----------
    n : int
        Matrix size.
    repeats : int
        Timed products after one warm-up; the best (minimum time) is kept.

    Returns
    -------
    dict
        ``n``, ``best_s`` and ``gflops`` (GFLOP/s).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "best_s": best, "gflops": 2.0 * n**3 / best / 1e9}


# --------------------------------------------------------------------------- protocol


def read_spec(argv: list[str]) -> tuple[dict[str, Any], str]:
    """Worker command line: ``SPEC_JSON OUT_PATH``."""
    if len(argv) != 2:
        raise SystemExit("usage: worker SPEC_JSON OUT_PATH")
    return json.loads(argv[0]), argv[1]


def write_result(path: str, record: dict[str, Any]) -> None:
    """Write a worker's result record as JSON (atomically: temp file then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def phase_record(timing: dict[str, Any], outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """JSON-ready record of one timed phase and the summaries of its outputs."""
    record = {k: v for k, v in timing.items() if k != "result"}
    record["outputs"] = {name: summary(arr) for name, arr in outputs.items()}
    return record
