"""COALA's inversion-free LoRA initialisation: IPM and KPM factors of one weight matrix (pure tensor maths).

Notation: W ∈ ℝ^{m×n} (out × in), R ∈ ℝ^{n×n} the R factor of the layer's inputs X (RᵀR = XᵀX, see
``coala.linalg.RFactor``), μ ≥ 0 the regularisation (R is replaced by the R factor of [R; √μ I]).

With W Rᵀ = U Σ Vᵀ, the column space of U ranks output directions by how much of the layer's response to its
context they carry. For a set of r orthonormal columns U_r, the adapter's product is the projection U_rU_rᵀW:

- **IPM** (instruction-previewed mode): U_r = the first r columns (largest singular values). U_rU_rᵀW is the
  best rank-r approximation of W in the context-weighted norm ‖(·)Xᵀ‖_F, the same solve as ``coala`` compression.
- **KPM** (knowledge-preserved mode): U_r = the r *smallest non-zero* singular directions of W Rᵀ, i.e. columns
  k−r … k−1 of U, where k is the numerical rank of W Rᵀ: the count of singular values above
  ``max(m, n) · eps(R.dtype) · σ₁`` — the precision R was accumulated in, since an R accumulated in float32
  carries ~eps₃₂ noise where X has no support. Directions past k are ones the context does not exercise
  (X rank-deficient, e.g. too few tokens); their U columns are noise or an arbitrary completion, so KPM never
  picks them. With μ > 0 the stacked R is full rank. KPM with k < r is an error.

Balanced factors for peft (``scaling`` = lora_alpha / r, or lora_alpha / √r with rsLoRA): with U_rᵀW = PΣQᵀ,
B = U_r P Σ^½ / √scaling (m × r, peft's lora_B) and A = Σ^½ Qᵀ / √scaling (r × n, peft's lora_A), so that
scaling · B · A = U_r U_rᵀ W up to rounding. Nothing is inverted and XᵀX is never formed.

Precision: the SVDs run in ``solve_dtype`` (float64 by default, whatever the dtype of W and R). The R factor
itself may be accumulated in float32: Householder QR's backward error is column-wise, so an fp32 R keeps the
small directions of activations with outlier channels, and a float64 SVD of W Rᵀ then resolves KPM's bottom
directions to ~1e-7 even at cond(X) = 1e10 (``coala bench lora``); a float32 SVD cannot (its error is
eps·σ₁ in every direction). IPM is accurate either way. Activations whose ill-conditioning is not aligned
with channels need R accumulated in float64 for KPM.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg.checks import check_finite, check_mu, check_rank, check_weight
from ..linalg.dtypes import ACCUMULATION_DTYPES
from ..linalg.tsqr import regularize

MODES = ("ipm", "kpm")


def check_mode(mode: str) -> str:
    """``mode`` must be "ipm" or "kpm"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in ACCUMULATION_DTYPES.values():
        raise TypeError(f"solve_dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def context_svd(
    W: Tensor, R: Tensor, mu: float = 0.0, name: str | None = None, *, solve_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """U (m × min(m, n)) and Σ (min(m, n),) of W R_μᵀ, R_μ = R factor of [R; √μ I], in ``solve_dtype``.

    W: (m × n) weight, R: (n × n) upper triangular R factor of the inputs (any floating dtype).
    """
    check_weight(W, name)
    if R.ndim != 2 or tuple(R.shape) != (W.shape[1], W.shape[1]):
        where = f" of {name}" if name else ""
        raise ValueError(f"R{where} must be ({W.shape[1]} × {W.shape[1]}), got {tuple(R.shape)}")
    check_finite(R, "R", name)
    mu = check_mu(mu, name)
    dtype = _solve_dtype(solve_dtype)
    Wc, Rc = W.to(dtype), R.to(device=W.device, dtype=dtype)
    U, S, _ = torch.linalg.svd(Wc @ regularize(Rc, mu).T, full_matrices=False)
    return U, S


def numerical_rank(S: Tensor, shape: tuple[int, int], eps: float | None = None) -> int:
    """Count of singular values above max(m, n) · eps · σ₁ (numpy's matrix_rank rule; eps of S.dtype unless
    given: pass the eps of the precision the data was accumulated in)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    eps = torch.finfo(S.dtype).eps if eps is None else eps
    tol = max(shape) * eps * float(S[0])
    return int((S > tol).sum())


def select_directions(
    U: Tensor,
    S: Tensor,
    rank: int,
    mode: str,
    shape: tuple[int, int],
    name: str | None = None,
    eps: float | None = None,
) -> Tensor:
    """The r columns of U that the adapter gets: first r (IPM) or the r smallest non-zero ones (KPM;
    ``eps``: the precision of the statistics, see ``numerical_rank``)."""
    check_mode(mode)
    check_rank(rank, *shape, where=name)
    if mode == "ipm":
        return U[:, :rank]
    k = numerical_rank(S, shape, eps)
    if k < rank:
        where = f" for {name}" if name else ""
        raise ValueError(
            f"KPM{where}: the calibration context supports only {k} directions of W Rᵀ (numerical rank), fewer "
            f"than rank={rank}; give more calibration tokens, a smaller rank, or mu > 0"
        )
    return U[:, k - rank : k]


def balanced_factors(W: Tensor, Ur: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """peft's (lora_B (m × r), lora_A (r × n)) with scaling · B · A = U_r U_rᵀ W, balanced singular values.

    W: (m × n), Ur: (m × r) orthonormal columns; computed in promote(float32, Ur.dtype, W.dtype).
    """
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"LoRA scaling must be a finite number > 0, got {scaling!r}")
    dtype = torch.promote_types(torch.promote_types(torch.float32, Ur.dtype), W.dtype)
    Ur = Ur.to(dtype)
    P, sigma, Qh = torch.linalg.svd(Ur.T @ W.to(dtype), full_matrices=False)  # (r × r), (r,), (r × n)
    root = (sigma / scaling).sqrt()
    B = (Ur @ P) * root  # (m × r)
    A = root[:, None] * Qh  # (r × n)
    return B.contiguous(), A.contiguous()


def coala_lora_factors(
    W: Tensor,
    R: Tensor,
    rank: int,
    *,
    mode: str = "ipm",
    mu: float = 0.0,
    scaling: float = 1.0,
    name: str | None = None,
    solve_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """(lora_B (m × r), lora_A (r × n)) of COALA's IPM / KPM initialisation of one layer.

    Args:
        W: (m × n) weight (out × in), any floating dtype; R: (n × n) R factor of the layer's inputs.
        rank: r in [1, min(m, n)]; mode: "ipm" or "kpm"; mu: regularisation μ ≥ 0;
        scaling: peft's scaling (lora_alpha / r, or / √r with rsLoRA); name: the layer, for error messages;
        solve_dtype: dtype of the SVDs (float64 default, or float32).
    Returns factors in ``solve_dtype`` with scaling · B · A = U_rU_rᵀW.
    """
    check_mode(mode)
    check_rank(rank, W.shape[0], W.shape[1], where=name)
    U, S = context_svd(W, R, mu, name, solve_dtype=solve_dtype)
    eps = max(torch.finfo(R.dtype).eps, torch.finfo(solve_dtype).eps)
    Ur = select_directions(U, S, rank, mode, tuple(W.shape), name, eps)
    return balanced_factors(W, Ur, scaling)


def plain_svd_factors(
    W: Tensor,
    rank: int,
    *,
    minor: bool,
    scaling: float = 1.0,
    name: str | None = None,
    solve_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Context-free baselines: PiSSA (principal r components, ``minor=False``) or MiLoRA (minor r, ``minor=True``).

    Returns (lora_B, lora_A) in ``solve_dtype`` with scaling · B · A = U_r Σ_r V_rᵀ (chosen singular triplets
    of W). MiLoRA (Wang et al. 2024) takes the r smallest singular triplets of W itself (no numerical-rank cut).
    """
    check_weight(W, name)
    check_rank(rank, W.shape[0], W.shape[1], where=name)
    U, S, Vh = torch.linalg.svd(W.to(_solve_dtype(solve_dtype)), full_matrices=False)
    sl = slice(S.shape[0] - rank, S.shape[0]) if minor else slice(0, rank)
    root = (S[sl] / scaling).sqrt()
    return (U[:, sl] * root).contiguous(), (root[:, None] * Vh[sl]).contiguous()
