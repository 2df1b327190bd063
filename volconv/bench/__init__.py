"""Benchmark of volconv's conv3d against PyTorch on real 3D-CNN layers.

Run ``python -m volconv.bench --help`` (or ``volconv bench --help``). Each layer of
``suite.json`` is timed forward and backward (``dx + dw + db``), each phase and each
library in a fresh process, so that peak memory above the baseline is per layer.
See ``bench/README.md`` in the repository for the columns of the report.
"""

from __future__ import annotations

from ._run import build_parser, main

__all__ = ["build_parser", "main"]
