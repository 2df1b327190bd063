"""Command line and orchestration of the benchmark: one fresh process per layer and phase."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _common, _report, _suite

HERE = Path(__file__).resolve().parent
TORCH_WORKER = HERE / "_torch_worker.py"
TORCH_VENV_PYTHON = Path.home() / ".cache" / "volconv-torch-venv" / "bin" / "python"
RESULTS_DIR = Path("bench") / "results"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


class WorkerError(RuntimeError):
    """A worker process failed, timed out or wrote no result."""


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m volconv.bench`` / ``volconv bench``."""
    p = argparse.ArgumentParser(
        prog="volconv bench",
        description="Time volconv's conv3d forward and backward on real 3D-CNN layers, "
        "against PyTorch when available; each layer and phase runs in a fresh process.",
    )
    p.add_argument("--layers", help="comma-separated layer names (default: the whole suite)")
    p.add_argument("--list", action="store_true", help="list the suite's layers and exit")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N=1, spatial sizes halved (>= kernel extent), 1 repeat",
    )
    p.add_argument("--repeats", type=int, help="timed calls per phase after 1 warm-up (3)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every layer's workers this many times, volconv and torch alternating, "
        "and report each phase's median round (1): ratios steadier on a noisy machine",
    )
    p.add_argument("--threads", type=int, default=_default_threads(), help="threads, both libs")
    p.add_argument("--json", type=Path, help="JSON output (bench/results/latest.json)")
    p.add_argument("--markdown", type=Path, help="markdown output (bench/results/latest.md)")
    p.add_argument("--no-torch", action="store_true", help="do not run PyTorch")
    p.add_argument("--torch-python", help="interpreter with torch (default: auto-detect)")
    p.add_argument("--algorithm", help="force volconv.config.algorithm in the workers")
    p.add_argument(
        "--workspace-mib",
        type=float,
        help="set volconv.config.workspace_bytes in the workers (MiB; default: the library's)",
    )
    p.add_argument("--suite", type=Path, help="suite JSON file (default: the packaged one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (0)")
    p.add_argument("--sgemm-size", type=int, default=2048, help="size of the sgemm peak probe")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker (900)")
    p.add_argument(
        "--out-of-core",
        action="store_true",
        help="instead: convolve a zarr volume on disk with dask, report time and peak "
        "memory (see `volconv bench --out-of-core --help`)",
    )
    return p


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a worker: thread counts pinned, volconv importable."""
    env = dict(os.environ)
    for key in _THREAD_VARS:
        env[key] = str(threads)
    root = str(HERE.parents[1])  # directory that contains the volconv package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_worker(
    cmd: list[str], spec: dict[str, Any], env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Run one worker process and return its JSON record.

    Parameters
    ----------
    cmd : list of str
        Interpreter and module/script, without the spec and output arguments.
    spec : dict
        Worker specification (serialised to JSON on the command line).
    env : dict
        Environment of the process.
    timeout : float
        Seconds before the worker is killed.

    Returns
    -------
    dict
        The worker's record.

    Raises
    ------
    WorkerError
        If the process fails, times out or writes no record.
    """
    with tempfile.TemporaryDirectory(prefix="volconv-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        try:
            proc = subprocess.run(
                [*cmd, json.dumps(spec), out],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WorkerError(f"timed out after {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise WorkerError(f"exit code {proc.returncode}: " + " / ".join(tail))
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def find_torch_python(args: argparse.Namespace) -> str | None:
    """Interpreter to run the torch worker with, or None to skip torch.

    Order: ``--torch-python``, the current interpreter if it has torch, then
    ``~/.cache/volconv-torch-venv/bin/python`` (made by ``shared/tools/torch-peer``).
    """
    if args.no_torch:
        return None
    if args.torch_python:
        return args.torch_python
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    if TORCH_VENV_PYTHON.exists():
        return str(TORCH_VENV_PYTHON)
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """State of one benchmark run: options, environment, interpreters."""

    def __init__(self, args: argparse.Namespace, torch_python: str | None) -> None:
        self.args = args
        self.env = worker_env(args.threads)
        self.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
        self.rounds = args.rounds
        self.volconv_cmd = [sys.executable, "-m", "volconv.bench._worker"]
        self.torch_cmd = [torch_python, str(TORCH_WORKER)] if torch_python else None

    def spec(self, phase: str, layer: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "phase": phase,
            "layer": layer,
            "repeats": self.repeats,
            "seed": self.args.seed,
            "threads": self.args.threads,
            "algorithm": self.args.algorithm,
            "workspace_bytes": _workspace_bytes(self.args),
            "sgemm_n": self.args.sgemm_size,
        }

    def machine(self) -> dict[str, Any]:
        """Machine info and sgemm peak, measured in a worker with the run's threads."""
        return run_worker(self.volconv_cmd, self.spec("sgemm"), self.env, self.args.timeout)

    def torch_info(self) -> dict[str, Any]:
        assert self.torch_cmd is not None
        return run_worker(self.torch_cmd, self.spec("info"), self.env, self.args.timeout)

    def side(self, cmd: list[str], layer: dict[str, Any]) -> dict[str, Any]:
        """Forward and backward records of one library (``error`` on failure)."""
        result: dict[str, Any] = {}
        for phase in ("forward", "backward"):
            spec = self.spec(phase, layer)
            try:
                result[phase] = run_worker(cmd, spec, self.env, self.args.timeout)
            except WorkerError as exc:
                result[phase] = {"error": str(exc)}
        return result

    def layer(self, layer: dict[str, Any]) -> dict[str, Any]:
        """Full record of one layer: both libraries, both phases (the median of the
        rounds, see :func:`median_round`), cross-check."""
        flops = _common.layer_flops(layer)
        cmds = {"volconv": self.volconv_cmd, "torch": self.torch_cmd}
        rounds: dict[str, list[dict[str, Any]]] = {lib: [] for lib, cmd in cmds.items() if cmd}
        for _ in range(self.rounds):  # the libraries alternate: drifts in load hit both
            for lib in rounds:
                rounds[lib].append(self.side(cmds[lib], layer))
        sides = {
            lib: {phase: median_round([r[phase] for r in runs]) for phase in runs[0]}
            for lib, runs in rounds.items()
        }
        record: dict[str, Any] = {
            "name": layer["name"],
            "layer": layer,
            "flops_fwd": flops,
            "flops_bwd": 2 * flops,
            "volconv": sides["volconv"],
            "torch": sides.get("torch"),
        }
        record["rel_err"] = _report.rel_errors(record["volconv"], record["torch"])
        errors = [
            f"{lib} {phase}: {rec['error']}"
            for lib in ("volconv", "torch")
            for phase, rec in (record[lib] or {}).items()
            if "error" in rec
        ]
        record["error"] = "; ".join(errors) or None
        return record


def median_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of one phase's median round (by ``median_s``; the lower middle of an
    even count), with every round's median in ``round_medians_s`` when there are several;
    the first failed round's record if any failed.

    Examples
    --------
    >>> median_round([{"median_s": 3.0}, {"median_s": 1.0}, {"median_s": 2.0}])
    {'median_s': 2.0, 'round_medians_s': [3.0, 1.0, 2.0]}
    """
    failed = [r for r in records if "error" in r]
    if failed:
        return failed[0]
    chosen = dict(sorted(records, key=lambda r: r["median_s"])[(len(records) - 1) // 2])
    if len(records) > 1:
        chosen["round_medians_s"] = [r["median_s"] for r in records]
    return chosen


def _strip_samples(record: dict[str, Any]) -> None:
    """Drop the raw cross-check samples from a layer record (keep sum and max_abs)."""
    for lib in ("volconv", "torch"):
        for rec in (record.get(lib) or {}).values():
            for summary in rec.get("outputs", {}).values():
                summary.pop("sample", None)


def _progress(i: int, total: int, row: dict[str, Any], elapsed: float) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (
        f"[{i}/{total}] {row['name']}: fwd {fmt(row['fwd_ms'], '.2f')} ms "
        f"(torch {fmt(row['torch_fwd_ms'], '.2f')}, x{fmt(row['fwd_ratio'], '.2f')}), "
        f"bwd {fmt(row['bwd_ms'], '.2f')} ms (torch {fmt(row['torch_bwd_ms'], '.2f')}, "
        f"x{fmt(row['bwd_ratio'], '.2f')})  [{elapsed:.0f} s]"
        + (f"  ERROR: {row['error']}" if row.get("error") else "")
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    stem = "quick" if args.quick else "latest"
    json_path = args.json or RESULTS_DIR / f"{stem}.json"
    md_path = args.markdown or RESULTS_DIR / f"{stem}.md"
    return json_path, md_path


def _workspace_bytes(args: argparse.Namespace) -> int | None:
    """``--workspace-mib`` in bytes, or None (the library's default)."""
    mib = getattr(args, "workspace_mib", None)
    if mib is None:
        return None
    if not mib > 0:
        raise ValueError(f"--workspace-mib must be > 0, got {mib}")
    return int(mib * (1 << 20))


def _check_algorithm(name: str | None) -> None:
    if name is None:
        return
    from volconv.engine import algorithms

    if name not in algorithms():
        raise ValueError(f"--algorithm {name!r} is not one of {algorithms()}")


def _setup(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Bench, dict[str, Any] | None]:
    """Layers to run, the run state and torch's info (None when torch is skipped)."""
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    layers = _suite.select(_suite.load_suite(args.suite), args.layers)
    if args.quick:
        layers = [_suite.shrink(layer) for layer in layers]
    _check_algorithm(args.algorithm)
    _workspace_bytes(args)
    torch_python = find_torch_python(args)
    bench = Bench(args, torch_python)
    torch_info = None
    if bench.torch_cmd:
        try:
            torch_info = bench.torch_info()
            torch_info["python"] = torch_python
        except WorkerError as exc:
            if args.torch_python:
                raise ValueError(f"--torch-python {args.torch_python}: {exc}") from None
            _log(f"torch not usable with {torch_python} ({exc}); torch columns are n/a")
            bench.torch_cmd = None
    return layers, bench, torch_info


def _load() -> list[float] | None:
    """1/5/15-minute load averages (a noise indicator), or None where unsupported."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _run_layers(bench: Bench, layers: list[dict[str, Any]], start: float) -> list[dict]:
    """Layer records, in order, with progress lines on stderr."""
    records = []
    for i, layer in enumerate(layers, 1):
        record = bench.layer(layer)
        records.append(record)
        row = _report.derive(record, None)
        row["error"] = record["error"]
        _log(_progress(i, len(layers), row, time.perf_counter() - start))
    return records


def _finish(records: list[dict[str, Any]], peak: float) -> list[dict[str, Any]]:
    """Table rows from the records; samples dropped and each row stored as ``derived``."""
    rows = []
    for record in records:
        row = _report.derive(record, peak)
        row["error"] = record["error"]
        _strip_samples(record)
        record["derived"] = {k: v for k, v in row.items() if k not in ("name", "error")}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``python -m volconv.bench`` / ``volconv bench``).

    The numpy sgemm peak is measured before and after the layers; the better of the
    two is the peak of the run (the machine is noisy).

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 if every worker succeeded, 1 if some failed (the report is still written),
        2 on a usage error.
    """
    given = sys.argv[1:] if argv is None else list(argv)
    if "--out-of-core" in given:  # a separate benchmark with its own options
        from . import _outofcore

        return _outofcore.main([a for a in given if a != "--out-of-core"])
    args = build_parser().parse_args(argv)
    if args.list:
        for layer in _suite.load_suite(args.suite):
            print(f"{layer['name']:20s} {layer.get('note', '')}")
        return 0
    start, load_start = time.perf_counter(), _load()
    try:
        layers, bench, torch_info = _setup(args)
        _log(f"measuring the numpy sgemm peak ({args.threads} threads)...")
        machine = bench.machine()
    except (ValueError, OSError, WorkerError) as exc:
        print(f"volconv bench: error: {exc}", file=sys.stderr)
        return 2
    _log(f"sgemm peak {machine['sgemm']['gflops']:.1f} GFLOP/s; torch: "
         f"{torch_info['torch'] if torch_info else 'n/a'}")  # fmt: skip
    records = _run_layers(bench, layers, start)
    runs = [machine["sgemm"]]
    try:
        runs.append(bench.machine()["sgemm"])
    except WorkerError as exc:
        _log(f"second sgemm probe failed: {exc}")
    machine["sgemm_runs"] = runs
    machine["sgemm"] = max(runs, key=lambda r: r["gflops"])
    rows = _finish(records, machine["sgemm"]["gflops"])
    result: dict[str, Any] = {
        "format": "volconv-bench/1",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "threads": args.threads,
        "repeats": bench.repeats,
        "rounds": bench.rounds,
        "statistic": "median of repeats after one warm-up call"
        + (", in the median of the rounds" if bench.rounds > 1 else ""),
        "seed": args.seed,
        "algorithm": args.algorithm,
        "workspace_bytes": _workspace_bytes(args),
        "machine": machine,
        "load_average": {"start": load_start, "end": _load()},
        "torch": torch_info,
        "layers": records,
        "geomean": _report.geomeans(rows),
    }
    result["elapsed_s"] = time.perf_counter() - start
    text = _report.markdown_report(result, rows)
    json_path, md_path = _output_paths(args)
    _write(json_path, json.dumps(result, indent=1) + "\n")
    _write(md_path, text)
    print(text, end="")
    _log(f"wrote {json_path} and {md_path} in {result['elapsed_s']:.0f} s")
    return 1 if any(r["error"] for r in rows) else 0
