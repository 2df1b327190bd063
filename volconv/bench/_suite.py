"""The real-layer suite: loading, selecting and shrinking layers for ``--quick``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUITE_PATH = Path(__file__).with_name("suite.json")

_REQUIRED = (
    "name", "N", "Cin", "Cout", "D", "H", "W", "kernel", "stride", "padding", "dilation", "groups"
)  # fmt: skip


def load_suite(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read a suite file (a JSON list of layers).

    Parameters
    ----------
    path : str or Path, optional
        Suite file; defaults to the packaged ``suite.json``.

    Returns
    -------
    list of dict
        Layers with ``kernel``, ``stride``, ``padding`` and ``dilation`` as 3-lists.

    Raises
    ------
    ValueError
        If a layer lacks a field or a name repeats.
    """
    with open(SUITE_PATH if path is None else path, encoding="utf-8") as fh:
        layers = json.load(fh)
    names = set()
    for layer in layers:
        missing = [k for k in _REQUIRED if k not in layer]
        if missing:
            raise ValueError(f"suite layer {layer.get('name', '?')!r} lacks {missing}")
        if layer["name"] in names:
            raise ValueError(f"suite layer name {layer['name']!r} appears twice")
        names.add(layer["name"])
        for key in ("kernel", "stride", "padding", "dilation"):
            value = layer[key]
            layer[key] = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    return layers


def select(layers: list[dict[str, Any]], names: str | None) -> list[dict[str, Any]]:
    """Layers named in a comma-separated list, in the list's order (all if None).

    Raises
    ------
    ValueError
        If a name is not in the suite.
    """
    if not names:
        return layers
    by_name = {layer["name"]: layer for layer in layers}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; the suite has {sorted(by_name)}")
    return [by_name[n] for n in wanted]


def shrink(layer: dict[str, Any]) -> dict[str, Any]:
    """The ``--quick`` version of a layer: N=1 and each spatial size halved.

    A halved size never drops below the dilated kernel extent, so every output
    size stays >= 1 and the padding/stride structure of the layer is kept.

    Parameters
    ----------
    layer : dict
        A suite layer.

    Returns
    -------
    dict
        A copy with ``N``, ``D``, ``H``, ``W`` reduced and ``quick`` set to True.
    """
    small = dict(layer, N=1, quick=True)
    for axis, key in enumerate(("D", "H", "W")):
        extent = layer["dilation"][axis] * (layer["kernel"][axis] - 1) + 1
        small[key] = max(layer[key] // 2, extent, 1)
    return small
