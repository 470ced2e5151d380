"""Input validation shared by the numerical core.

Every check raises a ``coala.CoalaError`` (a ValueError; ``CoalaTypeError`` for a wrong type, also a TypeError)
whose message says what is wrong and where (``where`` is a layer or argument name supplied by the caller), with
``argument`` and ``layer`` set. Nothing is repaired silently.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

from ..errors import CoalaError, CoalaTypeError


def _at(where: str | None) -> str:
    return f" in {where}" if where else ""


def check_float(t: Tensor, arg: str, where: str | None = None) -> None:
    """Raise TypeError unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise CoalaTypeError(f"{arg}{_at(where)} must be a torch.Tensor, got {type(t).__name__}", argument=arg,
                             layer=where)
    if not t.is_floating_point():
        raise CoalaTypeError(f"{arg}{_at(where)} must have a floating dtype, got {t.dtype}", argument=arg, layer=where)


def check_finite(t: Tensor, arg: str, where: str | None = None) -> None:
    """Raise ValueError naming the count of NaN/Inf entries of ``t``, if any.

    Fast path: one sum (NaN and ±Inf propagate into it, so a finite sum proves every entry finite; 40× cheaper
    than ``isfinite``, which the statistics pass otherwise paid on every activation). Only a non-finite sum
    (bad entries, or finite ones large enough to overflow it) takes the exact count."""
    if t.numel() == 0 or (t.is_floating_point() and math.isfinite(float(t.sum(dtype=_sum_dtype(t.dtype))))):
        return
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        nan = int(torch.isnan(t).sum())
        raise CoalaError(
            f"{arg}{_at(where)} contains {bad} non-finite values ({nan} NaN, {bad - nan} Inf) "
            f"out of {t.numel()}; fix the inputs (coala never replaces them)", argument=arg, layer=where,
        )


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_fits(t: Tensor, dtype: torch.dtype, arg: str, where: str | None = None) -> None:
    """Raise CoalaError when the finite ``t`` does not fit the narrower ``dtype`` it is about to be cast to: values
    beyond its range (float64 above 3.4e38 into float32), or all of them below its smallest normal number (they
    would become zero or lose their precision)."""
    if t.is_floating_point() and torch.finfo(t.dtype).max > torch.finfo(dtype).max and t.numel():
        big, fi = float(t.detach().abs().max()), torch.finfo(dtype)
        if big > fi.max or 0 < big < fi.tiny:
            name = str(dtype).removeprefix("torch.")
            raise CoalaError(f"{arg}{_at(where)} holds values up to {big:.3g}, outside the range of {name} "
                             f"({fi.tiny:.3g} .. {fi.max:.3g}) it is computed in; pass float64 data (and float64 "
                             "statistics), or rescale it", argument=arg, layer=where)


def check_weight(W: Tensor, where: str | None = None) -> None:
    """W must be a finite floating 2-D (out × in) matrix."""
    check_float(W, "W", where)
    if W.ndim != 2:
        raise CoalaError(f"W{_at(where)} must be 2-D (out_features × in_features), got shape {tuple(W.shape)}",
                         argument="W", layer=where)
    check_finite(W, "W", where)


def check_rank(rank: int, m: int, n: int, where: str | None = None) -> int:
    """Rank must be an integer (int, numpy or 0-dim integer tensor; not bool) in [1, min(m, n)]."""
    if isinstance(rank, bool) or not hasattr(rank, "__index__"):
        raise CoalaTypeError(f"rank{_at(where)} must be an int, got {type(rank).__name__}", argument="rank",
                             layer=where)
    try:
        rank = operator.index(rank)
    except TypeError:  # e.g. a float tensor, which defines __index__ but refuses
        raise CoalaTypeError(f"rank{_at(where)} must be an int, got {type(rank).__name__} {rank!r}",
                             argument="rank", layer=where) from None
    if not 1 <= rank <= min(m, n):
        raise CoalaError(f"rank{_at(where)} must be in [1, min(out, in)] = [1, {min(m, n)}], got {rank}",
                         argument="rank", layer=where)
    return rank


def check_mu(mu: float, where: str | None = None) -> float:
    """μ must be a finite non-negative number."""
    if isinstance(mu, Tensor) and mu.numel() == 1 and not mu.is_complex() and mu.dtype != torch.bool:
        mu = mu.item()
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real):
        raise CoalaTypeError(f"mu{_at(where)} must be a real number, got {type(mu).__name__}", argument="mu",
                             layer=where)
    mu = float(mu)
    if not mu >= 0.0 or mu == float("inf"):
        raise CoalaError(f"mu{_at(where)} must be a finite number >= 0, got {mu}", argument="mu", layer=where)
    return mu


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when every tensor is float64, else float32 (the precision of all core arithmetic)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_rows(x: Tensor, in_features: int, mask: Tensor | None, where: str | None = None,
                 arg: str = "activations") -> Tensor:
    """Reshape activations (..., in_features) to rows (N × in_features), dropping rows where mask is false.

    ``mask`` has shape ``x.shape[:-1]`` and is bool or 0/1 (an attention mask). Rows are returned in
    x's dtype; NaN/Inf in the kept rows raise a CoalaError naming ``arg``.
    """
    check_float(x, "x", where)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise CoalaError(f"x{_at(where)} must have shape (..., {in_features}), got {tuple(x.shape)}", argument="x",
                         layer=where)
    rows = x.reshape(-1, in_features)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise CoalaTypeError(f"mask{_at(where)} must be a torch.Tensor, got {type(mask).__name__}",
                                 argument="mask", layer=where)
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise CoalaError(
                f"mask{_at(where)} must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(mask.shape)}",
                argument="mask", layer=where,
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise CoalaError(f"mask{_at(where)} must be boolean or 0/1", argument="mask", layer=where)
            mask = mask != 0
        rows = rows[mask.reshape(-1).to(rows.device)]
    check_finite(rows, arg, where)
    return rows
