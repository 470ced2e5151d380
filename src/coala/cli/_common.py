"""Helpers shared by CLI commands: the ``--dtype`` argument type and plain-text tables.

Models load with ``coala.models.load_model`` (hub id, local folder, compressed folder, default MiniLM).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from coala.linalg.dtypes import parse_dtype

__all__ = ["dtype_arg", "print_table"]


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
