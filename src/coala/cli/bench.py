"""``coala bench [NAME [ARGS...]]``: a thin launcher for the benchmark scripts ``benchmarks/NAME.py``.

The benchmarks are not part of the package: they live in the source repository's ``benchmarks/`` folder and run
as ``python benchmarks/NAME.py [ARGS]``. This command finds that folder (next to ``src/`` of the checkout coala is
imported from, else ``./benchmarks``), and runs the script in this process with ``runpy`` as ``__main__``:
nothing of the benchmarks is imported before a run is asked for. ``coala bench`` alone lists the names.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

from coala.cli._common import DefaultsHelpFormatter

MISSING = ("benchmarks live in the source repository, not in the installed package: clone it and run "
           "python benchmarks/NAME.py (looked in {places})")


def candidate_dirs() -> list[Path]:
    """Where the benchmarks may be: the checkout coala is imported from (src layout), then ./benchmarks."""
    import coala

    package = Path(coala.__file__).resolve().parent  # .../src/coala
    return [package.parents[1] / "benchmarks", Path.cwd() / "benchmarks"]


def benchmarks_dir() -> Path | None:
    """The first candidate folder that holds at least one benchmark script, or None."""
    for d in candidate_dirs():
        if d.is_dir() and names_in(d):
            return d
    return None


def names_in(folder: Path) -> list[str]:
    """Benchmark names in ``folder``: its ``NAME.py`` files, helpers (``_*.py``) left out."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _require_dir() -> Path:
    """``benchmarks_dir()``, or FileNotFoundError saying where benchmarks live and where it looked."""
    folder = benchmarks_dir()
    if folder is None:
        places = ", ".join(str(d) for d in candidate_dirs())
        raise FileNotFoundError(MISSING.format(places=places))
    return folder


def add_parser(sub: Any) -> None:
    """Register ``coala bench`` on the ``coala`` sub-command parsers ``sub``."""
    p = sub.add_parser("bench", help="run a benchmark script of the source checkout (benchmarks/NAME.py)",
                       description="Run benchmarks/NAME.py of the source checkout with ARGS; without NAME, list "
                                   "the benchmarks.", formatter_class=DefaultsHelpFormatter)
    p.add_argument("name", nargs="?", default=None, help="benchmark name (omit it to list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script (see NAME --help)")
    p.set_defaults(func=run)


def run_script(script: Path, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]``; returns its exit status."""
    saved = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)  # sys.exit("message") convention
        return 1
    finally:
        sys.argv = saved
    return 0


def run(args: argparse.Namespace) -> int:
    """List the benchmarks (no NAME) or run ``benchmarks/NAME.py`` with the remaining arguments."""
    folder = _require_dir()
    names = names_in(folder)
    if args.name is None:
        print(f"benchmarks in {folder}: {', '.join(names)}\nrun one: coala bench NAME [--quick] [--help]")
        return 0
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; available in {folder}: {', '.join(names)}")
    return run_script(folder / f"{args.name}.py", list(args.args))
