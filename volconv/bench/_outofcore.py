"""``volconv bench --out-of-core``: convolve a zarr volume on disk, chunk by chunk.

A ``1 x 1 x S x S x S`` float32 volume is generated chunk by chunk into a zarr array
(never whole in memory), convolved by :func:`volconv.dask.conv3d_zarr` with a
3x3x3 kernel and padding 1 into ``O`` output channels written to another zarr array,
and a few output blocks are checked against :func:`volconv.functional.conv3d` of the
same region. The report gives the times and the **peak resident memory** of the
process and its children (the dask workers with ``--scheduler distributed``): the
kernel's exact high-water mark of this process (``VmHWM``) and the largest sum of the
resident sizes of this process and all its descendants, sampled every 50 ms.

Needs ``dask[array]`` and ``zarr`` (and ``distributed`` for ``--scheduler
distributed``). The data go to a fresh directory under ``--workdir`` (default: the
system temporary directory), deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1 << 30


# ---- memory of the process tree -------------------------------------------------------------
def _rss_kib(pid: int | str) -> int:
    """Resident size of one process in KiB (0 if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class TreeMemory:
    """Peak resident memory of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_kib = 0
        self.peak_children_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.linux = os.path.exists("/proc/self/statm")

    def sample(self) -> None:
        if not self.linux:
            return
        kids = sum(_rss_kib(p) for p in _descendants(os.getpid()))
        self.peak_children_kib = max(self.peak_children_kib, kids)
        self.peak_kib = max(self.peak_kib, _rss_kib("self") + kids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, Any]:
        """Peaks in GiB: ``tree`` is the one to compare with a limit."""
        self_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        scale = 1 / GIB if sys.platform == "darwin" else 1024 / GIB  # macOS: bytes
        hwm = _hwm_kib()
        self_peak = (hwm * 1024 / GIB) if hwm is not None else self_max * scale
        tree = max(self.peak_kib * 1024 / GIB, self_peak)
        return {
            "tree_peak_gib": tree,
            "self_peak_gib": self_peak,
            "children_sampled_peak_gib": self.peak_children_kib * 1024 / GIB,
            "children_ru_maxrss_gib": kids_max * scale,
            "method": "VmHWM of this process; sum of /proc/<pid>/statm RSS of the process "
            f"tree sampled every {self.interval * 1000:.0f} ms",
        }


# ---- the benchmark ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="volconv bench --out-of-core",
        description="Convolve a 1x1xSxSxS float32 zarr volume on disk (3x3x3 kernel, "
        "padding 1) into O channels written to zarr, chunk by chunk with dask; report the "
        "time and the peak resident memory of the process and its children.",
    )
    p.add_argument("--size", type=int, default=1024, help="volume edge S (1024)")
    p.add_argument("--out-channels", type=int, default=8, help="output channels O (8)")
    p.add_argument("--chunk", type=int, default=128, help="chunk edge, zarr and dask (128)")
    p.add_argument("--workdir", type=Path, help="where to make the data directory (tmp)")
    p.add_argument(
        "--scheduler",
        choices=("threads", "distributed"),
        default="threads",
        help="dask's threaded scheduler, or a distributed.LocalCluster of processes (threads)",
    )
    p.add_argument("--workers", type=int, default=2, help="distributed worker processes (2)")
    p.add_argument("--threads", type=int, help="dask threads (threads: cores)")
    p.add_argument("--compress", action="store_true", help="zarr's default compressor")
    p.add_argument("--keep", action="store_true", help="keep the zarr data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-gib", type=float, default=3.0, help="exit 1 above this (3)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    return p


def _create_kwargs(compress: bool) -> dict[str, Any]:
    """No compression (random data do not compress), in the installed zarr's words."""
    from volconv.dask import _zarr_major

    if compress:
        return {}
    return {"compressors": None} if _zarr_major() >= 3 else {"compressor": None}


def _load() -> list[float] | None:
    """1/5/15-minute load averages (other work on the machine slows the run), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _noise(block, seed: int, block_id=None) -> np.ndarray:
    """Standard normal float32 noise for one chunk, seeded by the seed and the chunk index."""
    rng = np.random.default_rng((seed, *block_id))
    return rng.standard_normal(block.shape, dtype=np.float32)


def _generate(path: Path, size: int, chunk: int, seed: int, compress: bool):
    """The input volume, written chunk by chunk (each chunk its own random stream)."""
    import dask.array as da

    from volconv.dask import _create_zarr

    shape, chunks = (1, 1, size, size, size), (1, 1, chunk, chunk, chunk)
    z = _create_zarr(str(path), shape, chunks, "f4", **_create_kwargs(compress))
    template = da.empty(shape, chunks=chunks, dtype=np.float32)
    x = da.map_blocks(_noise, template, seed=seed, dtype=np.float32)
    da.store(x, z, lock=False)
    return z


def _check(src, dst, weight, bias, chunk: int) -> float:
    """Largest relative error of three output blocks against ``F.conv3d`` of their region."""
    import volconv.functional as F

    size = src.shape[2]
    worst = 0.0
    for start in sorted({0, (size // 2 // chunk) * chunk, max(size - chunk, 0)}):
        stop = min(start + chunk, size)
        lo, hi = max(start - 1, 0), min(stop + 1, size)
        region = np.asarray(src[:, :, lo:hi, lo:hi, lo:hi])
        pad = (start - lo == 0) * 1, (hi - stop == 0) * 1
        region = np.pad(region, ((0, 0), (0, 0), *[pad] * 3))
        ref = F.conv3d(region, weight, bias).numpy()
        got = np.asarray(dst[:, :, start:stop, start:stop, start:stop])
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


@contextlib.contextmanager
def _scheduler(args):
    """The dask scheduler of the run, active inside the ``with`` block."""
    import dask

    if args.scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=args.threads or _cores()):
            yield
        return
    from distributed import Client, LocalCluster

    # The benchmark's own choice, not the library's: BLAS threads per worker process so that
    # workers x threads = cores (set in the worker processes' environment).
    per = str(max(1, _cores() // args.workers))
    env = {k: per for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                            "NUMBA_NUM_THREADS")}  # fmt: skip
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True,
            dashboard_address=None, env=env,
        ) as cluster,
        Client(cluster),
    ):  # fmt: skip
        yield


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    from volconv.dask import conv3d_zarr

    size, chunk, out_ch = args.size, args.chunk, args.out_channels
    if size < 3 or chunk < 2 or out_ch < 1:
        raise ValueError("need --size >= 3, --chunk >= 2 and --out-channels >= 1")
    base = args.workdir if args.workdir is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 4 * size**3 * (1 + out_ch)
    free = shutil.disk_usage(base).free
    if not args.compress and need > 0.95 * free:
        raise ValueError(
            f"{base} has {free / GIB:.1f} GiB free; the run writes {need / GIB:.1f} GiB "
            "(uncompressed input and output): use --workdir elsewhere or a smaller --size"
        )
    workdir = Path(tempfile.mkdtemp(prefix="volconv-ooc-", dir=base))
    rng = np.random.default_rng(args.seed)
    weight = (rng.standard_normal((out_ch, 1, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    bias = rng.standard_normal(out_ch).astype(np.float32)
    report: dict[str, Any] = {
        "size": size, "out_channels": out_ch, "chunk": chunk, "scheduler": args.scheduler,
        "workers": args.workers if args.scheduler == "distributed" else None,
        "kernel": [3, 3, 3], "padding": 1, "dtype": "float32", "compress": args.compress,
        "workdir": str(workdir), "cores": _cores(), "load_average": {"start": _load()},
    }  # fmt: skip
    try:
        with TreeMemory() as mem, _scheduler(args):
            t0 = time.perf_counter()
            src = _generate(workdir / "input.zarr", size, chunk, args.seed, args.compress)
            t1 = time.perf_counter()
            dst = conv3d_zarr(
                src, str(workdir / "output.zarr"), weight, bias, padding=1,
                **_create_kwargs(args.compress),
            )  # fmt: skip
            t2 = time.perf_counter()
        report["max_rel_err"] = _check(src, dst, weight, bias, chunk)
        report["generate_s"] = t1 - t0
        report["convolve_s"] = t2 - t1
        report["input_gib"] = 4 * size**3 / GIB
        report["output_gib"] = 4 * out_ch * size**3 / GIB
        report["gflops"] = 2 * 27 * out_ch * size**3 / (t2 - t1) / 1e9
        report["mvoxels_per_s"] = size**3 / (t2 - t1) / 1e6
        report["memory"] = mem.report()
        report["load_average"]["end"] = _load()
        report["data_kept"] = bool(args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def format_report(r: dict[str, Any]) -> str:
    m = r["memory"]
    lines = [
        f"out-of-core conv3d: 1x1x{r['size']}^3 float32 -> {r['out_channels']} channels, "
        f"3x3x3, padding 1, chunks {r['chunk']}^3, {r['scheduler']} scheduler"
        + (f" ({r['workers']} workers)" if r["workers"] else "")
        + f", {r['cores']} cores",
        f"  input {r['input_gib']:.2f} GiB, output {r['output_gib']:.2f} GiB (zarr, "
        f"{'compressed' if r['compress'] else 'uncompressed'}) in {r['workdir']}"
        + (" (kept)" if r["data_kept"] else " (deleted)"),
        f"  generate input   {r['generate_s']:8.1f} s",
        f"  convolve         {r['convolve_s']:8.1f} s   ({r['mvoxels_per_s']:.1f} Mvoxel/s, "
        f"{r['gflops']:.1f} GFLOP/s)",
        f"  peak RSS         {m['tree_peak_gib']:8.2f} GiB (process tree; this process "
        f"{m['self_peak_gib']:.2f} GiB, children {m['children_sampled_peak_gib']:.2f} GiB)",
        f"  max rel. error   {r['max_rel_err']:.2e} (3 blocks vs volconv.functional.conv3d)",
        f"  load average     {r['load_average']['start']} -> {r['load_average']['end']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``volconv bench --out-of-core [options]``: 0 if the peak RSS is under the limit."""
    args = build_parser().parse_args(argv)
    try:
        import dask.array  # noqa: F401
        import zarr  # noqa: F401

        if args.scheduler == "distributed":
            import distributed  # noqa: F401
    except ImportError as exc:
        print(f"volconv bench --out-of-core: error: {exc}; pip install "
              '"dask[array]" distributed zarr', file=sys.stderr)  # fmt: skip
        return 2
    try:
        report = run(args)
    except (ValueError, OSError) as exc:
        print(f"volconv bench --out-of-core: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    ok = report["memory"]["tree_peak_gib"] <= args.max_rss_gib and report["max_rel_err"] < 1e-4
    return 0 if ok else 1
