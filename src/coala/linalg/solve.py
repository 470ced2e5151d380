"""The COALA solve: best rank-r W' minimising ‖(W − W')Xᵀ‖²_F + μ‖W − W'‖²_F, without inverses.

With R the R factor of X (RᵀR = XᵀX), ‖(W − W')Xᵀ‖_F = ‖(W − W')Rᵀ‖_F. If W Rᵀ = U Σ Vᵀ, the optimum is
W' = U_r U_rᵀ W: A = U_r (out × r), B = U_rᵀ W (r × in). μ > 0 replaces R by the R factor of [R; √μ I].
Nothing is inverted and XᵀX is never formed. All arithmetic runs in the dtype of W and R (float32/64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .decomposition import Decomposition, known_directions, tail_sums_of_squares
from .lapack import svd
from .tsqr import regularize


class CoalaDecomposition(Decomposition):
    """COALA factors of W (out × in) for every rank, given the R factor (in × in) of its inputs.

    Args:
        W: (out × in) in the compute dtype.
        R: (in × in) upper triangular with RᵀR = XᵀX, same dtype and device as W.
        mu: regularisation weight μ ≥ 0.
        adaptive_mu: use the paper's rule μ_eff = μ · (‖(W − W₀)Xᵀ‖ / ‖W − W₀‖)², W₀ the μ = 0 solution
            at the same rank (one extra SVD per rank asked for).
    """

    def __init__(self, W: Tensor, R: Tensor, mu: float = 0.0, adaptive_mu: bool = False, name: str | None = None):
        self.W, self.R, self.mu, self.adaptive_mu, self.name = W, R, float(mu), adaptive_mu, name
        self.out_features, self.in_features = W.shape
        self.U0, self.S0 = left_singular(W, R)
        self._by_mu: dict[float, tuple[Tensor, Tensor]] = {0.0: (self.U0, self.S0)}

    def truncation_loss(self) -> Tensor:
        """loss[r] = ‖(W − W'_r)Xᵀ‖²_F (μ = 0) for r = 0..min(out, in); float64."""
        return tail_sums_of_squares(self.S0, self.max_rank + 1)

    def effective_mu(self, rank: int) -> float:
        """The μ actually used at ``rank`` (μ itself unless adaptive)."""
        if not self.adaptive_mu or self.mu == 0.0:
            return self.mu
        Ur = self.U0[:, :rank]
        weighted = float(self.truncation_loss()[rank])  # ‖(W − W₀)Xᵀ‖²
        plain = float(torch.linalg.matrix_norm(self.W - Ur @ (Ur.T @ self.W)).to(torch.float64) ** 2)
        # W₀ = W up to rounding (W has rank ≤ r): no truncation, so no regularisation is needed (the ratio of
        # two rounding errors would be noise).
        w_sq = float(torch.linalg.matrix_norm(self.W).to(torch.float64) ** 2)
        floor = (max(self.W.shape) * torch.finfo(self.W.dtype).eps) ** 2 * w_sq
        return self.mu * weighted / plain if plain > floor else 0.0

    def basis(self) -> Tensor:
        """U of W R(μ)ᵀ for the fixed μ (with the adaptive rule, whose μ depends on the rank: the μ = 0 basis), its
        directions of nonzero singular value only."""
        U, S = self._singular(0.0 if self.adaptive_mu else self.mu)
        return U[:, : known_directions(S, U.dtype, max(self.W.shape))]

    def _singular(self, mu: float) -> tuple[Tensor, Tensor]:
        """(U, Σ) of W R(μ)ᵀ, one SVD per μ."""
        if mu not in self._by_mu:
            self._by_mu[mu] = left_singular(self.W, regularize(self.R, mu))
        return self._by_mu[mu]

    def _factors(self, rank: int) -> tuple[Tensor, Tensor]:
        Ur = self._singular(self.effective_mu(rank))[0][:, :rank]
        return Ur.contiguous(), Ur.T @ self.W


def _exponent(t: Tensor) -> int:
    """e with max|t| in [2^(e-1), 2^e) (0 for an all-zero t)."""
    big = float(t.abs().max()) if t.numel() else 0.0
    return math.frexp(big)[1] if big > 0 else 0


def _scaled(t: Tensor, e: int) -> Tensor:
    """t · 2^-e, exactly (two factors, so that neither overflows the dtype)."""
    half = -e // 2
    return t * 2.0**half * 2.0 ** (-e - half)


def left_singular(W: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """U (out × k) and Σ (k,, float64) of W Rᵀ, k = min(out, in).

    When the product could overflow, or lose precision to underflow (huge or tiny weights / activations), W and R
    are first scaled by powers of two (exact; U does not change) and Σ is scaled back in float64.
    """
    fi = torch.finfo(W.dtype)
    e = _exponent(W) + _exponent(R)
    safe = math.log2(fi.tiny) + fi.bits < e < math.log2(fi.max) - math.log2(W.shape[1]) - 2
    if safe:
        U, S, _ = svd(W @ R.T)
        return U, S.to(torch.float64)
    eW, eR = _exponent(W), _exponent(R)
    U, S, _ = svd(_scaled(W, eW) @ _scaled(R, eR).T)
    S = S.to(torch.float64)
    return U, torch.ldexp(S, torch.tensor(eW + eR, device=S.device))  # overflows to inf, never raises
