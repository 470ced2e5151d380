"""Ratio → rank, SVD-LLM V2 allocation and parameter accounting, with numbers checked by hand."""

from __future__ import annotations

import math

import pytest

from coala.allocate import achieved, rank_for_ratio, ranks_for_ratios, svd_llm_v2_ratios, uniform_ranks


@pytest.mark.parametrize(
    ("m", "n", "ratio", "rank"),
    [
        (4096, 4096, 0.2, 1638),  # 4096²·0.8/8192 = 1638.4
        (11008, 4096, 0.2, 2388),  # 45 088 768·0.8/15 104 = 2388.2
        (64, 128, 0.5, 21),  # 8192·0.5/192 = 21.33
        (100, 100, 0.6, 20),  # 10 000·0.4/200 = 20
        (10, 10, 0.99, 1),  # 100·0.01/20 = 0.05 → floor 0 → clamped to 1 (20 < 100 weights)
    ],
)
def test_rank_for_ratio_by_hand(m, n, ratio, rank):
    assert rank_for_ratio(m, n, ratio) == rank


def test_removed_fraction_is_close_to_ratio_for_a_big_matrix():
    r = rank_for_ratio(4096, 4096, 0.2)
    assert 1 - r * 8192 / 4096**2 == pytest.approx(0.2, abs=2e-4)


@pytest.mark.parametrize(("m", "n"), [(1, 100), (100, 1), (2, 2)])
def test_matrices_that_cannot_save_parameters_stay_dense(m, n):
    assert rank_for_ratio(m, n, 0.5) is None  # rank 1 already costs m + n ≥ m·n


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_ratio_outside_open_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="ratio must be strictly between 0 and 1"):
        rank_for_ratio(8, 8, bad)
    with pytest.raises(ValueError, match="ratio"):
        uniform_ranks({"a": (8, 8)}, bad)
    with pytest.raises(ValueError, match="ratio"):
        svd_llm_v2_ratios({"a": 2.0}, {"a": "g"}, bad)


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="ratio"):
        rank_for_ratio(8, 8, True)
    with pytest.raises(TypeError, match="ratio"):
        rank_for_ratio(8, 8, "0.2")
    with pytest.raises(ValueError, match="positive int"):
        rank_for_ratio(0, 8, 0.2)
    with pytest.raises(ValueError, match=r"shape of q must be \(out_features, in_features\)"):
        uniform_ranks({"q": (8,)}, 0.2)


def test_uniform_ranks():
    shapes = {"q": (4096, 4096), "up": (11008, 4096), "tiny": (1, 64)}
    assert uniform_ranks(shapes, 0.2) == {"q": 1638, "up": 2388, "tiny": None}


def test_svd_llm_v2_ratios_by_hand():
    # group q: L = e¹, e², e⁴ → s = 1, 1/2, 1/4, Σ s = 7/4; N·R = 3·0.2 = 0.6 → 0.6·s/(7/4)
    losses = {"l0.q": math.e, "l1.q": math.e**2, "l2.q": math.e**4, "l0.up": 5.0}
    groups = {"l0.q": "q", "l1.q": "q", "l2.q": "q", "l0.up": "up"}
    got = svd_llm_v2_ratios(losses, groups, 0.2)
    assert list(got) == list(losses)
    assert got["l0.q"] == pytest.approx(0.6 / 1.75)
    assert got["l1.q"] == pytest.approx(0.3 / 1.75)
    assert got["l2.q"] == pytest.approx(0.15 / 1.75)
    assert (got["l0.q"] + got["l1.q"] + got["l2.q"]) / 3 == pytest.approx(0.2)  # group mean is R
    assert got["l0.up"] == 0.2  # a group of one keeps the uniform ratio
    assert got["l0.q"] > got["l1.q"] > got["l2.q"]  # lossier matrices are compressed less


def test_svd_llm_v2_equal_losses_give_uniform_ratio():
    got = svd_llm_v2_ratios({"a": 10.0, "b": 10.0}, {"a": "g", "b": "g"}, 0.3)
    assert got == {"a": pytest.approx(0.3), "b": pytest.approx(0.3)}


def test_svd_llm_v2_clips_at_max_ratio_without_redistributing():
    # L = e^0.1, e^10 → s = 10, 0.1; 2·0.5·10/10.1 = 0.990099 > 0.95 → clipped; other: 2·0.5·0.1/10.1
    got = svd_llm_v2_ratios({"a": math.exp(0.1), "b": math.exp(10)}, {"a": "g", "b": "g"}, 0.5, max_ratio=0.95)
    assert got["a"] == 0.95
    assert got["b"] == pytest.approx(0.1 / 10.1)


@pytest.mark.parametrize("loss", [1.0, 0.5, 0.0, -1.0, math.nan, math.inf])
def test_svd_llm_v2_refuses_losses_where_log_is_not_positive(loss):
    with pytest.raises(ValueError, match=r"matrix b of group 'g' has loss"):
        svd_llm_v2_ratios({"a": 10.0, "b": loss}, {"a": "g", "b": "g"}, 0.2)


def test_svd_llm_v2_key_mismatch():
    with pytest.raises(ValueError, match="different matrices"):
        svd_llm_v2_ratios({"a": 10.0}, {"b": "g"}, 0.2)


def test_ranks_for_ratios():
    shapes = {"a": (100, 100), "b": (100, 100)}
    assert ranks_for_ratios(shapes, {"a": 0.6, "b": 0.2}) == {"a": 20, "b": 40}
    with pytest.raises(ValueError, match="ratio of b"):
        ranks_for_ratios(shapes, {"a": 0.6, "b": 1.2})


def test_achieved_by_hand():
    shapes = {"a": (4, 6), "b": (10, 10), "c": (100, 100)}
    ranks = {"a": 1, "b": None, "c": 20}
    rep = achieved(shapes, ranks, model_params=20_000)
    # before 24 + 100 + 10 000 = 10 124; after 10 + 100 + 4 000 = 4 110
    assert rep["params_before"] == 10_124 and rep["params_after"] == 4_110 and rep["removed"] == 6_014
    assert rep["removed_fraction"] == pytest.approx(6_014 / 10_124)
    assert (rep["low_rank"], rep["dense"]) == (2, 1)
    assert rep["model_params_after"] == 20_000 - 6_014
    assert rep["model_removed_fraction"] == pytest.approx(6_014 / 20_000)
    assert "model_params_before" not in achieved(shapes, ranks)


def test_achieved_errors():
    with pytest.raises(ValueError, match="different matrices"):
        achieved({"a": (4, 4)}, {})
    with pytest.raises(ValueError, match="rank of a must be a positive int"):
        achieved({"a": (4, 4)}, {"a": 0})
    with pytest.raises(ValueError, match="smaller than the targeted"):
        achieved({"a": (4, 4)}, {"a": 1}, model_params=10)
