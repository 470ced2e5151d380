"""The one table of dtype names coala accepts, and ``parse_dtype`` to turn a name into a ``torch.dtype``.

It lives in ``coala.linalg`` (the bottom layer: pure tensor maths) because the streaming R factor already needs
the accumulation dtypes; every layer above imports it from here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ACCUMULATION_DTYPES", "DTYPES", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
"""Model / weight dtypes by name (``--dtype`` of the command line, ``dtype=`` of ``coala.models.load_model``)."""

ACCUMULATION_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
"""Dtypes the statistics (R factors, Gram matrices) and the LoRA solves accumulate in."""


def parse_dtype(
    name: str | torch.dtype | None, *, allowed: Iterable[str] | None = None, arg: str = "dtype"
) -> torch.dtype | None:
    """The ``torch.dtype`` named ``name`` ("float32", "bfloat16", "float16", "float64").

    Args:
        name: a dtype name, a ``torch.dtype`` (returned as is when allowed), or None (returned as None: "as stored").
        allowed: the names accepted (default: all of ``DTYPES``), e.g. ``ACCUMULATION_DTYPES``.
        arg: the argument's name for the error message (e.g. "--dtype", "stats_dtype").

    Raises ValueError "{arg} must be one of [...], got ..." for any other name or dtype.
    """
    if name is None:
        return None
    names = sorted(DTYPES if allowed is None else allowed)
    if isinstance(name, torch.dtype):
        if str(name).removeprefix("torch.") not in names:
            raise ValueError(f"{arg} must be one of {names}, got {name}")
        return name
    if not isinstance(name, str) or name not in names or name not in DTYPES:
        raise ValueError(f"{arg} must be one of {names}, got {name!r}")
    return DTYPES[name]
