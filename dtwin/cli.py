"""The ``dtwin`` command. Each command group is a module of :mod:`dtwin.commands`; they import their
heavy dependencies lazily, so the controller side runs without torch installed."""

from __future__ import annotations

import argparse
import sys

from dtwin.commands import bench as bench_loop
from dtwin.commands import broker, controller, export, forecast, model, replay, swapbench, up, whatif
from dtwin.commands import recovery as bench_recovery
from forecaster.data import DatasetError

COMMAND_GROUPS = (forecast, export, broker, replay, controller, up, model, whatif, bench_loop, bench_recovery,
                  swapbench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtwin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DatasetError as exc:
        print(f"dtwin {args.command}: dataset error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
