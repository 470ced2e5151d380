"""Bad input raises a ValueError / TypeError that says what is wrong and where (the layer name)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coala import ActivationStats, RFactor, approximate, decompose, truncation_loss
from coala.linalg import GramAccumulator

F64 = torch.float64


@pytest.fixture
def WX():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(30, 5, generator=g)


@pytest.mark.parametrize("rank", [0, -1, 6])
def test_rank_out_of_range(WX, rank):
    W, X = WX
    with pytest.raises(ValueError, match=rf"rank in blk\.0\.q must be in \[1, min\(out, in\)\] = \[1, 5\], got {rank}"):
        approximate(W, X, rank, name="blk.0.q")
    with pytest.raises(ValueError, match="rank"):
        decompose(W, X).factors(rank)


@pytest.mark.parametrize("rank", [2.0, True, "2", None, torch.tensor(2.0)])
def test_rank_of_the_wrong_type(WX, rank):
    W, X = WX
    with pytest.raises(TypeError, match="rank in L must be an int"):
        approximate(W, X, rank, name="L")


def test_integer_like_ranks_are_accepted(WX):
    W, X = WX
    for rank in (np.int64(3), torch.tensor(3)):
        A, B = approximate(W, X, rank)
        assert A.shape == (6, 3) and B.shape == (3, 5)


def test_shape_mismatch(WX):
    W, X = WX
    msg = r"X \(layer mlp\.up\) must have shape \(tokens, 5\) to match W of shape \(6, 5\)"
    with pytest.raises(ValueError, match=msg):
        approximate(W, X[:, :4], 2, name="mlp.up")
    with pytest.raises(ValueError, match=r"must have shape \(tokens, 5\)"):
        approximate(W, X.reshape(2, 15, 5), 2)
    with pytest.raises(ValueError, match="has no rows"):
        approximate(W, X[:0], 2)
    with pytest.raises(ValueError, match=r"W in L must be 2-D .* got shape \(25,\)"):
        approximate(W[0].repeat(5), X, 2, name="L")
    with pytest.raises(ValueError, match=r"RFactor \(layer L\) has in_features=4, but W has 5 input columns"):
        approximate(W, RFactor(4).update(X[:, :4]), 2, name="L")
    with pytest.raises(ValueError, match=r"statistics \(layer L\) have in_features=4, but W has 5 input columns"):
        approximate(W, ActivationStats(4).update(X[:, :4]), 2, name="L")
    with pytest.raises(ValueError, match=r"x in L must have shape \(\.\.\., 5\), got \(3, 4\)"):
        RFactor(5, name="L").update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"mask in L must have shape x\.shape\[:-1\] = \(2, 3\), got \(3, 2\)"):
        RFactor(5, name="L").update(torch.zeros(2, 3, 5), torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask in L must be boolean or 0/1"):
        RFactor(5, name="L").update(torch.zeros(2, 3, 5), torch.full((2, 3), 0.5))


def test_non_finite_activations_give_the_count(WX):
    W, X = WX
    X = X.clone()
    X[0, 0] = float("nan")
    X[3, 1] = float("nan")
    X[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"in attn\.k contains 3 non-finite values \(2 NaN, 1 Inf\) out of 150"):
        approximate(W, X, 2, name="attn.k")
    with pytest.raises(ValueError, match=r"in attn\.k contains 3 non-finite values \(2 NaN, 1 Inf\)"):
        RFactor(5, name="attn.k").update(X)
    with pytest.raises(ValueError, match="contains 3 non-finite values"):
        ActivationStats(5, ("gram", "absmean"), name="attn.k").update(X)
    Wbad = W.clone()
    Wbad[1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"W in attn\.k contains 1 non-finite values \(0 NaN, 1 Inf\)"):
        approximate(Wbad, X.nan_to_num(), 2, name="attn.k")


@pytest.mark.parametrize("mu", [-1.0, float("nan"), float("inf")])
def test_bad_mu(WX, mu):
    W, X = WX
    with pytest.raises(ValueError, match=r"mu in L must be a finite number >= 0, got"):
        approximate(W, X, 2, mu=mu, name="L")
    with pytest.raises(ValueError, match="mu"):
        RFactor(5).update(X).regularized(mu)


@pytest.mark.parametrize("mu", ["1", None, True])
def test_mu_of_the_wrong_type(WX, mu):
    W, X = WX
    with pytest.raises(TypeError, match="mu in L must be a real number"):
        approximate(W, X, 2, mu=mu, name="L")


def test_rfactor_that_has_seen_no_rows(WX):
    W, _ = WX
    with pytest.raises(ValueError, match=r"RFactor \(layer o_proj\) has seen no rows"):
        approximate(W, RFactor(5), 2, name="o_proj")
    with pytest.raises(ValueError, match="seen no rows"):
        truncation_loss(W, RFactor(5))
    with pytest.raises(ValueError, match=r"statistics \(layer o_proj\) have seen no rows"):
        approximate(W, ActivationStats(5, ("gram",)), 2, method="svd-llm", name="o_proj")


def test_integer_dtypes(WX):
    W, X = WX
    with pytest.raises(TypeError, match=r"W in L must have a floating dtype, got torch\.int64"):
        approximate(W.long(), X, 2, name="L")
    with pytest.raises(TypeError, match=r"X in L must have a floating dtype, got torch\.int32"):
        approximate(W, X.int(), 2, name="L")
    with pytest.raises(TypeError, match=r"x in L must have a floating dtype, got torch\.int64"):
        RFactor(5, name="L").update(X.long())
    with pytest.raises(TypeError, match="must have a floating dtype"):
        GramAccumulator(5).update(X.long())
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got ndarray"):
        approximate(W.numpy(), X, 2)
    with pytest.raises(TypeError, match="must be a Tensor, an RFactor or ActivationStats, got list"):
        approximate(W, X.tolist(), 2)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm", "svd-llm-v2"])
def test_mu_with_a_baseline(WX, method):
    W, X = WX
    with pytest.raises(ValueError, match=rf"mu / adaptive_mu apply to method 'coala' only, not '{method}'"):
        approximate(W, X, 2, method=method, mu=1.0)
    with pytest.raises(ValueError, match="apply to method 'coala' only"):
        approximate(W, X, 2, method=method, adaptive_mu=True)


def test_unknown_method_and_missing_context(WX):
    W, X = WX
    with pytest.raises(ValueError, match=r"unknown method 'svdllm'; choose from \['asvd', 'coala', 'svd', "):
        approximate(W, X, 2, method="svdllm")
    with pytest.raises(TypeError, match=r"method 'coala' \(layer L\) needs calibration activations X"):
        approximate(W, None, 2, name="L")
    with pytest.raises(TypeError, match=r"method 'svd-llm' needs statistics \['gram'\] that were not collected"):
        approximate(W, ActivationStats(5, ("r", "absmean")).update(X), 2, method="svd-llm")
