"""Small helpers for figures and reports: a one-line machine description and a matplotlib figure.

matplotlib is optional (``pip install 'coala[plot]'``): it is imported only when ``new_figure`` is called.
Figures are created without pyplot (``matplotlib.figure.Figure``): no backend is selected and no global state
changes, nothing stays registered in pyplot's figure manager, and ``savefig`` to a PNG renders with Agg
(headless, no display needed).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

PLOT_EXTRA_HINT = "pip install 'coala[plot]' (or matplotlib)"


def machine() -> str:
    """One line describing where figures came from: OS, CPU, core count, torch version and threads, GPU."""
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {dev}")


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
               **subplots_kwargs: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` like ``matplotlib.pyplot.subplots``, but headless and outside pyplot.

    ``subplots_kwargs`` go to ``Figure.subplots`` (``sharex``, ``sharey``, ``squeeze``, ...). Raises
    ImportError with an install hint when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plots need matplotlib: {PLOT_EXTRA_HINT}") from err
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots_kwargs)
