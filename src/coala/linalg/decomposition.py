"""A decomposition of one weight matrix from which factors of any rank can be read.

Each method (COALA and the baselines) builds one ``Decomposition`` per matrix; ``factors(rank)`` returns
(A, B) with W' = A @ B, A of shape (out × rank) and B of shape (rank × in), in the compute dtype. One
SVD serves every rank, which is what a sweep over compression ratios needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .checks import check_rank


class Decomposition(ABC):
    """Factors of every rank of one (out × in) matrix W."""

    out_features: int
    in_features: int

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def truncation_loss(self) -> Tensor:
        """loss[r] for r = 0..max_rank: the truncation loss of rank r as this method measures it, Σ_{i ≥ r} S_i² of
        the singular values it truncates (float64). For COALA it is exactly ‖(W − W'_r)Xᵀ‖²_F."""
        return tail_sums_of_squares(self.S, self.max_rank + 1)

    def basis(self) -> Tensor:
        """U (out × k): every method here truncates by a left projection, W'_r = U_r U_rᵀ W (exactly for coala,
        svd, asvd and svd-llm; for svd-llm-v2 up to the Gram null directions it drops); only the k directions of
        nonzero singular value (``known_directions``), the others being an arbitrary basis of a null space. Used to
        evaluate the fit on other rows (the Fisher allocation, ``coala.fisher``)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its projection basis")

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        rank = check_rank(rank, self.out_features, self.in_features, getattr(self, "name", None))
        return self._factors(rank)

    @abstractmethod
    def _factors(self, rank: int) -> tuple[Tensor, Tensor]: ...


class BalancedSVD(Decomposition):
    """W' = U_r Σ_r V_rᵀ · M (M = right transform, or identity), split as A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ M."""

    def __init__(self, U: Tensor, S: Tensor, Vh: Tensor, right: Tensor | None, out_in: tuple[int, int]):
        self.U, self.S, self.Vh, self.right = U, S, Vh, right
        self.out_features, self.in_features = out_in

    def basis(self) -> Tensor:
        return self.U[:, : known_directions(self.S, self.U.dtype, max(self.out_features, self.in_features))]

    def _factors(self, rank: int) -> tuple[Tensor, Tensor]:
        root = self.S[:rank].sqrt()
        A = self.U[:, :rank] * root
        B = root[:, None] * self.Vh[:rank]
        if self.right is not None:
            B = B @ self.right if self.right.ndim == 2 else B * self.right
        return A, B


def known_directions(S: Tensor, dtype: torch.dtype, size: int) -> int:
    """How many of the singular values S (descending) are not rounding noise of a ``dtype`` SVD of a matrix whose
    larger side is ``size``: S_i > S_0 · size · eps(dtype)."""
    if S.numel() == 0 or not float(S[0]) > 0:
        return 0
    return int((S > float(S[0]) * size * torch.finfo(dtype).eps).sum())


def tail_sums_of_squares(S: Tensor, length: int) -> Tensor:
    """loss[r] = Σ_{i ≥ r} S_i² for r = 0..length-1 (zeros past len(S)), summed in float64 from the tail."""
    sq = S.to(torch.float64).square()
    tails = sq.flip(0).cumsum(0).flip(0)
    out = torch.zeros(length, dtype=torch.float64, device=S.device)
    k = min(length, tails.shape[0])
    out[:k] = tails[:k]
    return out
