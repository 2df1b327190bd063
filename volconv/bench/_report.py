"""Derived numbers (rates, ratios, errors) and the markdown report."""

from __future__ import annotations

import math
from typing import Any

#: Table columns: (header, key in the row dict, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("layer", "name", "s"),
    ("algo", "algorithm", "s"),
    ("fwd ms", "fwd_ms", "ms"),
    ("fwd GF/s", "fwd_gflops", ".1f"),
    ("fwd %pk", "fwd_pct_peak", ".0f"),
    ("torch fwd ms", "torch_fwd_ms", "ms"),
    ("fwd x", "fwd_ratio", ".2f"),
    ("bwd ms", "bwd_ms", "ms"),
    ("bwd GF/s", "bwd_gflops", ".1f"),
    ("bwd %pk", "bwd_pct_peak", ".0f"),
    ("torch bwd ms", "torch_bwd_ms", "ms"),
    ("bwd x", "bwd_ratio", ".2f"),
    ("step x", "step_ratio", ".2f"),
    ("fwd MiB", "fwd_mib", ".1f"),
    ("torch fwd MiB", "torch_fwd_mib", ".1f"),
    ("bwd MiB", "bwd_mib", ".1f"),
    ("torch bwd MiB", "torch_bwd_mib", ".1f"),
    ("rel.err vs torch", "rel_err", ".1e"),
)


def _median(side: dict[str, Any] | None, phase: str) -> float | None:
    """Median seconds of one phase, or None if it did not run."""
    if not side or not isinstance(side.get(phase), dict) or "median_s" not in side[phase]:
        return None
    return side[phase]["median_s"]


def _peak_mib(side: dict[str, Any] | None, phase: str) -> float | None:
    if not side or not isinstance(side.get(phase), dict) or "memory" not in side[phase]:
        return None
    return side[phase]["memory"]["peak_mib"]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def rel_errors(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, float]:
    """Max abs difference on the shared samples, relative to torch's max abs value.

    Parameters
    ----------
    ours, theirs : dict or None
        ``{"forward": record, "backward": record}`` of volconv and torch; each record
        has ``outputs`` mapping ``y``/``dx``/``dw``/``db`` to a sample summary.

    Returns
    -------
    dict
        Relative error per output name that both sides produced.
    """
    errors: dict[str, float] = {}
    for phase in ("forward", "backward"):
        a = (ours or {}).get(phase) or {}
        b = (theirs or {}).get(phase) or {}
        for name, sa in a.get("outputs", {}).items():
            sb = b.get("outputs", {}).get(name)
            if sb is None or len(sa["sample"]) != len(sb["sample"]) or not sa["sample"]:
                continue
            diff = max(abs(u - v) for u, v in zip(sa["sample"], sb["sample"], strict=True))
            errors[name] = diff / max(sb["max_abs"], 1e-30)
    return errors


def derive(record: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """Table row of one layer: times in ms, GFLOP/s, % of peak, ratios, memory.

    Parameters
    ----------
    record : dict
        Layer record with ``flops_fwd``, ``flops_bwd``, ``volconv`` and ``torch``.
    peak_gflops : float or None
        numpy sgemm peak of this run.

    Returns
    -------
    dict
        Keys of :data:`COLUMNS` (None where a number is unavailable).
    """
    ours, theirs = record.get("volconv"), record.get("torch")
    fwd, bwd = _median(ours, "forward"), _median(ours, "backward")
    tfwd, tbwd = _median(theirs, "forward"), _median(theirs, "backward")
    row: dict[str, Any] = {
        "name": record["name"],
        "algorithm": ((ours or {}).get("forward") or {}).get("algorithm") or "",
        "fwd_ms": None if fwd is None else fwd * 1e3,
        "bwd_ms": None if bwd is None else bwd * 1e3,
        "torch_fwd_ms": None if tfwd is None else tfwd * 1e3,
        "torch_bwd_ms": None if tbwd is None else tbwd * 1e3,
        "fwd_gflops": _ratio(record["flops_fwd"] / 1e9, fwd),
        "bwd_gflops": _ratio(record["flops_bwd"] / 1e9, bwd),
        "fwd_ratio": _ratio(tfwd, fwd),
        "bwd_ratio": _ratio(tbwd, bwd),
        "step_ratio": None,
        "fwd_mib": _peak_mib(ours, "forward"),
        "bwd_mib": _peak_mib(ours, "backward"),
        "torch_fwd_mib": _peak_mib(theirs, "forward"),
        "torch_bwd_mib": _peak_mib(theirs, "backward"),
    }
    if None not in (fwd, bwd, tfwd, tbwd):
        row["step_ratio"] = (tfwd + tbwd) / (fwd + bwd)
    for phase in ("fwd", "bwd"):
        rate = row[f"{phase}_gflops"]
        row[f"{phase}_pct_peak"] = _ratio(100 * rate, peak_gflops) if rate is not None else None
    errors = record.get("rel_err") or {}
    row["rel_err"] = max(errors.values()) if errors else None
    return row


def geomeans(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Geometric means of the torch ratios over the layers where both sides ran."""
    result: dict[str, float | None] = {}
    for key, label in (("fwd_ratio", "forward"), ("bwd_ratio", "backward"), ("step_ratio", "step")):
        values = [r[key] for r in rows if r.get(key)]
        result[label] = math.exp(sum(map(math.log, values)) / len(values)) if values else None
        result[f"{label}_layers"] = len(values)
    return result


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if fmt == "s":
        return str(value)
    if fmt == "ms":
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return format(value, fmt)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """GitHub markdown table of the rows (``n/a`` for missing numbers, ``ERR`` marked)."""
    lines = [
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if f == "s" else "--:" for _, _, f in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [_cell(row.get(key), fmt) for _, key, fmt in COLUMNS]
        if row.get("error"):
            cells[0] += " (ERR)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _busy_warning(result: dict[str, Any]) -> list[str]:
    """A warning line when the 1-minute load average exceeded the thread count + 1."""
    loads = [v[0] for v in (result.get("load_average") or {}).values() if v]
    if loads and max(loads) > result["threads"] + 1:
        return [
            f"- **warning: the machine was busy (load average up to {max(loads):.1f} with "
            f"{result['threads']} benchmark threads); timings and ratios are unreliable**"
        ]
    return []


def _rounds(result: dict[str, Any]) -> str:
    """How the rounds were combined, for the report header ("" for one round)."""
    rounds = result.get("rounds", 1)
    return f", median round of {rounds} (volconv and torch alternating)" if rounds > 1 else ""


_SHORT = {"forward": "fwd", "backward": "bwd"}


def round_table(result: dict[str, Any]) -> list[str]:
    """Every round's median per layer, library and phase (ms; volconv and torch side by
    side), as markdown lines; none for a one-round run."""
    if result.get("rounds", 1) <= 1:
        return []
    sides = [("volconv", "forward"), ("torch", "forward"), ("volconv", "backward")]
    sides.append(("torch", "backward"))
    lines = [
        "## Every round's median (ms; the table above reports each phase's median round)",
        "",
        "| layer | " + " | ".join(f"{lib} {_SHORT[phase]}" for lib, phase in sides) + " |",
        "|---" * (len(sides) + 1) + "|",
    ]
    for layer in result.get("layers", []):
        cells = []
        for lib, phase in sides:
            medians = ((layer.get(lib) or {}).get(phase) or {}).get("round_medians_s") or []
            cells.append(" / ".join(f"{1e3 * t:.0f}" for t in medians) or "n/a")
        lines.append(f"| {layer['name']} | " + " | ".join(cells) + " |")
    return ["", *lines]


def _cap(result: dict[str, Any]) -> str:
    """The run's workspace cap, in MiB (the library default when not set)."""
    cap = result.get("workspace_bytes")
    return "default" if not cap else f"{cap / (1 << 20):g} MiB"


def markdown_report(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Whole markdown report: header lines, table, geometric means, errors, legend."""
    machine = result.get("machine") or {}
    sgemm = (machine.get("sgemm") or {}).get("gflops")
    torch = result.get("torch") or {}
    runs = machine.get("sgemm_runs") or [machine.get("sgemm") or {}]
    probes = "/".join(f"{r.get('gflops', 0):.0f}" for r in runs)
    load = {k: v or ["?"] for k, v in (result.get("load_average") or {}).items()}
    mode = "QUICK: N=1, spatial sizes halved, 1 repeat" if result["quick"] else "full suite"
    lines = [
        f"# volconv bench: {mode}",
        "",
        f"- {result['created']}; {machine.get('cpu_model', '?')}, "
        f"{machine.get('cpu_count', '?')} CPUs; threads={result['threads']}",
        f"- numpy {machine.get('versions', {}).get('numpy', '?')}; numpy sgemm peak "
        + (f"{sgemm:.1f} GFLOP/s" if sgemm else "n/a")
        + f" (float32 {machine.get('sgemm', {}).get('n', '?')}^3, best of 5; "
        + f"probes at start/end of this run: {probes} GFLOP/s); load average (1 min) "
        + f"at start/end: {load.get('start', ['?'])[0]}/{load.get('end', ['?'])[0]}",
        f"- torch: {torch.get('torch', 'n/a (not run)')}; "
        f"algorithm: {result['algorithm'] or 'chooser'}; "
        f"workspace cap: {_cap(result)}; "
        f"times: median of {result['repeats']} after 1 warm-up{_rounds(result)}; "
        f"seed {result['seed']}",
        *_busy_warning(result),
        "",
        markdown_table(rows),
        "",
    ]
    gm = result.get("geomean") or {}
    if gm.get("forward") is not None:
        lines.append(
            f"Geometric mean of torch_time / volconv_time (> 1: volconv faster): "
            f"forward {gm['forward']:.2f}x ({gm['forward_layers']} layers), "
            f"backward {gm['backward']:.2f}x ({gm['backward_layers']}), "
            f"training step {gm['step']:.2f}x ({gm['step_layers']})."
            if gm.get("backward") is not None and gm.get("step") is not None
            else f"Geometric mean forward ratio {gm['forward']:.2f}x."
        )
        lines.append("")
    errors = [(r["name"], r["error"]) for r in rows if r.get("error")]
    for name, text in errors:
        lines.append(f"- **{name}**: {text}")
    if errors:
        lines.append("")
    lines.append(
        "Columns: ms = median wall time; GF/s = nominal flops (2*N*Cout*Do*Ho*Wo*Cin/G*k^3, "
        "x2 for bwd = dx+dw) / time; %pk = GF/s / sgemm peak; x = torch ms / volconv ms; "
        "step = fwd+bwd; MiB = peak RSS of the timed calls above a baseline taken after the "
        "warm-up (inputs allocated, fresh process); rel.err = max |volconv - torch| / "
        "max |torch| over y, dx, dw, db samples."
    )
    lines.extend(round_table(result))
    return "\n".join(lines) + "\n"
