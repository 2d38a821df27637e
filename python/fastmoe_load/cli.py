"""The `python -m fastmoe_load` command line."""

from __future__ import annotations

import argparse
import sys

from ._fastmoe_load import FastMoeLoadError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastmoe_load")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="compare fastmoe_load with pure-Python loading on a generated checkpoint"
    )
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    bench.add_argument("--layers", type=int, help="1.2 GB layers (default: sized for the machine)")
    bench.add_argument("--dir", help="where to generate the checkpoint (default: a temp folder)")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    bench.add_argument("--threads", type=int, help="copy threads (default: CPUs, at most 16)")
    bench.add_argument("--explore", action="store_true", help="also time other staging settings")
    bench.add_argument(
        "--cold", action="store_true", help="empty the page cache before every run (root only)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from .bench.run import main as bench

            bench(
                args.device,
                args.layers,
                args.dir,
                args.repeats,
                args.threads,
                args.explore,
                args.cold,
            )
    except FastMoeLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
