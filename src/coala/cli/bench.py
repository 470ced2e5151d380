"""``coala bench NAME [ARGS...]``: run a benchmark of ``coala.bench`` (each also has a script in benchmarks/)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def available() -> list[str]:
    import coala.bench

    return sorted(i.name for i in pkgutil.iter_modules(coala.bench.__path__) if not i.name.startswith("_"))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints figures, writes a PNG plot and a markdown table)")
    p.add_argument("name", help="benchmark name: " + ", ".join(available()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see NAME --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; choose from {names}")
    return int(importlib.import_module(f"coala.bench.{args.name}").main(args.args) or 0)
