"""Held-out truncation loss: how much error a rank-r projection fitted on some rows makes on OTHER rows.

Every method here (COALA and the baselines) truncates by a left projection, W'_r = U_r U_rᵀ W, with U (out × k)
from its own SVD. On the rows it was fitted on, the loss of rank r is the tail Σ_{i>r} σ_i², which shrinks with
the number of rows: with few calibration tokens for a wide input (e.g. 3,000 tokens for MiniLM's 1536-wide FFN
output), the fitted subspace follows those very rows and the in-sample tail says that cutting such a layer is
cheap when it is not. A rank allocation driven by in-sample tails therefore cuts exactly the layers that
generalise worst (docs/design.md §6, "held-out curves").

``heldout_loss(W, U, test)`` evaluates the fitted projection on statistics of other rows X_t, without ever
touching them again:

    loss[r] = ‖(W − U_r U_rᵀ W) X_tᵀ‖²_F = ‖(I − U Uᵀ) M‖² + Σ_{i>r} ‖u_iᵀ M‖²,   M = W R_tᵀ   (R_tᵀR_t = X_tᵀX_t),

summed from the tail (no cancellation), or through the Gram matrix G_t = X_tᵀX_t for methods that only keep G
(‖u_iᵀ W X_tᵀ‖² = u_iᵀ W G_t Wᵀ u_i). Nothing is inverted. ``cross_validated_loss`` sums it over folds:
fit on fold A, evaluate on fold B, and the other way round; ``generalization_loss`` (what the Fisher allocation
uses) corrects that for the fits being made on half of the rows.

Precision: the products run in W's dtype (float32 or float64); squares are summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .stats import ActivationStats

__all__ = ["cross_validated_loss", "generalization_loss", "heldout_loss"]


def heldout_loss(W: Tensor, U: Tensor, test: ActivationStats) -> Tensor:
    """loss[r] = ‖(W − U_r U_rᵀ W) X_tᵀ‖²_F for r = 0..k, float64 (k + 1,), on the CPU.

    W: (out × in); U: (out × k), orthonormal columns, ordered as the method truncates them; ``test``: statistics
    of the held-out rows X_t with an R factor (preferred) or a Gram matrix.
    """
    return _loss(W, U, _target(W, test))


def _target(W: Tensor, test: ActivationStats) -> tuple[str, Tensor]:
    """What the loss on ``test``'s rows needs of them, computed once per fold: ("r", M = W R_tᵀ) or ("gram", G_t)."""
    if test.r is not None and test.r.num_rows:
        return "r", W @ test.r.R.to(W).T  # (out × in): ‖M‖ = ‖W X_tᵀ‖
    if test.gram is not None:
        return "gram", test.gram.G.to(W)
    raise ValueError(f"held-out loss of {test.name or 'a layer'} needs an R factor or a Gram matrix of the "
                     "held-out rows")


def _loss(W: Tensor, U: Tensor, target: tuple[str, Tensor]) -> Tensor:
    """``heldout_loss`` from a ``_target``."""
    kind, T = target
    if kind == "r":
        P = U.T.to(W) @ T  # (k × in)
        kept = P.to(torch.float64).square().sum(1)
        outside = float((T - U.to(W) @ P).to(torch.float64).square().sum())
    else:
        Q = U.T.to(W) @ W  # (k × in)
        kept = ((Q @ T) * Q).to(torch.float64).sum(1)
        total = float(((W @ T) * W).to(torch.float64).sum())
        outside = max(total - float(kept.sum()), 0.0)  # the Gram route cannot avoid this one difference
    tails = kept.flip(0).cumsum(0).flip(0)  # Σ_{i≥r} for r = 0..k-1
    out = torch.empty(kept.shape[0] + 1, dtype=torch.float64)
    out[:-1] = tails.cpu() + outside
    out[-1] = outside
    return out


def cross_validated_loss(W: Tensor, folds: Sequence[ActivationStats],
                         basis_of: Callable[[ActivationStats], Tensor]) -> Tensor:
    """Σ over folds f of ``heldout_loss(W, basis_of(all folds but f), fold f)``, float64 (k + 1,).

    ``basis_of(stats)``: the method's U (out × k) fitted on ``stats``. Two folds: fit on A, test on B, and the
    other way round; more folds fit on the merge of the others (``ActivationStats.of_folds``).
    """
    return _fits(W, folds, basis_of)[1]


def generalization_loss(W: Tensor, folds: Sequence[ActivationStats],
                        basis_of: Callable[[ActivationStats], Tensor]) -> Tensor:
    """Estimated loss[r] on new rows of a fit on ALL rows of two ``folds``: ¼ in-sample + ¾ held-out of the
    half fits, float64 (k + 1,).

    A fit on m rows errs on its own rows by about ε(1 − c/m) and on new rows by ε(1 + c/m) (the first-order
    estimation error of the subspace); a fit on N = 2m rows then errs on new rows by ε(1 + c/N) =
    ¼·ε(1 − c/m) + ¾·ε(1 + c/m). Both terms come from the two half fits (no SVD of all rows); the held-out term
    alone would charge every layer for a fit on half the rows. Summed over the rows of both folds, like the
    in-sample tail of all rows.
    """
    if len(folds) != 2:
        raise ValueError(f"the generalization estimate is defined for 2 folds, got {len(folds)}")
    own, other = _fits(W, folds, basis_of)
    return 0.25 * own + 0.75 * other


def _fits(W: Tensor, folds: Sequence[ActivationStats], basis_of: Callable[[ActivationStats], Tensor]
          ) -> tuple[Tensor, Tensor]:
    """(Σ_f loss of fit_f on its own rows, Σ_f loss of fit_f on fold f), fit_f fitted on all folds but f."""
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {len(folds)}")
    targets = [_target(W, part) for part in folds]  # each fold's W R_fᵀ once: it serves both of its roles
    own = other = None
    for f in range(len(folds)):
        rest = [p for i, p in enumerate(folds) if i != f]
        if len(rest) == 1:
            fit, fit_target = rest[0], targets[1 - f]
        else:
            fit = ActivationStats.of_folds(rest)
            fit_target = _target(W, fit)
        U = basis_of(fit)
        mine, held = _loss(W, U, fit_target), _loss(W, U, targets[f])
        own, other = (mine, held) if own is None else (own + mine, other + held)
    return own, other
