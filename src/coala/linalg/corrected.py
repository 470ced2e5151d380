"""The error-correcting COALA solve (docs/design.md §4): fit the compressed model's inputs to the original output.

In sequential calibration a layer of block i receives X̃ (tokens × in), the inputs that the compressed blocks
before it produce, while the original model gave it X for the same tokens. With a target mix
Y = αX + (1 − α)X̃ (α = 1: the original output; α = 0: plain COALA on X̃), the solve is

    min_{rank W' ≤ r} ‖W Yᵀ − W' X̃ᵀ‖²_F (+ μ‖W − W'‖²_F).

The R factor of the paired rows [X̃, Y] (tokens × 2n, streamed like any input) is [[R₁₁, S₁₂], [0, S₂₂]], so
X̃ = Q₁R₁₁ and Y = Q₁S₁₂ + Q₂S₂₂, and the objective is ‖W S₁₂ᵀ − W'R₁₁ᵀ‖²_F + ‖W S₂₂ᵀ‖²_F. With T = W S₁₂ᵀ = UΣVᵀ
the optimum is A = U_r, B R₁₁ᵀ = U_rᵀ T: one SVD and one triangular solve with R₁₁ (never a Gram matrix, never
an inverse). μ > 0 stacks [√μ I, √μ I] under the paired rows, which keeps R₁₁ invertible. For X̃ = Y it is §1.
All arithmetic runs in the dtype of W and R (float32/64).

The refit of B is a least-squares fit on the calibration tokens: with fewer than 2n paired rows it overfits them
(with fewer than n, R₁₁ is singular), so ``linalg.decompose`` solves such layers on X̃ alone — plain COALA with R₁₁,
the R factor of X̃ (``MIN_ROWS_PER_COLUMN``; docs/design.md §4). So it does, without μ, when R₁₁ is exactly
singular however many rows there are (``zero_pivot``: an input that is always zero, e.g. behind a zero weight of
the norm before it): B is then undefined in that direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CoalaError
from .decomposition import Decomposition, known_directions
from .qr_update import r_of_stacked
from .solve import left_singular

MIN_ROWS_PER_COLUMN = 2  # the corrected solve needs at least this many calibration rows per input column


def zero_pivot(R: Tensor) -> bool:
    """Whether the upper-triangular R has a zero on its diagonal: an input direction that never varies (e.g. an input
    that is always exactly zero), where a triangular solve with R divides by zero. Merely ill-conditioned factors
    (real activations: cond 1e5 and more) are not flagged: the backward-stable solve handles them."""
    return bool((R.diagonal() == 0).any())


class CorrectedDecomposition(Decomposition):
    """Error-correcting factors of W (out × in) for every rank, from the R factor of the paired inputs.

    Args:
        W: (out × in) in the compute dtype.
        R: (2·in × 2·in) upper triangular, the R factor of the rows [x̃, y] (x̃ the layer's input on the compressed
            path, y the target mix of the original and compressed inputs), same dtype and device as W.
        mu: regularisation weight μ ≥ 0 (absolute, as for ``CoalaDecomposition``).
    """

    def __init__(self, W: Tensor, R: Tensor, mu: float = 0.0, name: str | None = None):
        self.W, self.mu, self.name = W, float(mu), name
        self.out_features, n = W.shape
        self.in_features = n
        if R.shape != (2 * n, 2 * n):
            raise CoalaError(f"the paired R factor of {name or 'this layer'} must be {2 * n} × {2 * n}, got "
                             f"{tuple(R.shape)}", layer=name)
        if self.mu > 0:
            eye = torch.eye(n, dtype=R.dtype, device=R.device) * self.mu**0.5
            R = r_of_stacked(R, torch.cat([eye, eye], 1))
        self.R11, self.S12 = R[:n, :n], R[:n, n:]
        self.U, self.S = left_singular(W, self.S12)  # T = W S₁₂ᵀ = U Σ Vᵀ; Σ in float64

    def basis(self) -> Tensor:
        return self.U[:, : known_directions(self.S, self.U.dtype, max(self.W.shape))]

    def _factors(self, rank: int) -> tuple[Tensor, Tensor]:
        Ur = self.U[:, :rank].contiguous()
        C = (Ur.T @ self.W) @ self.S12.T  # U_rᵀ T (rank × in), without forming T again
        # B R₁₁ᵀ = U_rᵀ T. Ill-conditioned R₁₁ (real activations: cond 1e5 and more) is fine: the triangular solve is
        # backward stable, so B R₁₁ᵀ, i.e. B's action on the inputs, is accurate. An exactly singular R₁₁ (fewer
        # rows than columns, or an input that is always zero in some direction) has no solution without μ.
        B = torch.linalg.solve_triangular(self.R11, C.T, upper=True).T
        if not bool(torch.isfinite(B).all()):
            raise CoalaError(f"the compressed-path inputs of {self.name or 'this layer'} are rank-deficient (fewer "
                             "independent rows than its width): the corrected solve needs mu > 0 or more calibration "
                             "tokens", argument="mu", layer=self.name)
        return Ur, B.contiguous()
