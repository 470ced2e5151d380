"""The blocked Householder TSQR kernel (coala.linalg.qr_update) against float64 references.

Stability is checked on ill-conditioned X (cond 1e8 and 1e12, log-spaced singular values) with three
float64-evaluated measures of the float32 result R̂:
  * forward error ‖R̂ − R₆₄‖_F / ‖R₆₄‖_F against LAPACK's float64 Householder R (diag ≥ 0),
  * Gram residual ‖R̂ᵀR̂ − XᵀX‖_F / ‖X‖₂²,
  * orthogonal backward error min_Q ‖X − Q R̂‖_F / ‖X‖_F (Q with orthonormal columns, by Procrustes),
all a small multiple of eps(float32). A Gram-based R (SVD-LLM's shifted Cholesky of the fp32 Gram) fails them
by orders of magnitude, which shows that the checks can fail.
"""

from __future__ import annotations

import math

import pytest
import torch

import coala.linalg.qr_update as q
from coala.linalg.qr_update import _t_factor, normalize_signs, r_of_rows, r_of_stacked, update_r_
from coala.linalg.tsqr import RFactor, default_block_rows

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(F64).eps


def _ill_conditioned(N: int, n: int, cond: float, seed: int) -> torch.Tensor:
    """X = U diag(s) Vᵀ (N × n, float64) with s log-spaced from 3 down to 3/cond; U, V random orthonormal."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(N, n, dtype=F64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    s = 3.0 * torch.logspace(0, -math.log10(cond), n, dtype=F64)
    return (U * s) @ V.T


def _reference(X: torch.Tensor) -> torch.Tensor:
    return normalize_signs(torch.linalg.qr(X.to(F64), mode="r")[1])


def _errors(X: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
    """Forward, Gram and orthogonal backward errors of R̂ as an R factor of X, in float64."""
    X, R = X.to(F64), R.to(F64)
    R_ref = _reference(X)
    fro = torch.linalg.matrix_norm
    U, _, Vh = torch.linalg.svd(X @ R.T, full_matrices=False)  # best Q = U Vᵀ (orthogonal Procrustes)
    return {
        "forward": float(fro(R - R_ref) / fro(R_ref)),
        "gram": float(fro(R.T @ R - X.T @ X) / torch.linalg.matrix_norm(X, 2) ** 2),
        "backward": float(fro(X - (U @ Vh) @ R) / fro(X)),
    }


def _assert_stable_fp32(X: torch.Tensor, R: torch.Tensor, what: str) -> None:
    err = _errors(X, R)
    limits = {"forward": 60 * EPS32, "gram": 60 * EPS32, "backward": 30 * EPS32}
    bad = {k: f"{err[k] / EPS32:.1f} eps" for k in err if not err[k] <= limits[k]}
    assert not bad, f"{what}: {bad} (limits {', '.join(f'{k} {v / EPS32:.0f} eps' for k, v in limits.items())})"


def _stream_stacked(X: torch.Tensor, block: int) -> torch.Tensor:
    R = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype)
    for i in range(0, X.shape[0], block):
        R = r_of_stacked(R, X[i : i + block])
    return R


@pytest.fixture(params=[(q.PANEL, q.LEAF), (128, 64), (24, 5)], ids=["shipped", "panel128-leaf64", "panel24-leaf5"])
def blocking(request, monkeypatch):
    """The shipped blocking, wide leaves, and a small one whose uneven splits exercise every branch."""
    panel, leaf = request.param
    monkeypatch.setattr(q, "PANEL", panel)
    monkeypatch.setattr(q, "LEAF", leaf)
    return request.param


@pytest.mark.parametrize("cond", [1e8, 1e12])
def test_fp32_matches_float64_reference_on_ill_conditioned_X(blocking, cond):
    X = _ill_conditioned(500, 140, cond, seed=int(math.log10(cond)))  # n = 140: a full and a partial panel
    X32 = X.float()
    _assert_stable_fp32(X, r_of_rows(X32), "one shot")
    _assert_stable_fp32(X, _stream_stacked(X32, 97), "r_of_stacked chain, b=97 < n")
    _assert_stable_fp32(X, RFactor(140, block_rows=333).update(X32).R, "RFactor, block_rows=333")
    a = RFactor(140, block_rows=200).update(X32[:300])
    _assert_stable_fp32(X, a.merge(RFactor(140, block_rows=50).update(X32[300:])).R, "merge of two factors")


def test_lapack_fp32_passes_and_gram_shortcut_fails_the_same_checks():
    X = _ill_conditioned(500, 140, 1e8, seed=3)
    X32 = X.float()
    _assert_stable_fp32(X, normalize_signs(torch.linalg.qr(X32, mode="r")[1]), "LAPACK fp32 geqrf")
    G = (X32.T @ X32).to(F64)  # SVD-LLM: fp32 Gram, shifted Cholesky in float64
    G += (-torch.linalg.eigvalsh(G)[0] + 1e-6) * torch.eye(140, dtype=F64)
    R_gram = torch.linalg.cholesky(G).T.float()
    err = _errors(X, R_gram)
    assert err["forward"] > 1e3 * EPS32 and err["backward"] > 1e3 * EPS32, err


@pytest.mark.parametrize("cond", [1e8, 1e12])
def test_fp64_matches_lapack(blocking, cond):
    X = _ill_conditioned(400, 140, cond, seed=7)
    for R in (r_of_rows(X), _stream_stacked(X, 64), RFactor(140, dtype=F64, block_rows=41).update(X).R):
        err = _errors(X, R)
        assert err["forward"] < 60 * EPS64 and err["gram"] < 60 * EPS64, {k: v / EPS64 for k, v in err.items()}


def test_blocked_kernel_equals_stacked_geqrf_route(blocking, monkeypatch):
    g = torch.Generator().manual_seed(11)
    R0 = r_of_rows(torch.randn(300, 70, dtype=F64, generator=g))
    rows = torch.randn(90, 70, dtype=F64, generator=g)
    fast = r_of_stacked(R0, rows)
    monkeypatch.setattr(q, "_fast", lambda t: False)  # the route other devices take
    slow = r_of_stacked(R0, rows)
    R_inplace = R0.clone()
    update_r_(R_inplace, rows.clone())
    assert torch.allclose(fast, slow, rtol=0, atol=1e-12 * float(slow.abs().max()))
    assert torch.allclose(normalize_signs(R_inplace), slow, rtol=0, atol=1e-12 * float(slow.abs().max()))


def test_t_factor_is_the_compact_wy_form_of_the_reflectors():
    g = torch.Generator().manual_seed(5)
    k, b = 9, 30
    top = torch.randn(k, k, dtype=F64, generator=g).triu()
    B = torch.randn(b, k, dtype=F64, generator=g)
    top[0, 0], B[:, 0] = 2.0, 0.0  # column 0 is already reduced: τ₀ = 0, H₀ = I
    a, tau = torch.geqrf(torch.cat([top, B]))
    assert float(tau[0]) == 0.0
    assert torch.count_nonzero(a[:k].tril(-1)) == 0  # the triangle part of every reflector is e_j
    V = torch.cat([torch.eye(k, dtype=F64), a[k:]])
    T = _t_factor(a[k:], tau)
    Q = torch.eye(k + b, dtype=F64) - V @ T @ V.T
    assert torch.allclose(Q[:, :k], torch.linalg.householder_product(a, tau), atol=1e-13)
    assert torch.allclose(Q.T @ Q, torch.eye(k + b, dtype=F64), atol=1e-13)


def test_lower_triangle_is_ignored_and_inputs_are_not_modified(blocking):
    g = torch.Generator().manual_seed(2)
    R0 = r_of_rows(torch.randn(80, 40, generator=g))
    rows = torch.randn(50, 40, generator=g)
    dirty = R0 + torch.randn(40, 40, generator=g).tril(-1)
    R0_copy, rows_copy, dirty_copy = R0.clone(), rows.clone(), dirty.clone()
    clean = r_of_stacked(R0, rows)
    assert torch.equal(r_of_stacked(dirty, rows), clean)
    assert torch.equal(R0, R0_copy) and torch.equal(rows, rows_copy) and torch.equal(dirty, dirty_copy)
    assert torch.count_nonzero(clean.tril(-1)) == 0 and bool((clean.diagonal() >= 0).all())
    R = dirty.clone()
    update_r_(R, rows.clone())
    assert torch.count_nonzero(R.tril(-1)) == 0


def test_rows_that_require_grad_leave_no_graph():
    x = torch.randn(23, 8, requires_grad=True)
    f = RFactor(8, block_rows=5).update(x)
    assert not f.R.requires_grad and not f._buf.requires_grad
    assert torch.allclose(f.R, _reference(x.detach()).float(), atol=1e-5)


def test_handed_out_R_is_not_changed_by_later_updates():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 24, dtype=F64, generator=g)
    f = RFactor(24, dtype=F64, block_rows=30).update(X[:100])
    first = f.R
    snapshot = first.clone()
    f.update(X[100:])
    assert torch.equal(first, snapshot)
    assert torch.allclose(f.R, _reference(X), atol=1e-12)


@pytest.mark.parametrize("N,n", [(5, 1), (1, 7), (3, 20), (20, 20), (40, 17), (300, 129)])
def test_shapes_and_few_rows(N, n):
    g = torch.Generator().manual_seed(N * 1000 + n)
    X = torch.randn(N, n, dtype=F64, generator=g)
    R = r_of_rows(X)
    assert R.shape == (n, n) and torch.allclose(R.T @ R, X.T @ X, atol=1e-12 * float((X * X).sum()))
    if N < n:  # the padded route: rows N.. of R are exactly zero, as before
        assert torch.count_nonzero(R[N:]) == 0
    else:
        assert torch.allclose(R, _reference(X), atol=1e-12 * float(R.abs().max()))
    S = r_of_stacked(torch.zeros(n, n, dtype=F64), X)  # few rows under a zero triangle
    assert torch.allclose(S.T @ S, X.T @ X, atol=1e-12 * float((X * X).sum()))


def test_empty_rows_noncontiguous_rows_and_zero_columns():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(60, 30, dtype=F64, generator=g)
    R = r_of_rows(X)
    assert torch.equal(r_of_stacked(R, X[:0]), normalize_signs(R))
    Xt = torch.randn(30, 60, dtype=F64, generator=g).T  # a transposed (column-major) view
    assert torch.allclose(r_of_stacked(R, Xt), _reference(torch.cat([X, Xt])), atol=1e-12 * 30)
    Z = X.clone()
    Z[:, [0, 7, 29]] = 0.0  # exactly zero columns: τ = 0 reflectors and zero rows of R
    RZ = r_of_rows(Z)
    assert torch.allclose(RZ.T @ RZ, Z.T @ Z, atol=1e-12 * float((Z * Z).sum()))
    assert torch.count_nonzero(RZ[[0, 7, 29]]) == 0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="r_of_stacked"):
        r_of_stacked(torch.zeros(4, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="r_of_stacked"):
        r_of_stacked(torch.zeros(4, 3), torch.zeros(3, 3))


def test_default_block_rows():
    for n in (1, 64, 1024, 4096, 16384):
        b = default_block_rows(n)
        assert isinstance(b, int) and b * n <= max(2**24, 2048 * n)  # buffer ≤ max(64 MB, 8 KB · n) in fp32
        assert default_block_rows(n, "cpu") == b
        if n <= 1024:
            assert RFactor(n).block_rows == b
        d = default_block_rows(n, "meta")  # devices that use the stacked geqrf: tall updates, buffer ≤ 1 GiB
        assert d >= 4 * n and (d * n * 4 <= 2**30 or d == 4 * n)
    assert default_block_rows(1024, "meta") == default_block_rows(4096, "meta") == 65536
    assert default_block_rows(6144, "meta") == 2**30 // (4 * 6144)  # the 1 GiB cap
    assert default_block_rows(16384, "meta") == 4 * 16384  # the 4n floor


def test_buffer_grows_with_the_rows_it_holds():
    X = torch.randn(700, 32, dtype=torch.float64)
    f = RFactor(32, dtype=torch.float64, block_rows=10_000, lanes=1)
    f.update(X[:5])
    assert f._buf.shape[0] == 4096  # not the 10,000 rows of a whole block
    f.update(X[5:])
    g = RFactor(32, dtype=torch.float64, block_rows=10_000, lanes=1)
    for part in X.split(3):
        g.update(part)
    ref = torch.linalg.qr(X, mode="r")[1]
    ref = ref * torch.sign(ref.diagonal())[:, None]
    assert torch.allclose(f.R, ref, atol=1e-12) and torch.allclose(g.R, ref, atol=1e-12)
    big = RFactor(8, dtype=torch.float64, block_rows=10_000, lanes=1).update(torch.randn(6000, 8, dtype=torch.float64))
    assert big._buf.shape[0] == 6000 and big._fill == 6000
    big.update(torch.randn(1, 8, dtype=torch.float64))
    assert big._buf.shape[0] == 10_000  # doubled, capped at the block
