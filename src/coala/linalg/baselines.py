"""Baselines as published (docs/design.md §5). Each returns a Decomposition; deviations are documented.

All arithmetic is in the compute dtype (float32, or float64 when W and X are float64) except where the
published recipe says float64 (SVD-LLM's Cholesky and inverse) or where coala chooses it for a baseline's
benefit (SVD-LLM V2's decomposition of the Gram matrix, §5). SVDs use ``lapack.svd`` (one MKL thread below
2048 columns), like COALA's.
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
    """ASVD (Yuan et al. 2023), abs-mean scaling: s_j = mean_tokens(|x_j|)^α + 1e-6; SVD of W·diag(s);
    W' = U_rΣ_rV_rᵀ diag(s)⁻¹.

    ``absmean``: (in,) mean of |x| per input channel (float64 sums over real tokens). α = 0.5 is the published
    default. Deviations from the published code (hahnyuan/ASVD4LLM), docs/design.md §5: an exact SVD instead of
    ``torch.svd_lowrank(w, q=rank)`` (randomised, no oversampling: never better than the exact one); the mean is
    over all real tokens instead of a sum over calibration sequences of per-sequence means (accumulated in the
    model's dtype), which rescales s by a constant and so only moves the 1e-6 relative to s; ranks come from
    coala's allocations (ASVD's own sensitivity search ≈ ``allocation="sensitivity"``); the abs-max and Fisher
    scalings and channel splitting are not implemented.
    """
    s = absmean.to(W).pow(alpha) + 1e-6
    U, S, Vh = svd(W * s)
    return BalancedSVD(U, S, Vh, 1.0 / s, tuple(W.shape))


def svd_llm_decomposition(W: Tensor, gram: Tensor, name: str | None = None) -> BalancedSVD:
    """SVD-LLM (Wang et al. 2024) truncation-aware whitening, as in the published code (SVDLLM.py).

    G (raw sum of xᵀx, as accumulated) → L = cholesky(G) in float64; if that fails,
    G += (−λ_min(G) + 1e-6)·I and retry; L⁻¹ = inv(L) in float64; both cast to the compute dtype;
    W L = UΣVᵀ; A = U_rΣ_r^½, B = Σ_r^½V_rᵀL⁻¹. The 1e-6 of the shift is absolute, as published: negligible
    next to a Gram summed over many tokens of real activations, but it sets a floor of 1e-6 on the eigenvalues,
    so on data of small scale (‖X‖₂ ≈ 1) it dominates the small directions. Deviation: if the shifted Cholesky
    fails too, a ValueError names the layer (the published code would crash with LAPACK's message).
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
    """SVD-LLM V2 truncation (Wang et al. 2025): SVD of G = U_s S_s U_sᵀ; D = W U_s S_s^½ = UΣVᵀ;
    W' = U_rΣ_rV_rᵀ S_s^{-½} U_sᵀ.

    S_s are the *singular values* of G, as the paper's SVD of the Gram matrix returns them: computed as |λ| of
    a float64 ``eigh`` of G (same U_s up to signs, which cancel in D and W'). A float32 Gram of ill-conditioned
    X has rounding-noise eigenvalues of either sign where X has small singular values; the singular values keep
    those directions with their noise-level weight, while clamping negative eigenvalues to zero would remove
    them from W' altogether (the excess error this cost was 5× larger at rank 224 of 256 in the stability
    setting, docs/design.md §5). The only deviation: S_s^{-½} is a pseudo-inverse — singular values
    ≤ n·eps(float64)·max S_s, zero to the float64 eigensolver's precision (the published formula would divide
    by zero), get S_s^{½} = S_s^{-½} = 0. The float64 eigendecomposition (the COALA authors' rendition runs
    a float32 SVD of G) only removes rounding of the method's own; D and its SVD are in the compute dtype.
    The published per-group ratio allocation lives in ``coala.allocate``, not in this per-matrix solve.
    """
    G = gram.to(device=W.device, dtype=torch.float64)
    evals, Us = torch.linalg.eigh(G)
    sv = evals.abs()  # the singular values of the symmetric G
    keep = sv > G.shape[0] * torch.finfo(torch.float64).eps * float(sv.max())
    root = torch.where(keep, sv.sqrt(), torch.zeros_like(sv))
    inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    Us, root, inv_root = Us.to(W.dtype), root.to(W.dtype), inv_root.to(W.dtype)
    U, S, Vh = svd((W @ Us) * root)
    return BalancedSVD(U, S, Vh, inv_root[:, None] * Us.T, tuple(W.shape))
