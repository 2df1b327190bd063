"""One benchmark phase of volconv in a fresh process.

Run as ``python -m volconv.bench._worker SPEC_JSON OUT_PATH``. ``SPEC_JSON`` holds
``phase`` (``"forward"``, ``"backward"`` or ``"sgemm"``) and, for the conv phases,
``layer``, ``repeats``, ``seed`` and ``algorithm``. The thread count comes from the
environment (``OMP_NUM_THREADS`` etc.), set by the parent before this process starts.
The result record (JSON) is written to ``OUT_PATH``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np

from volconv.bench import _common


def _blas_info() -> dict[str, Any]:
    """BLAS description: threadpoolctl's view if installed, else numpy's build config."""
    info: dict[str, Any] = {}
    try:
        from threadpoolctl import threadpool_info

        info["threadpoolctl"] = threadpool_info()
    except ImportError:
        pass
    try:
        config = np.show_config(mode="dicts")
        info["numpy_build"] = config.get("Build Dependencies", {})
        simd = config.get("SIMD Extensions", {})
        info["numpy_simd"] = {k: simd[k] for k in ("baseline", "found") if k in simd}
    except (TypeError, AttributeError):  # numpy < 1.25: no mode="dicts"
        info["numpy_build"] = "numpy.show_config(mode='dicts') unavailable"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"numpy": np.__version__}
    for name in ("scipy", "numba", "volconv"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "installed")
        except ImportError:
            versions[name] = None
    return versions


def machine_info(sgemm_n: int) -> dict[str, Any]:
    """Machine description and the numpy sgemm peak, measured in this process.

    Parameters
    ----------
    sgemm_n : int
        Size of the square float32 matmul used for the peak.

    Returns
    -------
    dict
        ``cpu_count``, ``cpu_model``, ``platform``, ``python``, ``versions``,
        ``blas``, ``env`` (thread and BLAS variables) and ``sgemm``.
    """
    env_keys = (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMBA_NUM_THREADS",
        "OPENBLAS_CORETYPE",
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": _versions(),
        "blas": _blas_info(),
        "env": {k: os.environ.get(k) for k in env_keys},
        "sgemm": _common.sgemm_peak(sgemm_n),
    }


def _setup(layer: dict[str, Any], seed: int) -> tuple[dict[str, np.ndarray], Any]:
    """Inputs in volconv's layout (grouped 6-D weight) and the geometry."""
    from volconv.engine import conv_geometry

    arrays = _common.make_inputs(layer, seed)
    g = layer["groups"]
    w = arrays["w"]
    arrays["w6"] = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    pads = tuple((p, p) for p in layer["padding"])
    geom = conv_geometry(
        arrays["x"].shape,
        arrays["w6"].shape,
        tuple(layer["stride"]),
        pads,
        tuple(layer["dilation"]),
        g,
    )
    return arrays, geom


def _chosen(geom: Any) -> str | None:
    """Forward algorithm the engine's chooser picks (None if it has no chooser)."""
    from volconv import engine

    choose = getattr(engine, "choose", None)
    if choose is None:
        return None
    return choose(geom, np.dtype(np.float32))


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one phase of one layer; see the module docstring for ``spec``.

    Parameters
    ----------
    spec : dict
        Worker specification.

    Returns
    -------
    dict
        ``phase``, ``algorithm``, ``flops`` and the timing record of
        :func:`volconv.bench._common.phase_record`.
    """
    from volconv import config
    from volconv.engine import (
        channel_sums,
        conv3d_backward_input,
        conv3d_backward_weight,
        conv3d_forward,
    )

    if spec.get("algorithm"):
        config.algorithm = spec["algorithm"]
    if spec.get("workspace_bytes"):
        config.workspace_bytes = int(spec["workspace_bytes"])
    arrays, geom = _setup(spec["layer"], spec["seed"])
    x, w6, b, dy = arrays["x"], arrays["w6"], arrays["b"], arrays["dy"]

    # what volconv.functional.conv3d does (without its Tensor bookkeeping)
    def forward() -> np.ndarray:
        return conv3d_forward(x, w6, geom, bias=b)

    def backward() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dw = conv3d_backward_weight(x, dy, geom)  # in functional.conv3d's order
        dx = conv3d_backward_input(dy, w6, geom)
        db = channel_sums(dy)
        return dx, dw, db

    if spec["phase"] == "forward":
        timing = _common.time_calls(forward, spec["repeats"])
        outputs = {"y": timing["result"]}
    else:
        timing = _common.time_calls(backward, spec["repeats"])
        outputs = dict(zip(("dx", "dw", "db"), timing["result"], strict=True))
    record = _common.phase_record(timing, outputs)
    record.update(phase=spec["phase"], algorithm=_chosen(geom), flops=geom.flops())
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process."""
    spec, out_path = _common.read_spec(sys.argv[1:] if argv is None else argv)
    if spec["phase"] == "sgemm":
        record = machine_info(spec["sgemm_n"])
    else:
        record = run_phase(spec)
    _common.write_result(out_path, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
