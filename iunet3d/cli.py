"""The ``iunet3d`` command line (also ``python -m iunet3d``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iunet3d", description="Memory-efficient training of deep invertible 3D U-Nets on CT volumes."
    )
    from iunet3d import __version__

    parser.add_argument("--version", action="version", version=f"iunet3d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks that print side-by-side tables")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    from iunet3d.bench import memory

    memory_parser = benchmarks.add_parser(
        "memory", help="conventional vs reversible peak training memory and step time over depth"
    )
    memory.add_arguments(memory_parser)
    memory_parser.set_defaults(handler=memory.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # user errors: one clear line, no traceback
        parser.exit(2, f"iunet3d: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
