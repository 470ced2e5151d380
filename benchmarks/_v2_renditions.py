"""Other renditions of SVD-LLM V2's truncation, for the stability benchmark's side-by-side check (issue: coala's
svd-llm-v2 had several times the excess error of the COALA authors' code at rank 224 of 256).

Each takes float32 W (m × n) and X (tokens × n) and returns W' = A_r B_r (float64 product of its factors).

- ``authors``: ``svd_llm_2_method`` of the COALA authors' repository (urparkina/COALA, lib/Solvers.py,
  Apache-2.0), transcribed line by line in our layout (their X is our Xᵀ): Cov = XᵀX, a float32 SVD of Cov,
  then D and its SVD in float32.
- ``clamped``: coala's earlier rule — float64 ``eigh`` of the float32 Gram, negative eigenvalues set to zero
  (their directions dropped from W'), float32 D and SVD.
- ``floor``: the recipe (singular values of G) evaluated entirely in float64 on the same float32 Gram: what any
  implementation can reach from that Gram.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def authors(W: Tensor, X: Tensor, r: int) -> Tensor:
    Cov = X.T @ X  # their X @ X.T with X of shape (d × N)
    U_s, S_s, _ = torch.linalg.svd(Cov, full_matrices=False)
    D = W @ U_s @ torch.diag(torch.sqrt(S_s))
    U, S, Vt = torch.linalg.svd(D, full_matrices=False)
    A, B = U[:, :r], torch.diag(S[:r]) @ Vt[:r, :] @ torch.diag(1 / torch.sqrt(S_s)) @ U_s.T
    return A.to(F64) @ B.to(F64)


def clamped(W: Tensor, X: Tensor, r: int) -> Tensor:
    G = (X.T @ X).to(F64)
    lam, Us = torch.linalg.eigh(G)
    keep = lam > G.shape[0] * torch.finfo(F64).eps * float(lam.abs().max())
    root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1 / root.clamp_min(torch.finfo(F64).tiny), torch.zeros_like(lam))
    Us32, root32, inv32 = Us.float(), root.float(), inv.float()
    U, S, Vh = torch.linalg.svd((W @ Us32) * root32, full_matrices=False)
    A, B = U[:, :r] * S[:r], Vh[:r] @ (inv32[:, None] * Us32.T)
    return A.to(F64) @ B.to(F64)


def floor(W: Tensor, X: Tensor, r: int) -> Tensor:
    Us, S, _ = torch.linalg.svd((X.T @ X).to(F64))
    U, sig, Vh = torch.linalg.svd(W.to(F64) @ Us * S.sqrt(), full_matrices=False)
    return (U[:, :r] * sig[:r]) @ Vh[:r] / S.sqrt() @ Us.T


RENDITIONS = {"authors' svd_llm_2_method (float32)": authors, "earlier coala (negative λ clamped)": clamped,
              "recipe in float64 on the float32 Gram": floor}
