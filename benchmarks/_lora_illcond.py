"""Part 1 of ``benchmarks/lora.py``: adapter products under ill-conditioned context, float32 inputs.

X (N × n, float32) with prescribed condition number, W (m × n, float32). Reference: the float64 solve on the
very same float32 data (R of X in float64, SVD in float64): P_ref = U_rU_rᵀW (IPM: top r; KPM: the r smallest
supported directions). Compared (relative Frobenius error of the adapter product):

- coala, default precision (IPM: R accumulated in float32; KPM: R in float64; SVD in float64),
- coala all-float32 (R and SVD in float32),
- CorDA as peft computes it, float32: C = XᵀX/N, C_d = C + d·mean(diag C)·I (d = 0.01 doubled until
  ‖C_d C_d⁻¹ − I‖_F < 0.05), SVD(W C_d), product U_rΣ_r(V_rᵀC_d⁻¹),
- the same CorDA recipe in float64: the error that remains is the damping's bias, not rounding.

Two kinds of ill-conditioning: "channels" (a few input channels carry huge values: X = G·diag(s), as in LLM
activations with outlier features) and "rotated" (X = G·diag(s)·Qᵀ, small directions mixed into all channels).
For IPM the excess weighted loss ‖(W − P)Xᵀ‖²/min − 1 is reported too (0 = optimal).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from coala.adapters import coala_lora_factors, corda_decompose
from coala.linalg import RFactor

KINDS = ("channels", "rotated")


def make_problem(kind: str, cond: float, m: int, n: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X float32 (N × n), W float32 (m × n)) with cond(X) ≈ ``cond`` (measured on the float32 X)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = torch.randn(N, n, generator=g, dtype=torch.float64) * s
    if kind == "rotated":
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        X = X @ Q.T
    elif kind != "channels":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    return X.float(), W.float()


def _r_factor(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """R of X streamed by coala's RFactor in ``dtype``."""
    rf = RFactor(X.shape[1], dtype=dtype, block_rows=max(4 * X.shape[1], 512))
    rf.update(X)
    return rf.R


def _rel(P: torch.Tensor, ref: torch.Tensor) -> float:
    """‖P − ref‖_F / ‖ref‖_F in float64."""
    return float(torch.linalg.matrix_norm(P.double() - ref) / torch.linalg.matrix_norm(ref))


def run_case(kind: str, cond: float, mode: str, *, m: int, n: int, N: int, rank: int) -> dict:
    """One table row: every route's relative error against the float64 reference (+ excess loss for IPM)."""
    X, W = make_problem(kind, cond, m, n, N)
    X64, W64 = X.double(), W.double()
    R32, R64 = _r_factor(X, torch.float32), _r_factor(X, torch.float64)
    B, A = coala_lora_factors(W64, R64, rank, mode=mode, solve_dtype=torch.float64)
    ref = B @ A
    default_R = R32 if mode == "ipm" else R64
    B, A = coala_lora_factors(W, default_R, rank, mode=mode, solve_dtype=torch.float64)
    P_default = B.float().double() @ A.float().double()  # as stored in a float32 adapter
    B, A = coala_lora_factors(W, R32, rank, mode=mode, solve_dtype=torch.float32)
    P32 = B.double() @ A.double()
    c32 = corda_decompose(W, X.T @ X / N)
    c64 = corda_decompose(W64, X64.T @ X64 / N)
    P_c32, P_c64 = c32.product(rank, mode), c64.product(rank, mode)
    row = {
        "kind": kind, "cond_target": cond, "cond_X": float(torch.linalg.cond(X64)), "mode": mode,
        "coala": _rel(P_default, ref), "coala_fp32": _rel(P32, ref),
        "corda_fp32": _rel(P_c32, ref), "corda_fp64": _rel(P_c64, ref),
        "corda_damp": c32.damp, "corda_inv_err": c32.inverse_error,
    }
    if mode == "ipm":
        opt = float(torch.linalg.matrix_norm((W64 - ref) @ X64.T) ** 2)
        for key, P in (("coala", P_default), ("corda_fp32", P_c32)):
            row[f"excess_{key}"] = float(torch.linalg.matrix_norm((W64 - P.double()) @ X64.T) ** 2) / opt - 1
    return row


def run(conds: Iterable[float], *, m: int, n: int, N: int, rank: int) -> list[dict]:
    """``run_case`` for every kind × mode × condition number."""
    conds = list(conds)
    return [run_case(kind, c, mode, m=m, n=n, N=N, rank=rank) for kind in KINDS for mode in ("ipm", "kpm")
            for c in conds]


_LABELS = {"coala": "coala (default precision)", "coala_fp32": "coala all-fp32", "corda_fp32": "CorDA fp32",
           "corda_fp64": "CorDA fp64"}


def plot(rows: list[dict], path: str | os.PathLike) -> None:
    """Relative error against cond(X), one panel per mode, a line per route and kind; saved to ``path``."""
    from _report import new_figure

    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharey=True)
    styles = {"coala": ("C0", "o"), "coala_fp32": ("C2", "s"), "corda_fp32": ("C3", "^"), "corda_fp64": ("C1", "v")}
    for ax, mode in zip(axes, ("ipm", "kpm"), strict=True):
        for kind, ls in (("channels", "-"), ("rotated", "--")):
            sub = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
            for key, (color, marker) in styles.items():
                ax.loglog([r["cond_X"] for r in sub], [max(r[key], 1e-12) for r in sub], ls, color=color,
                          marker=marker, label=f"{_LABELS[key]} ({kind})")
        ax.axhline(1e-5, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{mode.upper()}: adapter product vs float64 reference")
        ax.set_xlabel("cond(X), float32 activations")
    axes[0].set_ylabel("relative error ‖P − P_ref‖_F / ‖P_ref‖_F")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
