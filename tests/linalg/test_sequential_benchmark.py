"""benchmarks/sequential.py's solves on small float64 problems: the error-correcting solve (docs/design.md §4)
reaches the optimum of min_{rank W' ≤ r} ‖W Xᵀ − W'X̃ᵀ‖, computed here another way, and reduces to COALA when
X̃ = X."""

from __future__ import annotations

import pytest
import torch

from _benchmarks import load_benchmark

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def objective(W, Wn, X, Xt) -> float:
    return float(torch.linalg.matrix_norm(W @ X.T - Wn @ Xt.T) ** 2)


def optimum(W, X, Xt, r) -> float:
    """min over rank-r W' of ‖W Xᵀ − W'X̃ᵀ‖² via X̃ = Q₁R₁₁ (R₁₁ invertible): W'X̃ᵀ = M Q₁ᵀ for any rank-r M, so
    the optimum is Σ_{i>r} σ_i(W Xᵀ Q₁)² + ‖W Xᵀ(I − Q₁Q₁ᵀ)‖²."""
    Q1 = torch.linalg.qr(Xt)[0]
    target = W @ X.T
    inside = target @ Q1
    s = torch.linalg.svdvals(inside)
    return float((s[r:] ** 2).sum() + torch.linalg.matrix_norm(target - inside @ Q1.T) ** 2)


@pytest.mark.parametrize(("m", "n", "N", "r"), [(24, 16, 200, 5), (16, 24, 300, 8)])
def test_corrected_solve_reaches_the_optimum(ref, m, n, N, r):
    seq = load_benchmark("sequential")
    W = ref.randn(m, n, seed=50)
    X = ref.matrix(N, n, torch.logspace(0, -3, n, dtype=F64), seed=51)
    Xt = X + 0.05 * ref.randn(N, n, seed=52)  # the compressed model's inputs: close to X, not equal
    corrected = seq.solve("corrected", W, X, Xt, r, {})
    propagated = seq.solve("propagated", W, X, Xt, r, {})
    assert torch.linalg.matrix_rank(corrected) == r
    best = optimum(W, X, Xt, r)
    assert objective(W, corrected, X, Xt) == pytest.approx(best, rel=1e-9)
    assert objective(W, propagated, X, Xt) > 1.01 * best  # fitting W X̃ᵀ is not fitting W Xᵀ
    basis = seq.solve("corrected-basis", W, X, Xt, r, {})
    assert best < objective(W, basis, X, Xt) < objective(W, propagated, X, Xt) * 1.5


def test_every_variant_is_coala_when_the_inputs_agree(ref):
    seq = load_benchmark("sequential")
    W = ref.randn(20, 12, seed=53)
    X = ref.matrix(100, 12, torch.logspace(0, -2, 12, dtype=F64), seed=54)
    R = ref.r_factor(X)
    U = torch.linalg.svd(W @ R.T)[0][:, :4]
    coala = U @ (U.T @ W)
    for variant in ("propagated", "corrected", "corrected-basis", "partial:0.5"):
        assert torch.allclose(seq.solve(variant, W, X, X.clone(), 4, {}), coala, atol=1e-10), variant


def test_partial_zero_is_propagated_and_one_is_corrected(ref):
    seq = load_benchmark("sequential")
    W = ref.randn(18, 10, seed=55)
    X = ref.matrix(80, 10, torch.logspace(0, -1, 10, dtype=F64), seed=56)
    Xt = X + 0.1 * ref.randn(80, 10, seed=57)
    assert torch.allclose(seq.solve("partial:0", W, X, Xt, 3, {}), seq.solve("propagated", W, X, Xt, 3, {}),
                          atol=1e-10)
    assert torch.allclose(seq.solve("partial:1", W, X, Xt, 3, {}), seq.solve("corrected", W, X, Xt, 3, {}),
                          atol=1e-10)
    with pytest.raises(ValueError, match="unknown variant"):
        seq.solve("nope", W, X, Xt, 3, {})


def test_block_inputs_pairs_the_two_streams_of_a_real_block():
    from _tiny_models import inputs, tiny
    from coala.blocks import block_layers, catch_block_inputs, find_blocks, normalize_batches

    seq = load_benchmark("sequential")
    model = tiny("llama")
    prefix, blocks = find_blocks(model)
    layers = block_layers(model, blocks, prefix, None)[0]
    batches = normalize_batches([inputs(seed=s, batch=2, seq=9) for s in (1, 2, 3)])
    original = catch_block_inputs(model, blocks[0], batches, progress=False)
    compressed = catch_block_inputs(model, blocks[0], batches, progress=False)
    for b in range(len(compressed)):  # the compressed stream: other inputs for the same tokens
        compressed.set_hidden(b, compressed.hidden(b) * 1.5)
    with torch.no_grad():
        pairs, outputs = seq.block_inputs(blocks[0], layers, original, compressed)
    assert set(pairs) == set(layers) and len(outputs) == 3
    q, k, v = (pairs[f"{prefix}.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v  # one input tensor: one pair
    o = pairs[f"{prefix}.0.self_attn.o_proj"]
    gate, up, down = (pairs[f"{prefix}.0.mlp.{p}_proj"] for p in ("gate", "up", "down"))
    assert gate is up and o is not q and down is not gate
    for X, Xt in pairs.values():
        assert X.shape == Xt.shape and X.shape[0] == 3 * 2 * 9 and X.dtype == F64
        assert not torch.allclose(X, Xt)
    assert down[0].shape[1] == 96 and q[0].shape[1] == 64


def test_regularised_propagated_is_coalas_own_regularised_solve(ref):
    from coala.linalg.solve import CoalaDecomposition

    seq = load_benchmark("sequential")
    W = ref.randn(14, 10, seed=58)
    X = ref.matrix(60, 10, torch.logspace(0, -6, 10, dtype=F64), seed=59)
    mu = 0.1 * float((X * X).sum()) / 10
    A, B = CoalaDecomposition(W, ref.r_factor(X), mu=mu).factors(4)
    assert torch.allclose(seq.solve("propagated:0.1", W, X, X, 4, {}), A @ B, atol=1e-10)
    assert not torch.allclose(seq.solve("propagated", W, X, X, 4, {}), A @ B, atol=1e-6)
