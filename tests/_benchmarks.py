"""Access to the benchmark scripts of the repository (``benchmarks/NAME.py``, not part of the package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` (a script or a ``_helper``) as the top-level module ``NAME``, the way the
    scripts import their siblings: with the benchmarks folder on sys.path."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
