"""coala compare: one calibration pass serves every method × ratio; the factors equal a per-cell solve."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from _tiny_models import tiny_llama_lm
from coala.compare import CompareConfig, compare, results_markdown, write_results
from coala.compress import apply_low_rank, calibration_set, collect_statistics, decompose_layers
from coala.config import CalibrationConfig, CompressConfig, RuntimeConfig


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    # SVD-LLM V2's allocation (s = 1/log L) needs truncation losses > 1: larger initial weights
    return tiny_llama_lm(tokenizer.vocab_size, hidden=32, max_position_embeddings=128, initializer_range=0.5)


QUIET = RuntimeConfig(progress=False)


def _config(**kw) -> dict:
    """Keyword arguments of ``compare``: a small CompareConfig, 8 samples × 64 tokens, no progress bars."""
    base = dict(methods=["coala", "svd-llm-v2", "svd"], ratios=[0.3, 0.6], evals=["ppl:builtin"], ppl_seqlen=64)
    return {"config": CompareConfig(**{**base, **kw}), "data": CalibrationConfig(nsamples=8, seqlen=64),
            "runtime": QUIET}


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
    result = compare(tiny_llama, tokenizer, **_config(evals=[f"ppl:{text}"]))
    assert passes == [["coala", "svd-llm-v2", "svd"]]  # one pass for all methods and ratios
    assert len(result.rows) == 1 + 3 * 2 and result.rows[0]["method"] == "original"
    for row in result.rows[1:]:
        assert abs(row["removed"] - row["ratio"]) < 0.1 and row[f"ppl:{text}"] > 1.0
    files = write_results(result, tmp_path / "out")
    table = list(csv.reader(open(files["csv"])))
    assert table[0][:4] == ["method", "allocation", "ratio", "removed (targeted)"] and len(table) == 1 + 7
    # each method's own allocation is named, not "auto" (coala: fisher; svd-llm-v2: its published one)
    assert {r[0]: r[1] for r in table[1:]} == {"original": "-", "coala": "fisher", "svd-llm-v2": "svd-llm-v2",
                                               "svd": "uniform"}
    md = files["md"].read_text()
    assert "**" in md and "| original |" in md
    assert files["png"].stat().st_size > 10_000


def test_one_decomposition_gives_the_same_layers_as_a_per_ratio_solve(tiny_llama, tokenizer):
    data = CalibrationConfig(nsamples=8, seqlen=64)
    batches, _ = calibration_set(tiny_llama, "builtin", data, tokenizer)
    stats = collect_statistics(tiny_llama, batches, methods=["coala", "svd-llm-v2"], runtime=QUIET)
    for method in ("coala", "svd-llm-v2"):
        decs = decompose_layers(tiny_llama, stats, CompressConfig(method=method), progress=False)
        for ratio in (0.3, 0.6):
            ours = copy.deepcopy(tiny_llama)
            apply_low_rank(ours, stats, CompressConfig(method=method, ratio=ratio), decompositions=decs,
                           progress=False, batches=batches)
            theirs = copy.deepcopy(tiny_llama)
            report = apply_low_rank(theirs, stats, CompressConfig(method=method, ratio=ratio), progress=False,
                                    batches=batches)
            assert report.allocation == ("svd-llm-v2" if method == "svd-llm-v2" else "fisher")
            ids = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_compare_bad_input(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="ratio"):
        _config(ratios=[0.2, 1.5])
    with pytest.raises(ValueError, match="unknown --eval"):
        _config(evals=["bleu"], ratios=[0.5], methods=["svd"])
    with pytest.raises(ValueError, match="mu"):  # μ given, but no compared method uses it
        _config(methods=["svd", "asvd"], mu=1.0)


def test_markdown_bolds_the_best_per_ratio():
    from coala.compare import CompareResult

    rows = [{"method": "original", "ratio": 0.0, "removed": 0.0, "weighted_err": 0.0, "ppl:x": 5.0},
            {"method": "a", "allocation": "fisher", "ratio": 0.2, "removed": 0.2, "weighted_err": 0.1, "ppl:x": 7.0},
            {"method": "b", "allocation": "uniform", "ratio": 0.2, "removed": 0.2, "weighted_err": 0.3, "ppl:x": 6.0}]
    md = results_markdown(CompareResult(rows, ["ppl:x"], {}))
    assert "| a | fisher | 0.2 | 0.2 | 7 | **0.1** |" in md and "| b | uniform | 0.2 | 0.2 | **6** | 0.3 |" in md
    assert "| original | - | 0 |" in md  # rows without an allocation (results of older versions) show "-"


def test_default_evaluation_is_out_of_domain_and_in_domain_labelled(tokenizer):
    """With no evals, an encoder is judged on the english evaluation text (out of domain) and on the held-out
    calibration mix (in domain); a model with logits by perplexity on the same two texts."""
    import transformers

    from coala.compare import default_evals, metric_label

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    encoder = transformers.BertModel(cfg).eval()
    assert default_evals(encoder) == ["fidelity:english", "fidelity:builtin"]
    result = compare(encoder, tokenizer, CompareConfig(methods=["coala"], ratios=[0.5]),
                     data=CalibrationConfig(nsamples=8, seqlen=64), runtime=QUIET)
    headers, body = result.table()
    assert headers[4:8] == ["cos mean english (out of domain)", "cos p05 english (out of domain)",
                            "cos mean builtin (in domain, held out)", "cos p05 builtin (in domain, held out)"]
    assert body[0][4:8] == pytest.approx([1.0] * 4) and all(0 < v < 1 for v in body[1][4:8])
    assert metric_label("ppl:english", "docs") == "ppl english (out of domain)"
    assert metric_label("ppl:builtin", "docs") == "ppl builtin (partly in domain, held out)"
    assert metric_label("task:piqa") == "task:piqa"
    llama = tiny_llama_lm(tokenizer.vocab_size, hidden=32)
    assert default_evals(llama) == ["ppl:english", "ppl:builtin"]


def test_a_masked_lm_is_judged_and_planned_as_its_encoder(tokenizer):
    """A BertForMaskedLM (logits, no last_hidden_state) is an encoder to compare: embedding fidelity of its last
    hidden states, not a next-token perplexity of masked-LM logits; its Fisher and sensitivity objectives are those
    of its bare encoder."""
    import transformers

    from coala.compare import default_evals
    from coala.evaluate import sentence_embeddings
    from coala.fisher import sample_losses
    from coala.sensitivity import outputs

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    mlm = transformers.BertForMaskedLM(cfg).eval()
    assert default_evals(mlm) == ["fidelity:english", "fidelity:builtin"]
    texts = ["a short sentence", "and a somewhat longer second sentence of words"]
    torch.testing.assert_close(sentence_embeddings(mlm, tokenizer, texts),
                               sentence_embeddings(mlm.bert, tokenizer, texts))
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(sample_losses(mlm, batch, torch.Generator().manual_seed(0)),
                                   sample_losses(mlm.bert, batch, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(outputs(mlm, [batch]), outputs(mlm.bert, [batch]))
    result = compare(mlm, tokenizer, CompareConfig(methods=["coala"], ratios=[0.5]),
                     data=CalibrationConfig(nsamples=8, seqlen=64), runtime=QUIET)
    headers, body = result.table()
    assert headers[4] == "cos mean english (out of domain)"
    assert body[0][4] == pytest.approx(1.0) and 0 < body[1][4] < 1
