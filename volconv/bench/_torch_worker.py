"""One benchmark phase of PyTorch in a fresh process (standalone: torch + numpy only).

Run by file path with any interpreter that has torch, possibly a virtual environment
without volconv: ``TORCH_PYTHON .../volconv/bench/_torch_worker.py SPEC_JSON OUT_PATH``.
It imports its sibling ``_common.py`` as a top-level module (the script's directory is
``sys.path[0]``), so both libraries get byte-identical seeded inputs.

Phases
------
``info``
    torch version and CPU backend facts.
``forward``
    ``conv3d(x, w, b)`` under ``torch.no_grad()`` (inference, as volconv's forward).
``backward``
    one forward with ``requires_grad`` on ``x``, ``w`` and ``b`` outside the timed
    window, then ``y.backward(dy, retain_graph=True)`` timed; gradients are reset to
    ``None`` before each call (untimed) so every call computes ``dx``, ``dw`` and ``db``
    afresh (no accumulation), as volconv's backward does.
"""

from __future__ import annotations

import sys
from typing import Any

import _common  # sibling module; see the module docstring
import numpy as np
import torch
import torch.nn.functional as F


def _info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "config": torch.__config__.show(),
    }


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, layer: dict[str, Any]):
    return F.conv3d(
        x,
        w,
        b,
        stride=tuple(layer["stride"]),
        padding=tuple(layer["padding"]),
        dilation=tuple(layer["dilation"]),
        groups=layer["groups"],
    )


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one phase of one layer with torch.

    Parameters
    ----------
    spec : dict
        ``phase``, ``layer``, ``repeats``, ``seed`` (as for the volconv worker).

    Returns
    -------
    dict
        The timing record of ``_common.phase_record`` plus ``phase``.
    """
    layer = spec["layer"]
    arrays = _common.make_inputs(layer, spec["seed"])
    x, w, b, dy = (torch.from_numpy(arrays[k]) for k in ("x", "w", "b", "dy"))

    if spec["phase"] == "forward":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return _conv(x, w, b, layer)

        timing = _common.time_calls(forward, spec["repeats"])
        outputs = {"y": timing["result"].numpy()}
    else:
        for t in (x, w, b):
            t.requires_grad_(True)
        y = _conv(x, w, b, layer)

        def drop_grads() -> None:
            x.grad = w.grad = b.grad = None

        def backward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            y.backward(dy, retain_graph=True)
            return x.grad, w.grad, b.grad

        timing = _common.time_calls(backward, spec["repeats"], before=drop_grads)
        grads = (g.numpy() for g in timing["result"])
        outputs = dict(zip(("dx", "dw", "db"), grads, strict=True))
    record = _common.phase_record(timing, outputs)
    record["phase"] = spec["phase"]
    return record


def main() -> int:
    """Entry point of the torch worker process."""
    spec, out_path = _common.read_spec(sys.argv[1:])
    torch.set_num_threads(int(spec["threads"]))
    record = _info() if spec["phase"] == "info" else run_phase(spec)
    _common.write_result(out_path, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
