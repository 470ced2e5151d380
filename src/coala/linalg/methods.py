"""Method registry and the public one-matrix API: ``approximate``, ``decompose``, ``truncation_loss``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CoalaError, CoalaTypeError
from .baselines import asvd_decomposition, svd_decomposition, svd_llm_decomposition, svd_llm_v2_decomposition
from .checks import check_fits, check_float, check_mu, check_rank, check_weight, compute_dtype, flatten_rows
from .corrected import MIN_ROWS_PER_COLUMN, CorrectedDecomposition, zero_pivot
from .decomposition import Decomposition
from .solve import CoalaDecomposition
from .stats import ActivationStats, stats_from_rows
from .tsqr import RFactor

Context = Tensor | RFactor | ActivationStats | None


@dataclass(frozen=True)
class Method:
    """A low-rank method: the statistics it needs and how it builds a decomposition from them."""

    name: str
    needs: frozenset[str]
    build: Callable[..., Decomposition]
    uses_mu: bool = False
    allocation: str = "uniform"  # the rank allocation "auto" resolves to (a name of coala.allocate.ALLOCATIONS)
    propagate: str = "compressed"  # what propagate="auto" resolves to: the published profiling (docs/design.md §5)
    propagate_lm: str | None = None  # what "auto" resolves to on a causal LM (None: ``propagate``; docs/design.md §4)


def _coala(W, stats, mu, adaptive_mu, name):
    return CoalaDecomposition(W, stats.r.R.to(W), mu=mu, adaptive_mu=adaptive_mu, name=name)


METHODS: dict[str, Method] = {
    "coala": Method("coala", frozenset({"r"}), _coala, uses_mu=True, allocation="fisher", propagate_lm="corrected"),
    "svd": Method("svd", frozenset(), lambda W, stats, mu, adaptive_mu, name: svd_decomposition(W)),
    "asvd": Method(
        "asvd", frozenset({"absmean"}),
        lambda W, stats, mu, adaptive_mu, name: asvd_decomposition(W, stats.absmean.mean),
        propagate="original",
    ),
    "svd-llm": Method(
        "svd-llm", frozenset({"gram"}),
        lambda W, stats, mu, adaptive_mu, name: svd_llm_decomposition(W, stats.gram.G, name=name),
        propagate="original",
    ),
    "svd-llm-v2": Method(
        "svd-llm-v2", frozenset({"gram"}),
        lambda W, stats, mu, adaptive_mu, name: svd_llm_v2_decomposition(W, stats.gram.G),
        allocation="svd-llm-v2", propagate="original",
    ),
}


def get_method(method: str) -> Method:
    if method not in METHODS:
        raise CoalaError(f"unknown method {method!r}; choose from {sorted(METHODS)}", argument="method")
    return METHODS[method]


def _context_stats(X: Context, W: Tensor, needs: frozenset[str], method: str, where: str | None,
                   n: int) -> ActivationStats:
    """Turn the context argument (rows of width n: W's input width, or twice it for paired rows) into statistics
    holding at least ``needs``, in W's compute dtype."""
    at = f" (layer {where})" if where else ""
    cols = f"{W.shape[1]} input columns" + (f" ({n} paired)" if n != W.shape[1] else "")
    if isinstance(X, Tensor):
        check_float(X, "X", where)
        if X.ndim != 2 or X.shape[1] != n:
            raise CoalaError(f"X{at} must have shape (tokens, {n}) to match W of shape {tuple(W.shape)}, "
                             f"got {tuple(X.shape)}", argument="X", layer=where)
        if X.shape[0] == 0:
            raise CoalaError(f"X{at} has no rows", argument="X", layer=where)
        rows = flatten_rows(X, n, None, where, arg="X")
        check_fits(rows, compute_dtype(W, X), "X", where)
        rows = rows.to(device=W.device, dtype=compute_dtype(W, X))
        return stats_from_rows(rows, needs, rows.dtype)
    if X is None:
        if needs:
            raise CoalaTypeError(f"method {method!r}{at} needs calibration activations X (a tensor or statistics)",
                                 argument="X", layer=where)
        return ActivationStats(n, (), name=where)
    if isinstance(X, RFactor):
        if X.in_features != n:
            raise CoalaError(f"RFactor{at} has in_features={X.in_features}, but W has {cols}",
                             argument="X", layer=where)
        if needs and X.num_rows == 0:
            raise CoalaError(f"RFactor{at} has seen no rows: run calibration data through it first", argument="X",
                             layer=where)
        stats = ActivationStats(n, (), dtype=X.dtype, name=where)
        stats.r, stats.num_rows = X, X.num_rows
        X = stats
    if not isinstance(X, ActivationStats):
        raise CoalaTypeError(f"X{at} must be a Tensor, an RFactor or ActivationStats, got {type(X).__name__}",
                             argument="X", layer=where)
    if X.in_features != n:
        raise CoalaError(f"statistics{at} have in_features={X.in_features}, but W has {cols}",
                         argument="X", layer=where)
    missing = needs - X.kinds
    if missing:
        raise CoalaTypeError(
            f"method {method!r}{at} needs statistics {sorted(missing)} that were not collected "
            f"(got {sorted(X.kinds)}); pass the activation tensor X, or ActivationStats with those kinds",
            argument="X", layer=where,
        )
    if needs and X.num_rows == 0:
        raise CoalaError(f"statistics{at} have seen no rows: run calibration data through them first",
                         argument="X", layer=where)
    return X


def decompose(
    W: Tensor,
    X: Context,
    *,
    method: str = "coala",
    mu: float = 0.0,
    adaptive_mu: bool = False,
    name: str | None = None,
    paired: bool = False,
) -> Decomposition:
    """Decompose W (out × in) once; ``.factors(rank)`` then gives (A, B) for any rank, in the compute dtype.

    ``paired``: X holds rows [x̃, y] of twice W's input width (x̃ the layer's inputs on the compressed path, y the
    target mix with the original model's), for the error-correcting COALA solve (``corrected``; method "coala",
    fixed μ). Compute dtype: float64 when W and the context are float64, float32 otherwise.
    """
    m = get_method(method)
    check_weight(W, name)
    mu = check_mu(mu, name)
    if (mu or adaptive_mu) and not m.uses_mu:
        raise CoalaError(f"mu / adaptive_mu apply to method 'coala' only, not {method!r}", argument="mu", layer=name)
    if paired and (method != "coala" or adaptive_mu):
        raise CoalaError(f"paired statistics are for the corrected COALA solve with a fixed mu, not method "
                         f"{method!r} with adaptive_mu={adaptive_mu}", argument="method", layer=name)
    ctx_dtype = getattr(X, "dtype", W.dtype)  # a tensor's, an RFactor's or ActivationStats' accumulation dtype
    cdtype = torch.float64 if (W.dtype == torch.float64 and ctx_dtype == torch.float64) else torch.float32
    check_fits(W, cdtype, "W", name)
    stats = _context_stats(X, W, m.needs, method, name, W.shape[1] * (2 if paired else 1))
    if paired:
        Wc, n = W.to(cdtype), W.shape[1]
        R = stats.r.R.to(Wc)
        # too few tokens to refit B, or (μ = 0) inputs that never vary in some direction: COALA on X̃ (R₁₁ is its R)
        if stats.r.num_rows < MIN_ROWS_PER_COLUMN * n or (mu == 0 and zero_pivot(R[:n, :n])):
            return CoalaDecomposition(Wc, R[:n, :n].contiguous(), mu=mu, name=name)
        return CorrectedDecomposition(Wc, R, mu=mu, name=name)
    return m.build(W.to(cdtype), stats, mu, adaptive_mu, name)



def approximate(
    W: Tensor,
    X: Context,
    rank: int,
    *,
    method: str = "coala",
    mu: float = 0.0,
    adaptive_mu: bool = False,
    name: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors A (out × rank), B (rank × in) of W (out × in) with W' = A @ B.

    X: activations (tokens × in) as a tensor, an ``RFactor`` ("coala"), or ``ActivationStats``.
    method: "coala" (QR route, μ via [R; √μ I]), "svd", "asvd", "svd-llm", "svd-llm-v2".
    Computes in float64 when W and X are float64, else float32; returns W's dtype.
    """
    check_weight(W, name)
    rank = check_rank(rank, W.shape[0], W.shape[1], name)
    A, B = decompose(W, X, method=method, mu=mu, adaptive_mu=adaptive_mu, name=name).factors(rank)
    return _in_dtype(A, B, W.dtype, name)


def _in_dtype(A: Tensor, B: Tensor, dtype: torch.dtype, name: str | None) -> tuple[Tensor, Tensor]:
    """A, B cast to ``dtype``; when B's entries exceed its range (float16 holds up to 65504), a power of two
    moves from B to A (A = U_r has entries ≤ 1), which leaves A @ B unchanged."""
    big, limit = float(B.abs().max()) if B.numel() else 0.0, torch.finfo(dtype).max / 2
    if big > limit:
        scale = 2.0 ** math.ceil(math.log2(big / limit))
        A, B = A * scale, B / scale
    A, B = A.to(dtype), B.to(dtype)
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise CoalaError(f"the rank factors of W{f' in {name}' if name else ''} do not fit {dtype}: pass W in "
                         "float32", argument="W", layer=name)
    return A, B


def truncation_loss(W: Tensor, X: Tensor | RFactor | ActivationStats) -> Tensor:
    """loss[r] = ‖(W − W'_r)Xᵀ‖²_F of the optimal rank-r W', for r = 0..min(out, in), from one SVD (float64)."""
    dec = decompose(W, X, method="coala")
    return dec.truncation_loss()
