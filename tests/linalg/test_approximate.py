"""The COALA solve (`approximate`, `decompose`, `truncation_loss`) against independent float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coala import ActivationStats, RFactor, approximate, decompose, truncation_loss

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _product(W, X, r, **kw) -> torch.Tensor:
    A, B = approximate(W, X, r, **kw)
    return A.to(F64) @ B.to(F64)


@pytest.mark.parametrize("m, n, N", [(12, 9, 40), (9, 12, 40), (10, 16, 5), (16, 10, 3), (8, 8, 1)])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 3e-6)])
def test_full_rank_reproduces_W_on_the_row_space_of_X(ref, m, n, N, dtype, tol):
    W = ref.randn(m, n, seed=m * n, dtype=dtype)
    X = ref.randn(N, n, seed=N, dtype=dtype)
    A, B = approximate(W, X, min(m, n))
    assert A.shape == (m, min(m, n)) and B.shape == (min(m, n), n)
    assert A.dtype == B.dtype == dtype
    WX = W.to(F64) @ X.to(F64).T
    assert _rel((A.to(F64) @ B.to(F64)) @ X.to(F64).T, WX) < tol  # ‖(W − AB)Xᵀ‖ / ‖WXᵀ‖


def test_coala_is_the_weighted_optimum(ref):
    m, n, N = 24, 16, 200
    W = ref.randn(m, n, seed=1)
    X = ref.well_conditioned(N, n, cond=20.0, seed=2)
    dec = decompose(W, X)
    for r in range(1, n + 1):
        A, B = dec.factors(r)
        W_opt = ref.optimum(W, X, r)
        assert _rel(A @ B, W_opt) < 1e-9, r
        assert ref.loss(W, A @ B, X) == pytest.approx(ref.loss(W, W_opt, X), rel=1e-10, abs=1e-20)
    # float32: same optimum up to float32 rounding
    for r in (1, 5, 12):
        Wp = _product(W.float(), X.float(), r)
        assert _rel(Wp, ref.optimum(W.float(), X.float(), r)) < 1e-4


@pytest.mark.parametrize("N", [120, 9])  # 9 < n: rank-deficient X, losses vanish from r = 9 on
def test_truncation_loss_equals_the_direct_error(ref, N):
    m, n = 14, 11
    W = ref.randn(m, n, seed=3)
    X = ref.well_conditioned(N, n, cond=1e3, seed=4)
    loss = truncation_loss(W, X)
    assert loss.dtype == F64 and loss.shape == (min(m, n) + 1,)
    assert loss[0] == pytest.approx(ref.loss(W, torch.zeros_like(W), X), rel=1e-12)
    dec = decompose(W, X)
    scale = ref.loss(W, torch.zeros_like(W), X)
    for r in range(1, min(m, n) + 1):
        A, B = dec.factors(r)
        assert float(loss[r]) == pytest.approx(ref.loss(W, A @ B, X), rel=1e-8, abs=1e-24 * scale), r
    assert torch.allclose(loss, ref.optimal_losses(W, X), rtol=1e-9, atol=1e-24 * scale)
    assert bool((loss[:-1] >= loss[1:]).all())
    # the same curve from a streamed RFactor
    f = RFactor(n, dtype=F64, block_rows=4).update(X)
    assert torch.allclose(truncation_loss(W, f), loss, rtol=1e-9, atol=1e-24 * scale)


@pytest.mark.parametrize("mu", [1e-3, 0.5, 40.0])
def test_mu_equals_the_explicit_augmented_problem(ref, mu):
    m, n, N = 10, 12, 30
    W = ref.randn(m, n, seed=5)
    X = ref.matrix(N, n, torch.logspace(0, -6, n), seed=6)  # ill-conditioned: μ matters
    aug = torch.cat([X, mu**0.5 * torch.eye(n, dtype=F64)])
    f = RFactor(n, dtype=F64).update(X)
    for r in (1, 4, 9):
        Wp = _product(W, X, r, mu=mu)
        assert _rel(Wp, _product(W, aug, r)) < 1e-9
        assert _rel(Wp, _product(W, f, r, mu=mu)) < 1e-9
        W_opt = ref.optimum(W, X, r, mu=mu)  # minimiser of ‖(W − W')Xᵀ‖² + μ‖W − W'‖²
        assert _rel(Wp, W_opt) < 1e-7
        assert ref.loss(W, Wp, X, mu) == pytest.approx(ref.loss(W, W_opt, X, mu), rel=1e-10)


@pytest.mark.parametrize("mu", [0.1, 10.0])
def test_adaptive_mu_follows_the_paper_rule(ref, mu):
    m, n, N = 16, 12, 50
    W = ref.randn(m, n, seed=7)
    X = 37.0 * ref.well_conditioned(N, n, cond=1e2, seed=8)  # the rule must not depend on the scale of X
    dec = decompose(W, X, mu=mu, adaptive_mu=True)
    for r in (2, 6, 11):
        W0 = ref.optimum(W, X, r)  # the μ = 0 solution, computed independently
        D = W - W0
        mu_eff = mu * float((D @ X.T).square().sum() / D.square().sum())
        assert dec.effective_mu(r) == pytest.approx(mu_eff, rel=1e-9)
        A, B = dec.factors(r)
        assert _rel(A @ B, _product(W, X, r, mu=mu_eff)) < 1e-9
        assert _rel(_product(W, X, r, mu=mu, adaptive_mu=True), A @ B) < 1e-12
    # W of rank ≤ r: nothing is truncated, so no regularisation is applied
    low = ref.randn(m, 3, seed=9) @ ref.randn(3, n, seed=10)
    d = decompose(low, X, mu=mu, adaptive_mu=True)
    assert d.effective_mu(5) == 0.0
    assert _rel(torch.matmul(*d.factors(5)), low) < 1e-10


@pytest.mark.parametrize(
    "w_dtype, x_dtype, compute",
    [
        (F64, F64, F64),
        (torch.float32, torch.float32, torch.float32),
        (F64, torch.float32, torch.float32),
        (torch.float32, F64, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, F64, torch.float32),
    ],
)
def test_compute_and_output_dtypes(ref, w_dtype, x_dtype, compute):
    W = ref.randn(10, 8, seed=11, dtype=w_dtype)
    X = ref.well_conditioned(40, 8, seed=12).to(x_dtype)
    for method in ("coala", "svd", "asvd", "svd-llm", "svd-llm-v2"):
        A, B = decompose(W, X, method=method).factors(3)
        assert A.dtype == B.dtype == compute, method
        A, B = approximate(W, X, 3, method=method)
        assert A.dtype == B.dtype == w_dtype, method
    # the data actually given, in float64: float64 compute is exact to ~1e-15, float32 to ~1e-7
    Wp = _product(W, X, 3)
    err = _rel(Wp, ref.optimum(W.to(F64), X.to(F64), 3))
    if compute == F64:
        assert err < 1e-12
    elif w_dtype in (torch.float32, F64):
        assert err < 1e-4


def test_statistics_dtype_sets_compute_dtype(ref):
    W = ref.randn(6, 5, seed=13)
    X = ref.randn(20, 5, seed=14)
    assert decompose(W, RFactor(5, dtype=F64).update(X)).factors(2)[0].dtype == F64
    assert decompose(W, RFactor(5, dtype=torch.float32).update(X)).factors(2)[0].dtype == torch.float32
    stats = ActivationStats(5, ("r", "gram", "absmean"), dtype=F64).update(X)
    for method in ("coala", "svd-llm", "svd-llm-v2", "asvd"):
        assert decompose(W, stats, method=method).factors(2)[0].dtype == F64


def test_tensor_rfactor_and_stats_contexts_agree(ref):
    W = ref.randn(9, 7, seed=15)
    X = ref.well_conditioned(64, 7, cond=1e3, seed=16)
    f = RFactor(7, dtype=F64, block_rows=10)
    stats = ActivationStats(7, ("r",), dtype=F64)
    for part in X.split(13):
        f.update(part)
        stats.update(part)
    for r in (1, 3, 7):
        P = _product(W, X, r)
        assert _rel(_product(W, f, r), P) < 1e-10
        assert _rel(_product(W, stats, r), P) < 1e-10


@pytest.mark.parametrize("method", ["coala", "svd", "asvd", "svd-llm", "svd-llm-v2"])
def test_factors_are_nested_across_ranks(ref, method):
    """factors(r) is the leading part of factors(max_rank): one SVD serves every rank (the benchmark uses it)."""
    W = ref.randn(8, 10, seed=17, dtype=torch.float32)
    X = ref.well_conditioned(50, 10, seed=18).float()
    dec = decompose(W, X, method=method)
    A_full, B_full = dec.factors(dec.max_rank)
    for r in (1, 4, 8):
        A, B = dec.factors(r)
        assert torch.allclose(A, A_full[:, :r], rtol=0, atol=1e-6)
        assert torch.allclose(B, B_full[:r], rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    N=st.integers(1, 30),
    dtype=st.sampled_from([F64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fuzz_shapes_dtypes_ranks(ref, m, n, N, dtype, seed, data):
    r = data.draw(st.integers(1, min(m, n)), label="rank")
    W = ref.randn(m, n, seed=seed, dtype=dtype)
    X = ref.randn(N, n, seed=seed + 1, dtype=dtype)
    A, B = approximate(W, X, r)
    assert A.shape == (m, r) and B.shape == (r, n)
    assert A.dtype == B.dtype == dtype
    assert bool(torch.isfinite(A).all() and torch.isfinite(B).all())
    Wd, Xd = W.to(F64), X.to(F64)
    total = ref.loss(Wd, torch.zeros_like(Wd), Xd)
    best = float(ref.optimal_losses(Wd, Xd)[r])
    got = ref.loss(Wd, A.to(F64) @ B.to(F64), Xd)
    # float64: optimal to rounding; float32 (also for bf16 in): ~1e-6 relative before bf16 output rounding
    tol = {F64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert got >= best - tol * total
    assert got <= best + tol * total
