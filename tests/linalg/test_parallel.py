"""Side-by-side work (coala.linalg.parallel), RFactor lanes, the triangle merge and the direct LAPACK leaves,
against float64 references and the single-thread route."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import coala.linalg.qr_update as q
from coala.errors import CoalaError
from coala.linalg import RFactor, lapack
from coala.linalg.parallel import parallel_map, worker_count
from coala.linalg.qr_update import normalize_signs, r_of_rows, r_of_stacked, stack_triangle_
from coala.linalg.tsqr import default_block_rows, default_lanes

F64 = torch.float64


def _ill(N: int, n: int, cond: float, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(N, n, dtype=F64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return ((U * torch.logspace(0, -math.log10(cond), n, dtype=F64)) @ V.T).to(dtype)


def _reference(X: torch.Tensor) -> torch.Tensor:
    return normalize_signs(torch.linalg.qr(X.to(F64), mode="r")[1])


def test_parallel_map_keeps_order_pins_workers_and_raises():
    seen: list[tuple[int, int]] = []

    def work(i: int) -> int:
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return i * i

    assert parallel_map(work, list(range(9)), workers=3) == [i * i for i in range(9)]
    if worker_count() > 1:  # the workers run torch's OpenMP loops and MKL on one thread each
        assert {t for _, t in seen} == {1}
    assert torch.get_num_threads() >= 1  # the caller's own setting is untouched
    assert parallel_map(work, [4], workers=3) == [16]  # one item: run in the caller
    barrier = threading.Barrier(3, timeout=60)  # passes only if three items run at the same time
    assert parallel_map(lambda i: barrier.wait() >= 0, [0, 1, 2], workers=3) == [True] * 3

    def boom(i: int) -> int:
        if i == 2:
            raise ValueError("item 2")
        return i

    with pytest.raises(ValueError, match="item 2"):
        parallel_map(boom, [0, 1, 2, 3], workers=2)


def test_workers_take_the_callers_autograd_and_inference_modes():
    X = torch.randn(600, 80, dtype=F64)
    with torch.inference_mode():  # tensors made here may only be updated in place in inference mode
        f = RFactor(80, dtype=F64, block_rows=100, lanes=2).update(X)
        assert torch.allclose(f.R, _reference(X), atol=1e-10)
    with torch.no_grad():
        assert parallel_map(lambda _: torch.is_grad_enabled(), [0, 1, 2], workers=2) == [False] * 3
    assert parallel_map(lambda _: torch.is_grad_enabled(), [0, 1, 2], workers=2) == [True] * 3


def _finishes(fn, seconds: float = 60.0):
    """fn() run in a daemon thread; its result, or a failure (not a hung suite) when it deadlocks."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"deadlock: not finished within {seconds} s"
    return box[0]


def test_nested_parallel_map_runs_inline_instead_of_deadlocking():
    # every worker of the 2-thread pool waits for work submitted to that same pool: deadlocked before
    inner = lambda i: sum(parallel_map(lambda j: i * j, [1, 2, 3], workers=2))  # noqa: E731
    assert _finishes(lambda: parallel_map(inner, [1, 2], workers=2)) == [6, 12]


def test_solver_threads_reading_factors_with_lanes():
    # what `coala compress` does: layers sharing an input read its R from parallel solver threads, and the first
    # read folds the lanes side by side (parallel_map inside parallel_map): hung `benchmarks/gpu_check.py` on CPU
    X = _ill(3000, 96, 1e4, seed=11)
    factors = [RFactor(96, dtype=F64, block_rows=500, lanes=2).update(X) for _ in range(2)]
    Rs = _finishes(lambda: parallel_map(lambda f: f.R, [factors[0], factors[1], factors[0], factors[1]], workers=2))
    scale = float(_reference(X).abs().max())
    assert all(torch.allclose(R, _reference(X), atol=1e-11 * scale) for R in Rs)


def test_a_read_inside_a_worker_takes_every_row_on_one_lane():
    # lanes folded inside a solver thread would run one after the other and then need a merge: one lane does the
    # same work without the merge, and gives the single-lane factor bit for bit
    X = _ill(900, 96, 1e4, seed=12)
    one = RFactor(96, dtype=F64, block_rows=1000, lanes=1).update(X).R
    two_in_worker = _finishes(lambda: parallel_map(lambda f: f.R, [RFactor(96, dtype=F64, block_rows=1000,
                                                                           lanes=2).update(X)] * 2, workers=2))
    assert torch.equal(two_in_worker[0], one) and torch.equal(two_in_worker[1], one)
    two_outside = RFactor(96, dtype=F64, block_rows=1000, lanes=2).update(X).R  # two lanes of 450 rows, merged
    assert not torch.equal(two_outside, one)
    assert torch.allclose(two_outside, one, atol=1e-11 * float(one.abs().max()))


def test_worker_count_and_default_lanes():
    assert worker_count("meta") == 1 and default_lanes(4096, "meta") == 1
    assert default_lanes(16) == 1  # tiny widths: one thread is already fast
    assert 1 <= default_lanes(1024) <= 4
    assert default_lanes(11008) == 1  # one lane alone is ≈ 0.6 GB there
    with pytest.raises(CoalaError, match="lanes"):
        RFactor(8, lanes=0)
    with pytest.raises(CoalaError, match="lanes"):
        RFactor(8, device="meta", lanes=2)


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_give_the_single_lane_factor(lanes):
    X = _ill(1400, 96, 1e8, seed=lanes)
    ref = _reference(X)
    one = RFactor(96, dtype=F64, block_rows=100, lanes=1)
    many = RFactor(96, dtype=F64, block_rows=100, lanes=lanes)
    for part in X.split([333, 1, 500, 566]):
        one.update(part)
        many.update(part)
    assert many.num_rows == one.num_rows == 1400
    scale = float(ref.abs().max())
    assert torch.allclose(many.R, ref, atol=1e-12 * scale) and torch.allclose(one.R, ref, atol=1e-12 * scale)
    # float32: the same rounding-level agreement with the float64 reference
    X32 = X.float()
    f32 = RFactor(96, block_rows=128, lanes=lanes).update(X32)
    err = float((f32.R.to(F64) - ref).norm() / ref.norm())
    assert err < 60 * torch.finfo(torch.float32).eps
    # reading R folds the lanes; more rows after a read keep working, and the handed-out R stays as it was
    first = many.R
    snapshot = first.clone()
    many.update(X[:300])
    assert torch.equal(first, snapshot)
    assert torch.allclose(many.R, _reference(torch.cat([X, X[:300]])), atol=1e-12 * scale)


def test_lanes_state_dict_and_merge():
    X = _ill(900, 70, 1e6, seed=5)
    a = RFactor(70, dtype=F64, block_rows=64, lanes=2).update(X[:500])
    b = RFactor(70, dtype=F64, block_rows=64, lanes=3).update(X[500:])
    a.merge(b)
    assert a.num_rows == 900
    assert torch.allclose(a.R, _reference(X), atol=1e-12 * float(_reference(X).abs().max()))
    c = RFactor(70, dtype=F64, lanes=2).load_state_dict(a.state_dict())
    assert torch.equal(c.R, a.R)


@pytest.mark.parametrize("n", [1, 9, 130, 300])
def test_stack_triangle_is_the_r_of_two_stacked_triangles(n):
    g = torch.Generator().manual_seed(n)
    A = r_of_rows(torch.randn(2 * n + 3, n, dtype=F64, generator=g))
    B = r_of_rows(torch.randn(n + 5, n, dtype=F64, generator=g)) * 1e-3
    ref = r_of_stacked(A, B)
    R = A.clone()
    stack_triangle_(R, B.clone())
    assert torch.count_nonzero(R.tril(-1)) == 0
    assert torch.allclose(normalize_signs(R), ref, atol=1e-12 * float(ref.abs().max()))


def test_direct_lapack_leaves_match_torch_geqrf_and_the_fallback(monkeypatch):
    for dtype in (torch.float32, F64):
        if not lapack.available(dtype):
            pytest.skip("torch's LAPACK is not reachable through ctypes on this build")
        g = torch.Generator().manual_seed(1)
        A = torch.randn(7, 40, dtype=dtype, generator=g)  # row-major 7 × 40 = column-major 40 × 7
        ref, tau_ref = torch.geqrf(A.T.contiguous())
        tau = torch.empty(7, dtype=dtype)
        assert lapack.geqrf_(A.T, tau, torch.empty(64 * 7, dtype=dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(A.T, ref, atol=tol) and torch.allclose(tau, tau_ref, atol=tol)
    with pytest.raises(ValueError, match="column-major"):
        lapack.geqrf_(torch.zeros(4, 3), torch.zeros(3), torch.zeros(192))
    X = _ill(700, 140, 1e8, seed=9)
    fast = r_of_rows(X)
    monkeypatch.setattr(lapack, "available", lambda dtype: False)  # torch.geqrf inside the same kernel
    slow = r_of_rows(X)
    assert torch.allclose(fast, slow, atol=1e-12 * float(slow.abs().max()))
    with lapack.single_threaded():
        assert torch.allclose(r_of_rows(X), slow, atol=1e-12 * float(slow.abs().max()))


def test_default_block_rows_grows_for_narrow_inputs():
    assert default_block_rows(576) == 8192 and default_block_rows(1024) == 8192
    assert default_block_rows(2048) == 4096 and default_block_rows(4096) == 4096
    assert default_block_rows(16384) == 2048 and default_block_rows(1) == 8192
    assert q.PANEL >= q.LEAF >= 1
