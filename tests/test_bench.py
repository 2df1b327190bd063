"""Smoke tests of the benchmark harness (``python -m volconv.bench``), on tiny layers."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

from volconv.bench import _report, _run, _suite, main

TINY = [
    {
        "name": "tiny_dense",
        "N": 2, "Cin": 2, "Cout": 3, "D": 5, "H": 6, "W": 7,
        "kernel": [3, 3, 3], "stride": [1, 1, 1], "padding": [1, 1, 1],
        "dilation": [1, 1, 1], "groups": 1,
    },
    {
        "name": "tiny_grouped_strided",
        "N": 1, "Cin": 4, "Cout": 4, "D": 6, "H": 6, "W": 6,
        "kernel": [3, 3, 3], "stride": [2, 2, 2], "padding": [1, 1, 1],
        "dilation": [1, 1, 1], "groups": 2,
    },
]  # fmt: skip

RECORD_KEYS = {"name", "layer", "flops_fwd", "flops_bwd", "volconv", "torch", "rel_err", "derived"}
TOP_KEYS = {
    "format", "created", "quick", "threads", "repeats", "rounds", "statistic", "seed", "algorithm",
    "workspace_bytes", "machine", "torch", "layers", "geomean", "elapsed_s",
}  # fmt: skip


@pytest.fixture()
def tiny_suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(TINY), encoding="utf-8")
    return path


def _run_bench(tmp_path: Path, suite: Path, *extra: str) -> tuple[int, dict, str]:
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    argv = [
        "--suite", str(suite), "--json", str(out_json), "--markdown", str(out_md),
        "--sgemm-size", "128", "--threads", "1", "--timeout", "120", *extra,
    ]  # fmt: skip
    code = main(argv)
    assert out_json.exists() and out_md.exists()
    return code, json.loads(out_json.read_text()), out_md.read_text()


def test_quick_no_torch_writes_json_and_markdown(tmp_path, tiny_suite, capsys):
    code, result, md = _run_bench(
        tmp_path, tiny_suite, "--quick", "--no-torch", "--layers", "tiny_dense"
    )
    assert code == 0
    assert TOP_KEYS <= result.keys()
    assert result["quick"] is True and result["repeats"] == 1 and result["torch"] is None
    assert (
        result["rounds"] == 1 and "round_medians_s" not in result["layers"][0]["volconv"]["forward"]
    )
    assert "Every round" not in md
    assert result["machine"]["sgemm"]["gflops"] > 0
    assert [r["name"] for r in result["layers"]] == ["tiny_dense"]
    for record in result["layers"]:
        assert RECORD_KEYS <= record.keys()
        assert record["layer"]["N"] == 1  # shrunk by --quick
        for phase in ("forward", "backward"):
            rec = record["volconv"][phase]
            assert len(rec["times_s"]) == 1 and rec["median_s"] > 0
            assert rec["memory"]["peak_mib"] >= 0
        assert set(record["volconv"]["backward"]["outputs"]) == {"dx", "dw", "db"}
        assert record["derived"]["fwd_gflops"] > 0 and record["derived"]["fwd_ratio"] is None
    assert "QUICK" in md and "| tiny_dense |" in md and "n/a" in md
    assert "| tiny_dense |" in capsys.readouterr().out


def test_layers_selects_and_repeats(tmp_path, tiny_suite):
    code, result, md = _run_bench(
        tmp_path, tiny_suite, "--layers", "tiny_grouped_strided", "--repeats", "2", "--no-torch"
    )
    assert code == 0 and not result["quick"]
    assert [r["name"] for r in result["layers"]] == ["tiny_grouped_strided"]
    assert len(result["layers"][0]["volconv"]["forward"]["times_s"]) == 2
    assert "tiny_dense" not in md


def _in_process(cmd, spec, env, timeout):
    """``run_worker`` without a subprocess: the worker's main in this process."""
    from volconv.bench import _worker

    out = Path(tempfile.mkdtemp()) / "result.json"
    assert _worker.main([json.dumps(spec), str(out)]) == 0
    return json.loads(out.read_text())


def test_workspace_cap_reaches_the_workers(tmp_path, tiny_suite, monkeypatch, workspace):
    """``--workspace-mib`` sets the workers' cap (seen by a spy on run_phase, which the
    worker runs in this process here) and is recorded in the JSON and the report."""
    from volconv.bench import _worker

    seen = []
    real = _worker.run_phase

    def spy(spec):
        record = real(spec)
        import volconv

        seen.append(volconv.config.workspace_bytes)
        return record

    monkeypatch.setattr(_worker, "run_phase", spy)
    monkeypatch.setattr(_run, "run_worker", _in_process)
    code, result, md = _run_bench(
        tmp_path, tiny_suite, "--quick", "--no-torch", "--layers", "tiny_dense",
        "--workspace-mib", "1.5",
    )  # fmt: skip
    assert code == 0 and result["workspace_bytes"] == 3 << 19
    assert seen == [3 << 19, 3 << 19]  # forward and backward
    assert "workspace cap: 1.5 MiB" in md


def test_rounds_alternate_the_libraries_and_report_the_median(tmp_path, tiny_suite, monkeypatch):
    """``--rounds 3``: every phase runs three times, volconv and the peer alternating
    (here a stand-in peer: the volconv worker itself, in this process), and each phase
    reports its median round, with every round's median kept in the JSON."""
    calls = []

    def counting(cmd, spec, env, timeout):
        calls.append((cmd[0], spec["phase"]))
        if spec["phase"] == "info":
            return {"torch": "stand-in"}
        return _in_process(cmd, spec, env, timeout)

    monkeypatch.setattr(_run, "run_worker", counting)
    code, result, md = _run_bench(
        tmp_path, tiny_suite, "--quick", "--layers", "tiny_dense", "--rounds", "3",
        "--torch-python", "peer-python",
    )  # fmt: skip
    assert code == 0 and result["rounds"] == 3 and "median round of 3" in md
    forwards = [cmd for cmd, phase in calls if phase == "forward"]
    assert forwards == [sys.executable, "peer-python"] * 3
    for lib in ("volconv", "torch"):
        for phase in ("forward", "backward"):
            rec = result["layers"][0][lib][phase]
            assert len(rec["round_medians_s"]) == 3
            assert rec["median_s"] == sorted(rec["round_medians_s"])[1]
    # the report lists every round's median: ms, " / "-separated, in round order
    row = [line for line in md.splitlines() if line.startswith("| tiny_dense | ")][-1]
    fwd = result["layers"][0]["volconv"]["forward"]["round_medians_s"]
    assert "## Every round's median" in md
    assert row.split(" | ")[1] == " / ".join(f"{1e3 * t:.0f}" for t in fwd)


def test_rounds_below_one_is_a_usage_error(tiny_suite, capsys):
    assert main(["--suite", str(tiny_suite), "--rounds", "0", "--no-torch"]) == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err


def test_median_round_of_failures_and_even_counts():
    assert _run.median_round([{"median_s": 2.0}, {"error": "boom"}]) == {"error": "boom"}
    two = _run.median_round([{"median_s": 2.0}, {"median_s": 1.0}])
    assert two["median_s"] == 1.0 and two["round_medians_s"] == [2.0, 1.0]


def test_unknown_layer_is_a_usage_error(tmp_path, tiny_suite, capsys):
    assert main(["--suite", str(tiny_suite), "--layers", "nope", "--no-torch"]) == 2
    assert "unknown layer" in capsys.readouterr().err


def test_packaged_suite_and_shrink():
    layers = _suite.load_suite()
    assert len(layers) >= 10
    for layer in layers:
        small = _suite.shrink(layer)
        assert small["N"] == 1 and small["quick"]
        for axis, key in enumerate("DHW"):
            extent = layer["dilation"][axis] * (layer["kernel"][axis] - 1) + 1
            assert extent <= small[key] <= max(layer[key], extent)


def test_geomeans_and_table():
    rows = [{"name": "a", "fwd_ratio": 2.0, "bwd_ratio": 0.5, "step_ratio": 1.0},
            {"name": "b", "fwd_ratio": 8.0, "bwd_ratio": 2.0, "step_ratio": None}]  # fmt: skip
    gm = _report.geomeans(rows)
    assert gm["forward"] == pytest.approx(4.0) and gm["backward"] == pytest.approx(1.0)
    assert gm["step"] == pytest.approx(1.0) and gm["step_layers"] == 1
    assert _report.markdown_table(rows).count("\n") == 3


def _torch_python() -> str | None:
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return str(_run.TORCH_VENV_PYTHON) if _run.TORCH_VENV_PYTHON.exists() else None


@pytest.mark.slow
def test_torch_cross_check(tmp_path, tiny_suite):
    torch_python = _torch_python()
    if torch_python is None:
        pytest.skip("no interpreter with torch")
    code, result, md = _run_bench(
        tmp_path, tiny_suite, "--quick", "--layers", "tiny_grouped_strided",
        "--torch-python", torch_python,
    )  # fmt: skip
    assert code == 0 and result["torch"]["torch"]
    record = result["layers"][0]
    assert set(record["rel_err"]) == {"y", "dx", "dw", "db"}
    assert max(record["rel_err"].values()) < 1e-5
    assert record["derived"]["step_ratio"] > 0
    assert "Geometric mean" in md
