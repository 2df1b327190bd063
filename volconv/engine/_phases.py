"""Polyphase split of a dilated stride-1 convolution into undilated ones.

Along an axis with dilation ``d`` (stride 1), output ``z`` reads the inputs
``z + d*a - lo`` for taps ``a``: all congruent to ``z - lo`` modulo ``d``. Writing
``z = d*z' + r``, the outputs of phase ``r`` see only the input phase
``s = (r - lo) mod d`` (samples ``x[d*j + s]``), through the *undilated* kernel:

    y[d*z' + r] = sum_a w[a] x_s[z' + a + q],   q = (r - lo - s) / d

which is a stride-1, dilation-1 convolution of ``x_s`` with padding ``lo' = -q``.
In 3-D the ``dd*dh*dw`` phase combinations are independent convolutions with the
same weight: each can take an algorithm that needs dilation 1 (Winograd), and the
weight gradient is the sum of theirs. The phase copies hold ``1/(dd*dh*dw)`` of the
input and output, so :func:`split` is used only where they fit the workspace cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .. import config
from ._args import ConvGeometry, conv_geometry
from ._lock import ENGINE_LOCK


@dataclass(frozen=True)
class Phase:
    """One phase combination: where it sits in ``x`` and ``y``, and its convolution.

    ``geom`` is None when the phase's input is empty (every tap reads padding: its
    outputs are zero and it adds nothing to the weight gradient).
    """

    x_index: tuple[slice, slice, slice, slice, slice]
    y_index: tuple[slice, slice, slice, slice, slice]
    geom: ConvGeometry | None


def _axis_phases(size: int, k: int, d: int, lo: int, out: int) -> list:
    """``(input slice, output slice, input length, (lo', hi'))`` per non-empty output phase."""
    phases = []
    for r in range(min(d, out)):
        n_out = len(range(r, out, d))
        s = (r - lo) % d
        q = (r - lo - s) // d
        n_in = len(range(s, size, d))
        lo2 = -q
        hi2 = n_out - n_in - lo2 + k - 1
        phases.append((slice(s, None, d), slice(r, None, d), n_in, (lo2, hi2)))
    return phases


def split(geom: ConvGeometry) -> list[Phase]:
    """The phase convolutions of a stride-1 ``geom`` (one phase per axis where d = 1)."""
    assert geom.stride == (1, 1, 1)
    per_axis = [
        _axis_phases(n, k, d, lo, out)
        for n, k, d, (lo, _), out in zip(
            geom.spatial_in, geom.kernel, geom.dilation, geom.pads, geom.spatial_out, strict=True
        )
    ]
    phases = []
    everything = slice(None)
    for pd in per_axis[0]:
        for ph in per_axis[1]:
            for pw in per_axis[2]:
                axes = (pd, ph, pw)
                x_index = (everything, everything, *(a[0] for a in axes))
                y_index = (everything, everything, *(a[1] for a in axes))
                sub = None
                if min(a[2] for a in axes) > 0:
                    sub = conv_geometry(
                        (geom.N, geom.C, *(a[2] for a in axes)),
                        geom.w_shape,
                        (1, 1, 1),
                        tuple(a[3] for a in axes),
                        (1, 1, 1),
                        geom.G,
                    )
                phases.append(Phase(x_index, y_index, sub))  # type: ignore[arg-type]
    return phases


def copies_bytes(geom: ConvGeometry, itemsize: int) -> int:
    """Bytes of the largest phase's input and output copies."""
    largest_in = largest_out = 1
    for n, out, d in zip(geom.spatial_in, geom.spatial_out, geom.dilation, strict=True):
        largest_in *= -(-n // d)
        largest_out *= -(-out // d)
    return itemsize * geom.N * (geom.C * largest_in + geom.O * largest_out)


@contextmanager
def reduced_cap(nbytes: int) -> Iterator[None]:
    """Lower ``config.workspace_bytes`` by ``nbytes`` (the phase copies) for the phase
    convolutions, so that copies plus their workspaces respect the caller's cap."""
    with ENGINE_LOCK:  # re-entrant; keeps a concurrent engine call from seeing the lower cap
        saved = config.workspace_bytes
        config.workspace_bytes = saved - nbytes
        try:
            yield
        finally:
            config.workspace_bytes = saved


@dataclass(frozen=True)
class Split:
    """A planned split: its phases, and the bytes of the largest phase's copies that the
    phase convolutions' cap is lowered by (:func:`reduced_cap`)."""

    phases: list[Phase]
    copies: int

    def reduced_cap(self):
        """The workspace cap the phase convolutions run under."""
        return reduced_cap(self.copies)
