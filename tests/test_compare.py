"""coala compare: one calibration pass serves every method × ratio; the factors equal a per-cell solve."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from coala.compare import CompareConfig, _plan, _swap, compare, results_markdown, write_results
from coala.compress import CompressConfig, apply_low_rank, collect_statistics
from coala.linalg.methods import decompose
from coala.lowrank import dense_weight, linear_shape
from conftest import tiny_llama_lm


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    # SVD-LLM V2's allocation (s = 1/log L) needs truncation losses > 1: larger initial weights
    return tiny_llama_lm(tokenizer.vocab_size, hidden=32, max_position_embeddings=128, initializer_range=0.5)


def _config(**kw) -> CompareConfig:
    base = dict(methods=["coala", "svd-llm-v2", "svd"], ratios=[0.3, 0.6], evals=["ppl:builtin"],
                nsamples=8, seqlen=64, ppl_seqlen=64, progress=False)
    return CompareConfig(**{**base, **kw})


def test_compare_runs_one_calibration_pass_and_writes_table(tiny_llama, tokenizer, tmp_path, monkeypatch):
    import coala.compare as cmp
    from coala.data import builtin_texts

    passes = []

    def counting_collect(*args, **kwargs):  # the real function, counted
        passes.append(kwargs.get("methods"))
        return collect_statistics(*args, **kwargs)

    monkeypatch.setattr(cmp, "collect_statistics", counting_collect)
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(builtin_texts("test")[:2])[:6000])
    result = compare(tiny_llama, tokenizer, _config(evals=[f"ppl:{text}"]))
    assert passes == [["coala", "svd-llm-v2", "svd"]]  # one pass for all methods and ratios
    assert len(result.rows) == 1 + 3 * 2 and result.rows[0]["method"] == "original"
    for row in result.rows[1:]:
        assert abs(row["removed"] - row["ratio"]) < 0.1 and row[f"ppl:{text}"] > 1.0
    files = write_results(result, tmp_path / "out")
    table = list(csv.reader(open(files["csv"])))
    assert table[0][:3] == ["method", "ratio", "removed (targeted)"] and len(table) == 1 + 7
    md = files["md"].read_text()
    assert "**" in md and "| original |" in md
    assert files["png"].stat().st_size > 10_000


def test_one_decomposition_gives_the_same_layers_as_a_per_ratio_solve(tiny_llama, tokenizer):
    cc = CompressConfig(nsamples=8, seqlen=64, progress=False)
    stats = collect_statistics(tiny_llama, "builtin", cc, methods=["coala", "svd-llm-v2"], tokenizer=tokenizer)
    shapes = {n: linear_shape(tiny_llama.get_submodule(n)) for n in stats}
    for method in ("coala", "svd-llm-v2"):
        decs = {n: decompose(dense_weight(tiny_llama.get_submodule(n)).detach(), stats[n], method=method)
                for n in stats}
        for ratio in (0.3, 0.6):
            ours = copy.deepcopy(tiny_llama)
            _swap(ours, decs, _plan(method, decs, shapes, ratio), stats)
            theirs = copy.deepcopy(tiny_llama)
            apply_low_rank(theirs, stats, method=method, ratio=ratio, progress=False)
            ids = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_compare_bad_input(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="ratio"):
        compare(tiny_llama, tokenizer, _config(ratios=[0.2, 1.5]))
    with pytest.raises(ValueError, match="unknown --eval"):
        compare(tiny_llama, tokenizer, _config(evals=["bleu"], ratios=[0.5], methods=["svd"]))


def test_markdown_bolds_the_best_per_ratio():
    from coala.compare import CompareResult

    rows = [{"method": "original", "ratio": 0.0, "removed": 0.0, "weighted_err": 0.0, "ppl:x": 5.0},
            {"method": "a", "ratio": 0.2, "removed": 0.2, "weighted_err": 0.1, "ppl:x": 7.0},
            {"method": "b", "ratio": 0.2, "removed": 0.2, "weighted_err": 0.3, "ppl:x": 6.0}]
    md = results_markdown(CompareResult(rows, ["ppl:x"], {}))
    assert "| a | 0.2 | 0.2 | 7 | **0.1** |" in md and "| b | 0.2 | 0.2 | **6** | 0.3 |" in md
