"""Property-based fuzzing (hypothesis) of ``coala.approximate`` and ``coala.RFactor`` on hostile inputs: NaN / ±Inf
entries, huge, tiny and subnormal magnitudes, rank-deficient W and X, in float16 / bfloat16 / float32 / float64.

Every case either raises a ``coala.CoalaError`` naming the bad argument, or returns finite factors whose
weighted error matches the float64 optimum within the stated tolerance. The reference is computed in float64
from the very values coala received (after rounding to the input dtype), with W and X scaled by powers of two
(exact) so that it neither overflows nor underflows. With e_c the machine epsilon of the compute dtype (float64
for float64 inputs, else float32), e_o that of the returned factors (W's dtype), δ_c / δ_o the smallest
subnormals of the two, and all norms Frobenius:

    | ‖(W − AB)Xᵀ‖ − min_{rank ≤ r} ‖(W − W')Xᵀ‖ | ≤ (32 (m + n) e_c + 2 √r e_o) ‖W‖‖X‖ + floor,
    floor = 64 (N n δ_c ‖W‖ + (m n δ_c + r n δ_o) ‖X‖)          (rounding of subnormal intermediates)

and for ``RFactor``: ‖RᵀR − XᵀX‖ ≤ 32 (N + n) e_acc ‖X‖² + 64 N n δ_acc ‖X‖ (R is backward stable).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coala import CoalaError, RFactor, approximate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAGNITUDES = {  # the scale of a matrix, by dtype: log2 of 2^k with |entries| ≤ 4 · 2^k
    "unit": {d: 0 for d in DTYPES},
    "huge": {torch.float16: 13, torch.bfloat16: 100, torch.float32: 100, torch.float64: 900},
    "tiny": {torch.float16: -10, torch.bfloat16: -100, torch.float32: -100, torch.float64: -900},
    "subnormal": {torch.float16: -20, torch.bfloat16: -130, torch.float32: -135, torch.float64: -1040},
}
SPECIALS = (float("nan"), float("inf"), float("-inf"))
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def matrix(draw, rows: int, cols: int, dtype: torch.dtype, deficient_rank: int | None = None) -> torch.Tensor:
    """rows × cols in ``dtype``: N(0,1) entries clamped to ±4, of one magnitude, optionally of lower rank."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    M = torch.randn(rows, cols, generator=g, dtype=F64).clamp(-4, 4)
    if deficient_rank is not None:  # a product of thin factors; rank ≤ deficient_rank
        k = deficient_rank
        M = (M[:, :k] @ torch.randn(k, cols, generator=g, dtype=F64)).clamp(-4, 4) / max(1, k)
    exponent = MAGNITUDES[draw(st.sampled_from(sorted(MAGNITUDES)))][dtype]
    return (M * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)).to(dtype)


def _scale(t: torch.Tensor) -> float:
    big = float(t.abs().max())
    return 2.0 ** math.frexp(big)[1] if big > 0 else 1.0


def _subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


@st.composite
def problem(draw):
    dtype = draw(st.sampled_from(DTYPES))
    m, n, N = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 10))
    W = draw(matrix(m, n, dtype, draw(st.sampled_from([None, None, 1]))))
    X = draw(matrix(N, n, dtype, draw(st.sampled_from([None, None, 1]))))
    if draw(st.booleans()) and N > 1:
        X[draw(st.integers(0, N - 1))] = 0  # a zero row
    special = draw(st.sampled_from([None, None, None, "W", "X"]))
    if special is not None:
        target = W if special == "W" else X
        target[draw(st.integers(0, target.shape[0] - 1)), draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return W, X, draw(st.integers(1, min(m, n))), special


@FUZZ
@given(problem())
def test_approximate_is_an_error_naming_the_argument_or_near_optimal(case):
    W, X, r, special = case
    if special is not None:
        with pytest.raises(CoalaError, match=rf"^{special} .*non-finite") as info:
            approximate(W, X, r)
        assert info.value.argument == special
        return
    A, B = approximate(W, X, r)
    assert A.dtype == B.dtype == W.dtype and A.shape == (W.shape[0], r) and B.shape == (r, W.shape[1])
    assert bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
    sW, sX = _scale(W.to(F64)), _scale(X.to(F64))
    Wn, Xn = W.to(F64) / sW, X.to(F64) / sX
    err = float(torch.linalg.matrix_norm((Wn - A.to(F64) @ (B.to(F64) / sW)) @ Xn.T))
    sv = torch.linalg.svdvals(Wn @ Xn.T)
    opt = float(sv[r:].square().sum().sqrt())
    m, n, N = *W.shape, X.shape[0]
    compute = F64 if W.dtype == F64 else torch.float32
    e_c, e_o = torch.finfo(compute).eps, torch.finfo(W.dtype).eps
    nW, nX = float(torch.linalg.matrix_norm(Wn)), float(torch.linalg.matrix_norm(Xn))
    floor = 64 * (N * n * _subnormal(compute) / sX * nW + (m * n * _subnormal(compute) + r * n * _subnormal(W.dtype))
                  / sW * nX)
    tol = (32 * (m + n) * e_c + 2 * math.sqrt(r) * e_o) * nW * nX + floor
    assert -tol <= err - opt <= tol, f"{W.dtype} m={m} n={n} N={N} r={r}: err {err:.6g} opt {opt:.6g} tol {tol:.3g}"


@st.composite
def stream(draw):
    in_dtype, acc = draw(st.sampled_from(DTYPES)), draw(st.sampled_from([torch.float32, F64]))
    n, N = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    x = draw(matrix(N, n, in_dtype, draw(st.sampled_from([None, None, 1]))))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    special = draw(st.sampled_from([None, None, "kept", "masked"]))
    if special is not None and (mask.any() if special == "kept" else (~mask).any()):
        row = int(torch.nonzero(mask if special == "kept" else ~mask)[0])
        x[row, draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    else:
        special = None
    return x, mask, acc, draw(st.integers(1, 5)), special


@FUZZ
@given(stream())
def test_rfactor_is_an_error_naming_the_argument_or_backward_stable(case):
    x, mask, acc, block_rows, special = case
    R = RFactor(x.shape[1], dtype=acc, block_rows=block_rows, name="layer.q")
    if special == "kept":  # NaN / Inf on a real token: named; on a padding token (mask 0): ignored
        with pytest.raises(CoalaError, match=r"^activations in layer\.q contains 1 non-finite") as info:
            R.update(x, mask)
        assert info.value.argument == "activations" and info.value.layer == "layer.q"
        return
    kept = x[mask].to(F64)
    big = float(kept.abs().max()) if kept.numel() else 0.0
    if x.dtype == F64 and acc == torch.float32 and (big > torch.finfo(acc).max or 0 < big < torch.finfo(acc).tiny):
        with pytest.raises(CoalaError, match=r"^x in layer\.q holds values up to .* outside the range of float32"):
            R.update(x, mask)
        return
    R.update(x, mask)
    assert R.num_rows == int(mask.sum())
    got = R.R.to(F64)
    assert bool(torch.isfinite(got).all()) and torch.equal(got, got.triu()) and bool((got.diagonal() >= 0).all())
    s = _scale(kept) if kept.numel() else 1.0
    Xn, Rn = kept / s, got / s
    N, n = kept.shape
    nX = float(torch.linalg.matrix_norm(Xn)) if N else 0.0
    tol = 32 * (N + n) * torch.finfo(acc).eps * nX**2 + 64 * N * n * _subnormal(acc) / s * nX
    gap = float(torch.linalg.matrix_norm(Rn.T @ Rn - Xn.T @ Xn)) if N else float(torch.linalg.matrix_norm(Rn))
    assert gap <= tol, f"{x.dtype} → {acc}, N={N} n={n}: ‖RᵀR − XᵀX‖ = {gap:.3g} > {tol:.3g}"
