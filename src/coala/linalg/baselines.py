"""Baselines as published (docs/design.md §5). Each returns a Decomposition; deviations are documented.

All arithmetic is in the compute dtype (float32, or float64 when W and X are float64) except where the
published recipe says float64 (SVD-LLM's Cholesky and inverse, SVD-LLM V2's eigendecomposition). SVDs use
``lapack.svd`` (one MKL thread below 2048 columns), like COALA's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decomposition import BalancedSVD
from .lapack import svd


def svd_decomposition(W: Tensor) -> BalancedSVD:
    """Plain truncated SVD of W (context-free): A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ."""
    U, S, Vh = svd(W)
    return BalancedSVD(U, S, Vh, None, tuple(W.shape))


def asvd_decomposition(W: Tensor, absmean: Tensor, alpha: float = 0.5) -> BalancedSVD:
    """ASVD (Yuan et al. 2023): s_j = mean_tokens(|x_j|)^α + 1e-6; SVD of W·diag(s); W' = U_rΣ_rV_rᵀ diag(s)⁻¹.

    ``absmean``: (in,) mean of |x| per input channel. Deviation: none (α = 0.5, the published default;
    the published per-layer sensitivity search for ranks is not part of this solve).
    """
    s = absmean.to(W).pow(alpha) + 1e-6
    U, S, Vh = svd(W * s)
    return BalancedSVD(U, S, Vh, 1.0 / s, tuple(W.shape))


def svd_llm_decomposition(W: Tensor, gram: Tensor, name: str | None = None) -> BalancedSVD:
    """SVD-LLM (Wang et al. 2024) truncation-aware whitening.

    G (raw sum of xᵀx, as accumulated) → L = cholesky(G) in float64; if that fails,
    G += (−λ_min(G) + 1e-6)·I and retry; L⁻¹ = inv(L) in float64; both cast to the compute dtype;
    W L = UΣVᵀ; A = U_rΣ_r^½, B = Σ_r^½V_rᵀL⁻¹. Deviation: none. If the shifted Cholesky fails too, a
    ValueError names the layer (the published code would crash with LAPACK's message).
    """
    G = gram.to(device=W.device, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        lam_min = torch.linalg.eigvalsh(G)[0]
        G = G + (-lam_min + 1e-6) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            where = f" for {name}" if name else ""
            raise ValueError(f"svd-llm: Cholesky of the Gram matrix failed{where} even after the eigenvalue shift")
    L_inv = torch.linalg.inv(L)
    L, L_inv = L.to(W.dtype), L_inv.to(W.dtype)
    U, S, Vh = svd(W @ L)
    return BalancedSVD(U, S, Vh, L_inv, tuple(W.shape))


def svd_llm_v2_decomposition(W: Tensor, gram: Tensor) -> BalancedSVD:
    """SVD-LLM V2 truncation (Wang et al. 2025): G = U_s S_s U_sᵀ; D = W U_s S_s^½ = UΣVᵀ;
    W' = U_rΣ_rV_rᵀ S_s^{-½} U_sᵀ.

    The eigendecomposition runs in float64 (then cast to the compute dtype). Deviation (the clamp
    docs/design.md §5 records; the paper gives none): S_s^{-½} is the pseudo-inverse — eigenvalues
    ≤ n·eps(float64)·λ_max, i.e. zero to the float64 eigensolver's precision (negative ones from the rounding
    of G included), get S_s^{½} = S_s^{-½} = 0. Every other eigenvalue is used as computed, as the recipe
    says, even when G (a float32 sum) is far less accurate than that: a tolerance at G's own rounding level
    (n·eps(float32)·λ_max) would drop well-determined directions of ordinary activations (half of them for
    a MiniLM FFN input with cond(X) ≈ 5e3) and misrepresent the method.
    The published per-group ratio allocation lives in ``coala.allocate``, not in this per-matrix solve.
    """
    G = gram.to(device=W.device, dtype=torch.float64)
    evals, Us = torch.linalg.eigh(G)
    tol = G.shape[0] * torch.finfo(torch.float64).eps * float(evals.abs().max())
    keep = evals > tol
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    Us, root, inv_root = Us.to(W.dtype), root.to(W.dtype), inv_root.to(W.dtype)
    U, S, Vh = svd((W @ Us) * root)
    return BalancedSVD(U, S, Vh, inv_root[:, None] * Us.T, tuple(W.shape))
