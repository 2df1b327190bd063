"""Command line: ``volconv demo`` (train a 3D CNN) and ``volconv bench`` (the benchmark)."""

from __future__ import annotations

import sys

USAGE = """usage: volconv {demo,bench} [options]

  demo    train a small 3D CNN on synthetic volumes (see `volconv demo --help`)
  bench   benchmark the real-layer suite against PyTorch (see `volconv bench --help`)
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``volconv <command> [options]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from . import demo

        return demo.main(rest)
    if command == "bench":
        from . import bench

        return bench.main(rest)
    print(f"volconv: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
