"""Shared output of benchmarks: markdown tables, PNG plots, an output folder, machine description."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch


def out_dir(path: str | os.PathLike | None, name: str) -> Path:
    """The folder results go to (default: ./results/NAME), created."""
    d = Path(path) if path else Path("results") / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine() -> str:
    """One line describing where the figures came from."""
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {dev}")


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
    text = f"# {title}\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    text += f"\nMachine: {machine()}\n"
    path.write_text(text)


def new_figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
