"""Shared output of the benchmarks: an output folder, markdown tables and files. Figures and the machine line
come from coala's public ``coala.plotting`` (re-exported here for the scripts)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from coala.plotting import machine, new_figure

__all__ = ["machine", "markdown_table", "new_figure", "out_dir", "write_markdown"]


def out_dir(path: str | os.PathLike | None, name: str) -> Path:
    """The folder results go to (default: ./results/NAME), created."""
    d = Path(path) if path else Path("results") / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits unless already strings."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, table: str, notes: str = "") -> None:
    """``# title``, the table, optional notes and the machine line, written to ``path``."""
    text = f"# {title}\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    text += f"\nMachine: {machine()}\n"
    path.write_text(text)
