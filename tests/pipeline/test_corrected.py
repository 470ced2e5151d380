"""propagate="corrected": the error-correcting COALA solve (docs/design.md §4) in the block walker, against the
float64 reference of benchmarks/sequential.py on the same tiny Llama, and its settings' errors."""

from __future__ import annotations

import copy

import pytest
import torch

from _benchmarks import load_benchmark
from _compress_models import batches, build, output, settings
from coala.compress import compress
from coala.config import CompressConfig
from coala.errors import CoalaError
from coala.linalg.corrected import CorrectedDecomposition
from coala.lowrank import dense_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("correction", [0.25, 1.0])
def test_compress_matches_the_float64_reference(correction):
    seq = load_benchmark("sequential")
    model = build("llama", layers=3, init=0.3)
    data = batches(n=3, batch=4, seq=16)
    rank = 6
    report = compress(ours := copy.deepcopy(model), data, **settings(
        rank=rank, propagate="corrected", correction=correction, stats_dtype="float64"))
    assert report.propagate == "corrected"
    names = [r.name for r in report.layers]
    reference, _ = seq.run_variant(model, data, dict.fromkeys(names, rank), None, f"partial:{correction}")
    for name in names:
        W = dense_weight(ours.get_submodule(name)).detach().double()
        W_ref = reference.get_submodule(name).weight.detach().double()
        assert torch.linalg.matrix_rank(W.float()) == rank
        assert torch.linalg.matrix_norm(W - W_ref) <= 1e-4 * torch.linalg.matrix_norm(W_ref), name
    assert torch.allclose(output(ours, data[0]), output(reference, data[0]), rtol=1e-3, atol=1e-4)
    assert all(0.0 <= r.rel_error < 1.0 for r in report.layers)  # ‖W Yᵀ − W′X̃ᵀ‖ / ‖W Yᵀ‖ from the paired R
    # block 0 sees X̃ = X (the same solve as plain COALA); later blocks fit another target than plain propagation
    compress(plain := copy.deepcopy(model), data, **settings(rank=rank, propagate="compressed", stats_dtype="float64"))
    for name, differs in ((names[0], False), (names[-1], True)):
        W, W_plain = (dense_weight(m.get_submodule(name)).detach().double() for m in (ours, plain))
        gap = float(torch.linalg.matrix_norm(W - W_plain) / torch.linalg.matrix_norm(W_plain))
        assert (gap > 1e-3) == differs, (name, gap)


def test_offloaded_streams_give_the_in_memory_result(tmp_path, monkeypatch):
    """Both streams on disk (the original one a copy of block 0's caught inputs, in a folder inside the other's):
    the same layers as with the hidden states in memory, and no file left behind."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    model = build("llama", layers=3, init=0.3)
    data = batches(n=3, batch=4, seq=16)
    common = dict(rank=6, propagate="corrected", stats_dtype="float64")
    report = compress(memory := copy.deepcopy(model), data, **settings(**common))
    compress(disk := copy.deepcopy(model), data, **settings(**common, offload_hidden=True))
    for name in (r.name for r in report.layers):
        assert torch.equal(dense_weight(memory.get_submodule(name)), dense_weight(disk.get_submodule(name))), name
    assert not list(tmp_path.rglob("*.safetensors"))


def test_settings_errors_name_the_argument():
    with pytest.raises(CoalaError, match="correction must be in") as e:
        CompressConfig(propagate="corrected", correction=0.0)
    assert e.value.argument == "correction"
    with pytest.raises(CoalaError, match="needs method 'coala'"):
        CompressConfig(propagate="corrected", method="svd-llm")
    with pytest.raises(CoalaError, match="needs method 'coala'"):
        CompressConfig(propagate="corrected", adaptive_mu=True, mu=1.0)


def test_rank_deficient_inputs_need_mu(ref):
    W = ref.randn(6, 8, seed=70)
    Xt = ref.randn(5, 8, seed=71)  # 5 rows for 8 columns: R₁₁ is singular
    R = ref.r_factor(torch.cat([Xt, Xt], 1))
    with pytest.raises(CoalaError, match="rank-deficient") as e:
        CorrectedDecomposition(W, R, name="blk.0.q_proj").factors(2)
    assert "blk.0.q_proj" in str(e.value)
    A, B = CorrectedDecomposition(W, R, mu=1e-3).factors(2)  # μ > 0 makes it well posed
    assert A.shape == (6, 2) and B.shape == (2, 8) and bool(torch.isfinite(B).all())


def test_decompose_solves_layers_with_too_few_paired_rows_on_the_compressed_inputs_alone(ref):
    """Fewer than MIN_ROWS_PER_COLUMN · n paired rows: the refit of B would fit the calibration tokens (or, below n
    rows, divide by a singular R₁₁), so ``decompose`` runs plain COALA on X̃; from that many rows on, the corrected
    solve."""
    from coala.linalg.corrected import MIN_ROWS_PER_COLUMN
    from coala.linalg.methods import decompose
    from coala.linalg.solve import CoalaDecomposition

    n = 8
    W = ref.randn(6, n, seed=72)
    for rows, corrected in ((5, False), (MIN_ROWS_PER_COLUMN * n - 1, False), (MIN_ROWS_PER_COLUMN * n, True)):
        Xt, X = ref.randn(rows, n, seed=73), ref.randn(rows, n, seed=74)
        paired = torch.cat([Xt, 0.75 * Xt + 0.25 * X], 1)
        got = decompose(W, paired, paired=True)
        assert isinstance(got, CorrectedDecomposition) == corrected
        want = (CorrectedDecomposition(W, ref.r_factor(paired)) if corrected
                else CoalaDecomposition(W, ref.r_factor(Xt)))
        for r in (2, 5):
            torch.testing.assert_close(got.factors(r)[0] @ got.factors(r)[1], want.factors(r)[0] @ want.factors(r)[1],
                                       rtol=1e-9, atol=1e-10)


def test_an_input_that_never_varies_in_some_direction_is_solved_on_the_compressed_inputs(ref):
    """Many rows, but one input column always zero (a zero weight in the norm before the layer): R₁₁ is singular and
    B undefined there, so without μ ``decompose`` runs plain COALA on X̃; with μ > 0 the corrected solve stands."""
    from coala.linalg.corrected import zero_pivot
    from coala.linalg.methods import decompose
    from coala.linalg.solve import CoalaDecomposition

    n = 8
    W = ref.randn(6, n, seed=75)
    Xt, X = ref.randn(64, n, seed=76), ref.randn(64, n, seed=77)
    Xt[:, 3] = 0.0
    paired = torch.cat([Xt, 0.75 * Xt + 0.25 * X], 1)
    assert zero_pivot(ref.r_factor(Xt)) and not zero_pivot(ref.r_factor(X))
    got = decompose(W, paired, paired=True)
    assert isinstance(got, CoalaDecomposition)
    want = CoalaDecomposition(W, ref.r_factor(Xt))
    torch.testing.assert_close(got.factors(4)[0] @ got.factors(4)[1], want.factors(4)[0] @ want.factors(4)[1],
                               rtol=1e-9, atol=1e-10)
    A, B = decompose(W, paired, paired=True, mu=0.1).factors(4)
    assert bool(torch.isfinite(A @ B).all())
    assert isinstance(decompose(W, paired, paired=True, mu=0.1), CorrectedDecomposition)
