"""``Identity``: returns its input unchanged."""

from __future__ import annotations

from .module import Module

__all__ = ["Identity"]


class Identity(Module):
    """A placeholder layer that returns its input (MegEngine's ``M.Identity``).

    >>> import volconv.module as M
    >>> M.Identity()(3)
    3
    """

    def forward(self, x):
        """Return ``x`` itself."""
        return x
