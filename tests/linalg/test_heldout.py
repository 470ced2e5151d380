"""Held-out truncation loss (coala.linalg.heldout): a projection fitted on some rows, measured on others."""

from __future__ import annotations

import pytest
import torch

from coala.linalg import decompose
from coala.linalg.heldout import cross_validated_loss, generalization_loss, heldout_loss
from coala.linalg.stats import ActivationStats, stats_from_rows


def _rows(n_rows: int, n: int, seed: int, decay: float = -3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, decay, n, dtype=torch.float64)
    return torch.randn(n_rows, n, generator=g, dtype=torch.float64) * scales


def _direct(W: torch.Tensor, U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """‖(W − U_r U_rᵀ W) Xᵀ‖² for every r, in float64 from the rows themselves."""
    out = []
    for r in range(U.shape[1] + 1):
        Ur = U[:, :r]
        out.append(float(((W - Ur @ (Ur.T @ W)) @ X.T).square().sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(24, 16), (12, 16)])
@pytest.mark.parametrize("kind", ["r", "gram"])
def test_heldout_loss_matches_the_rows_in_float64(shape, kind):
    out, n = shape
    W = torch.randn(out, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fit, test = _rows(40, n, 1), _rows(30, n, 2)
    U = decompose(W, fit, method="coala").basis()
    got = heldout_loss(W, U, stats_from_rows(test, (kind,), torch.float64))
    want = _direct(W, U, test)
    assert got.dtype == torch.float64 and got.shape == (min(out, n) + 1,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want[0]))
    assert bool((got[:-1] >= got[1:] - 1e-12 * float(want[0])).all())  # more rank never costs more


def test_on_its_own_rows_it_is_the_in_sample_tail():
    W = torch.randn(20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = _rows(50, 16, 4)
    dec = decompose(W, X, method="coala")
    got = heldout_loss(W, dec.basis(), stats_from_rows(X, ("r",), torch.float64))
    torch.testing.assert_close(got, dec.truncation_loss(), rtol=1e-9, atol=1e-12 * float(got[0]))


def test_few_rows_make_the_in_sample_tail_optimistic():
    """The reason the held-out curve exists: fitted on fewer rows than the width, the in-sample tail of a
    middle rank is 0 while other rows of the same distribution still lose."""
    W = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    A, B = _rows(12, 32, 6, decay=0.0), _rows(12, 32, 7, decay=0.0)
    folds = [stats_from_rows(A, ("r",), torch.float64), stats_from_rows(B, ("r",), torch.float64)]
    in_sample = decompose(W, A, method="coala").truncation_loss()
    cv = cross_validated_loss(W, folds, lambda part: decompose(W, part, method="coala").basis())
    assert float(in_sample[12]) < 1e-20 * float(in_sample[0])
    assert float(cv[12]) > 0.1 * float(cv[0])


def test_cross_validation_sums_both_directions_and_merges_more_folds():
    W = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    parts = [_rows(20, 8, 10 + i) for i in range(3)]
    folds = [stats_from_rows(p, ("r",), torch.float64) for p in parts]
    basis = lambda s: decompose(W, s, method="coala").basis()  # noqa: E731
    got = cross_validated_loss(W, folds[:2], basis)
    want = _direct(W, basis(folds[0]), parts[1]) + _direct(W, basis(folds[1]), parts[0])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want[0]))
    three = cross_validated_loss(W, folds, basis)
    want3 = sum(_direct(W, decompose(W, torch.cat([p for j, p in enumerate(parts) if j != f]), method="coala").basis(),
                        parts[f]) for f in range(3))
    torch.testing.assert_close(three, want3, rtol=1e-8, atol=1e-12 * float(want3[0]))
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validated_loss(W, folds[:1], basis)


def test_of_folds_merges_exactly_and_keeps_the_parts():
    parts = [_rows(30, 12, 20), _rows(25, 12, 21)]
    folds = [stats_from_rows(p, ("r", "gram", "absmean"), torch.float64) for p in parts]
    merged = ActivationStats.of_folds(folds)
    whole = stats_from_rows(torch.cat(parts), ("r", "gram", "absmean"), torch.float64)
    assert merged.num_rows == 55 and merged.folds is not None and len(merged.folds) == 2
    torch.testing.assert_close(merged.r.R, whole.r.R, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged.gram.G, whole.gram.G)
    moved = merged.to("cpu")
    assert moved.folds is not None and moved.folds[1].num_rows == 25
    assert folds[0].num_rows == 30  # the parts were not changed by the merge


def test_a_method_without_statistics_of_the_held_out_rows_is_refused():
    W = torch.randn(6, 5, dtype=torch.float64)
    U = torch.linalg.svd(W, full_matrices=False)[0]
    with pytest.raises(ValueError, match="needs an R factor or a Gram matrix"):
        heldout_loss(W, U, ActivationStats(5, ("absmean",), dtype=torch.float64))


def test_generalization_estimate_is_a_quarter_own_rows_three_quarters_held_out():
    W = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(30))
    parts = [_rows(15, 7, 31), _rows(15, 7, 32)]
    folds = [stats_from_rows(p, ("r",), torch.float64) for p in parts]
    basis = lambda s: decompose(W, s, method="coala").basis()  # noqa: E731
    own = _direct(W, basis(folds[0]), parts[0]) + _direct(W, basis(folds[1]), parts[1])
    held = _direct(W, basis(folds[0]), parts[1]) + _direct(W, basis(folds[1]), parts[0])
    got = generalization_loss(W, folds, basis)
    torch.testing.assert_close(got, 0.25 * own + 0.75 * held, rtol=1e-9, atol=1e-12 * float(held[0]))
    assert bool((own <= got + 1e-9).all()) and bool((got <= held + 1e-9).all())
    with pytest.raises(ValueError, match="2 folds"):
        generalization_loss(W, folds + folds[:1], basis)
