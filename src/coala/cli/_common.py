"""Helpers shared by CLI commands: the ``--dtype`` argument type, ``--threads``, the help formatter that shows
every default, and plain-text tables.

Models load with ``coala.models.load_model`` (hub id, local folder, compressed folder, default MiniLM).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from coala.linalg.dtypes import parse_dtype

__all__ = ["DefaultsHelpFormatter", "add_threads_argument", "default_threads", "dtype_arg", "print_table",
           "set_threads"]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option that takes a value, has a default and does not state it in its
    help already (switches and positionals say what they do in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if ("default" in help_text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):
            return help_text
        return help_text + " (default: %(default)s)"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch threads when --threads is not given: the cores that are idle now — usable cores minus the 1-minute
    load average, rounded, at least 1 and at most torch's own default (one per physical core).

    Threads on cores that other processes keep busy slow everything down (benchmarks/runtime.py, "busy": with one
    of two cores taken, two-thread GEMMs run ≈ 2× slower than one thread, a threaded SVD up to 15×); on an idle
    machine every core helps (the forward passes of calibration and evaluation scale with them). Where the load
    average is unknown: 1 on a machine with at most 2 usable cores, else torch's default."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return 1 if cores <= 2 else torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--threads N`` option of every command that computes."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the idle cores, i.e. usable cores minus the 1-minute load "
                             "average, at least 1)")


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads`` from --threads (None: ``default_threads()``); returns the count set."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be >= 1, got {threads}")
    count = threads if threads is not None else default_threads()
    torch.set_num_threads(count)
    return count


def dtype_arg(name: str) -> torch.dtype:
    """argparse type for --dtype: "float32", "bfloat16", "float16" or "float64"."""
    try:
        return parse_dtype(name, arg="--dtype")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
