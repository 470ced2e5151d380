"""The TSQR kernel: the R factor of a triangle stacked on a block of rows, by Householder QR.

``r_of_stacked(R, rows)`` is R([R; rows]); RFactor calls the in-place ``update_r_`` on its own buffer.

On the CPU the update is a blocked, recursive Householder QR that exploits the upper triangle on top of the
stack (what LAPACK's ``tpqrt`` does): the Householder vector of column j is e_j in the triangle and a dense
vector in the new rows only, so the triangle costs nothing and a block of b rows costs ≈ 2·b·n² flops, the
same count as the Gram update XᵀX. The work is arranged so that almost all of it runs in GEMMs:

* the columns are processed in panels of ``PANEL`` columns; each panel is factored recursively
  (Elmroth–Gustavson): halves, down to leaves of at most ``LEAF`` columns factored by LAPACK ``geqrf``;
* reflectors are applied in compact-WY form Qᵀ = I − V Tᵀ Vᵀ, with V = [I; V_B]; T is the upper
  triangular factor of Schreiber–Van Loan, from T⁻¹ = diag(1/τ) + striu(VᵀV) (Puglisi; Joffrain et al. 2006)
  and, across the halves of a node, T₁₂ = −T₁ (V₁ᵀV₂) T₂.
* the leaves call LAPACK ``geqrf`` of torch's own MKL in place on the panel scratch (``lapack.geqrf_``, no
  copies), and the whole panel factorisation runs on one MKL thread; the trailing GEMMs use every thread.

Where the time goes (docs/design.md §11): the trailing updates are 2·b·n·(n − k) flops of large GEMMs; the panels
are ≈ 3·b·k·n flops (the Householder work inside the panels plus T, ≈ k/(2n) more flops than the Gram) in narrow
GEMMs and BLAS-2 leaves that run at roughly half the GEMM rate, plus one transposing copy of the block into the
panel scratch. Profiled at n = 576, b = 8192, one thread: trailing GEMMs 48 ms (83–97 GF/s, the Gram's GEMM runs
at ≈ 100), panels 38 ms (geqrf leaves 13, leaf T factors 6, node GEMMs 20), the copy into the scratch 11 ms, the
small torch calls ≈ 3.5 ms; the Gram of the same rows 54 ms. Hence the cost relative to the Gram update falls
with n: 1.79× at n = 576, 1.41× at 1024, 1.30× at 2048, 1.24× at 4096 on one thread of this project's machine
(core-pinned, benchmarks/runtime.py); 1.71 / 1.38 / 1.22 / 1.18 once RFactor's row buffer got a padded stride
(``tsqr.ROW_PAD``). Tried without gain (within ±5 % noise): panel/leaf 64/16 … 256/32 and
leaf = panel (one MKL geqrf per panel, 57 GF/s, then T by one GEMM: the same 7.5 ms per panel as the recursion),
the copy in 1024-row pieces, MKL's ``somatcopy`` for it (2× slower than torch's two-step copy), a row-major
V, a column-major buffer (torch's transposing fill costs 45 ms per 8192 rows at n = 1024).

Every transform is an orthogonal Householder reflector, so the result is backward stable: it is the exact R
of [R; rows] + E with ‖E‖ = O(eps)·‖[R; rows]‖ (no Gram matrix, no Cholesky, no Gram–Schmidt).
Other devices (CUDA, ...) use one LAPACK/cuSOLVER ``geqrf`` of the stacked matrix.

All arithmetic runs in the dtype of the inputs (float32 or float64); callers upcast first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import lapack

PANEL = 128  # columns per panel: the width k of the trailing GEMMs (b × k) · (k × c)
LEAF = 32  # columns per LAPACK geqrf call (always on one MKL thread: threaded, it is 3–5× slower on these
# tall-skinny panels). Its BLAS-2 work grows ∝ b·n·LEAF; each leaf and node costs ≈ 10–20 small torch calls
# (≈ 5 µs each). Measured at one thread (benchmarks/runtime.py sweep): 16 and 32 within noise, 32 ahead at
# n ≥ 1024 by 2–5 % (half the calls); at n = 576, panel/leaf 64/32, 96/16, 128/16, 128/32, 128/64 and 128/128 all
# 1.75–1.84× the Gram per update.


def normalize_signs(R: Tensor) -> Tensor:
    """Flip rows of an upper-triangular R so that its diagonal is non-negative (R is then unique)."""
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
    return R * signs[:, None]


def r_of_stacked(R: Tensor, rows: Tensor) -> Tensor:
    """R factor (n × n, upper triangular, diagonal ≥ 0) of the stacked matrix [R; rows].

    R: (n × n) upper triangular (its strict lower triangle is ignored); rows: (b × n), b ≥ 0; both of one
    floating dtype and device. Neither input is modified. Q is never formed.
    """
    n = R.shape[1]
    if R.shape != (n, n) or rows.ndim != 2 or rows.shape[1] != n:
        raise ValueError(f"r_of_stacked needs R (n × n) and rows (b × n), got {tuple(R.shape)} and {tuple(rows.shape)}")
    if _fast(R):
        out = R.triu()  # a fresh contiguous copy; the kernel works on it in place
        update_r_(out, rows.to(dtype=R.dtype, memory_format=torch.contiguous_format, copy=True))
        return normalize_signs(out)
    a, _ = torch.geqrf(torch.cat([R.triu(), rows]))
    return normalize_signs(a[:n].triu())


def r_of_rows(rows: Tensor) -> Tensor:
    """R factor (n × n, diagonal ≥ 0) of a (N × n) matrix; zero-padded when N < n (rows ≥ N of R are 0)."""
    N, n = rows.shape
    if N >= n and _fast(rows):
        R = rows.new_zeros(n, n)
        update_r_(R, rows.clone(memory_format=torch.contiguous_format))
        return normalize_signs(R)
    if N < n:
        rows = torch.cat([rows, rows.new_zeros(n - N, n)])
    a, _ = torch.geqrf(rows)
    return normalize_signs(a[:n].triu())


def stack_triangle_(R: Tensor, S: Tensor, workspace: dict[str, Tensor] | None = None) -> None:
    """In place: R ← R factor of [R; S] for two upper-triangular (n × n) factors (a TSQR merge); S is destroyed.

    Rows i0:i1 of S are zero left of column i0, so their reflectors leave the first i0 rows and columns of R
    alone: the update of row block [i0, i1) is R[i0:, i0:] ← R([R[i0:, i0:]; S[i0:i1, i0:]]). In blocks of n/4
    rows this costs ≈ 0.94·n³ flops instead of the 2n³ of a dense n-row update. Signs are not normalised.
    Other devices: one stacked geqrf.
    """
    n = R.shape[1]
    if not _fast(R):
        R.copy_(torch.geqrf(torch.cat([R.triu(), S.triu()]))[0][:n].triu())
        return
    step = max(PANEL, -(-n // 4))
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        if i0 == 0:
            update_r_(R, S[:i1].triu_(), workspace)
            continue
        sub = R[i0:, i0:].contiguous()
        update_r_(sub, S[i0:i1, i0:].triu_(), workspace)
        R[i0:, i0:] = sub


BLOCKED_DEVICES = {"cpu"}  # device types that run the blocked kernel; elsewhere one stacked geqrf per update. The
# kernel runs anywhere torch does (its leaves fall back to torch.geqrf off the CPU): benchmarks/runtime.py times it
# on a GPU by adding "cuda" here.


def _fast(t: Tensor) -> bool:
    return t.device.type in BLOCKED_DEVICES and t.dtype in (torch.float32, torch.float64)


def update_r_(R: Tensor, work: Tensor, workspace: dict[str, Tensor] | None = None) -> None:
    """In place: R ← R factor of [R; work] (upper triangular, signs not normalised); ``work`` is destroyed.

    R: (n × n), contiguous, upper triangular (the strict lower triangle is read as zero and left zero);
    work: (b × n) rows with unit column stride (e.g. a contiguous buffer or a row range of one), same
    dtype/device as R. workspace: a dict the caller keeps between calls for the same R (the kernel stores
    ≈ (2b + 2n + 128)·128 values of scratch in it), so that repeated updates allocate no large temporaries:
    freeing and re-allocating megabyte blocks makes glibc's heap (and the RSS) drift by tens of MB.
    On non-CPU devices this falls back to a stacked ``geqrf`` (``work`` left intact).
    """
    n = R.shape[1]
    b = work.shape[0]
    if b == 0:
        R.copy_(R.triu())
        return
    if not _fast(R):
        a, _ = torch.geqrf(torch.cat([R.triu(), work]))
        R.copy_(a[:n].triu())
        return
    if work.stride(1) != 1 or not R.is_contiguous():
        raise ValueError("update_r_ needs a contiguous R and rows with unit column stride")
    panel = min(PANEL, n)
    ws = {} if workspace is None else workspace
    scratch = _scratch(ws, "panel", panel * (panel + b), R).view(panel, panel + b)  # column-major [R_p; B_p]
    gather = _scratch(ws, "gather", b * panel, R).view(b, panel)
    T_buf = _scratch(ws, "T", panel * panel, R, zero=True).view(panel, panel)  # strict lower part stays 0
    W1, W2 = _scratch(ws, "W1", panel * n, R), _scratch(ws, "W2", panel * n, R)
    lap = _Leaves(_scratch(ws, "tau", panel, R), _scratch(ws, "lwork", 64 * panel, R))
    for j in range(0, n, panel):
        e = min(j + panel, n)
        k = e - j
        P = scratch[:k, : k + b].T  # (k + b) × k, column-major, leading dimension panel + b
        P[:k] = R[j:e, j:e].triu()
        g = gather[:, :k] if k == panel else R.new_empty(b, k)
        g.copy_(work[:, j:e])  # strided rows → contiguous, then one transposing copy (much faster than one step)
        P[k:] = g
        T = T_buf[:k, :k] if e < n else None
        with lapack.single_threaded():  # narrow LAPACK calls and small GEMMs: one thread is fastest
            _factor_panel(P, k, 0, k, T, lap)
        R[j:e, j:e] = P[:k].triu()
        R[e:, j:e] = 0  # the strict lower triangle is left zero, whatever it held
        if e < n:
            V = P[k:]  # (b × k): the dense part of the reflectors; their triangle part is I
            c = n - e
            Y = torch.addmm(R[j:e, e:], V.T, work[:, e:], out=W1[: k * c].view(k, c))
            W = torch.mm(T.T, Y, out=W2[: k * c].view(k, c))
            R[j:e, e:] -= W
            work[:, e:].addmm_(V, W, alpha=-1)


class _Leaves:
    """Scratch for the LAPACK leaf factorisations of one update: τ and geqrf's work array."""

    def __init__(self, tau: Tensor, lwork: Tensor) -> None:
        self.tau, self.lwork = tau, lwork

    def geqrf(self, A: Tensor) -> Tensor:
        """Householder QR of the column-major view A (m × w) in place; returns τ (w,)."""
        w = A.shape[1]
        tau = self.tau[:w]
        if A.device.type == "cpu" and lapack.geqrf_(A, tau, self.lwork):
            return tau
        a, tau = torch.geqrf(A)  # no LAPACK reachable through ctypes: torch's copy-in, copy-out call
        A.copy_(a)
        return tau


def _scratch(ws: dict[str, Tensor], key: str, numel: int, like: Tensor, zero: bool = False) -> Tensor:
    """A flat buffer of at least ``numel`` values of ``like``'s dtype/device, kept in ``ws`` for the next call."""
    buf = ws.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_zeros(numel) if zero else like.new_empty(numel)
        ws[key] = buf
    return buf[:numel]


def _factor_panel(P: Tensor, k: int, c0: int, c1: int, T: Tensor | None, lap: _Leaves) -> None:
    """Factor columns c0:c1 of the column-major panel P = [R_p (k × k, upper); B_p (b × k)] in place.

    Afterwards P[c0:c1, c0:c1] holds the new triangle and P[k:, c0:c1] the dense part V_B of the reflectors
    (their triangle part is the identity on rows c0:c1 and zero on rows c1:k). If ``T`` (k × k, zero below
    the diagonal) is given, T[c0:c1, c0:c1] receives the factor with H_c0 ⋯ H_c1-1 = I − V T Vᵀ (the T of a
    run of reflectors is the diagonal block of the T of any longer run that contains it).
    """
    w = c1 - c0
    if w <= LEAF:
        tau = lap.geqrf(P[c0:, c0:c1])  # rows c1:k of these columns are zero: their reflector part is 0
        if T is not None:
            T[c0:c1, c0:c1] = _t_factor(P[k:, c0:c1], tau)
        return
    m = c0 + max(LEAF, (w // 2) // LEAF * LEAF)
    T_all = T if T is not None else P.new_zeros(k, k)  # the left half's T is needed to update the right half
    _factor_panel(P, k, c0, m, T_all, lap)
    T1 = T_all[c0:m, c0:m]
    V1 = P[k:, c0:m]
    CR = P[c0:m, m:c1]
    CB = P[k:, m:c1]
    W = T1.T @ torch.addmm(CR, V1.T, CB)  # Q₁ᵀ [CR; CB] = [CR; CB] − [I; V1] T₁ᵀ (CR + V1ᵀ CB)
    CR.sub_(W)
    CB.addmm_(V1, W, alpha=-1)
    _factor_panel(P, k, m, c1, T, lap)
    if T is not None:  # T₁₂ = −T₁ (V₁ᵀV₂) T₂
        T[c0:m, m:c1] = (T1 @ (V1.T @ P[k:, m:c1])) @ T[m:c1, m:c1].neg()


def _t_factor(VB: Tensor, tau: Tensor) -> Tensor:
    """T (w × w, upper) of reflectors V = [I; VB] with scalars τ: T = (I + D·striu(VᵀV))⁻¹ D, D = diag(τ).

    Division-free, so τ_i = 0 (H_i = I) is handled exactly.
    """
    M = torch.triu(VB.T @ VB, 1).mul_(tau[:, None])
    M.diagonal().add_(1)
    return torch.linalg.solve_triangular(M, torch.diag(tau), upper=True, unitriangular=True)
