"""``coala eval`` with nothing asked reports quality out of domain (english) and in domain (builtin), labelled
against the calibration text recorded in coala.json."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from coala.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random BERT with MiniLM's tokenizer, saved as a local folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=512)
    transformers.BertModel(cfg).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("calib", "builtin_label"), [("builtin", "in domain, held out"),
                                                       ("prose", "partly in domain, held out")])
def test_default_eval_of_an_encoder_is_labelled_out_of_and_in_domain(tiny_bert_dir, tmp_path, capsys, calib,
                                                                     builtin_label):
    out, report = tmp_path / "out", tmp_path / "eval.json"
    assert main(["compress", str(tiny_bert_dir), "--calib", calib, "--nsamples", "8", "--seqlen", "32",
                 "--ratio", "0.5", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert f"calibrated on {calib}" in printed
    assert "cosine mean english (out of domain)" in printed and f"cosine mean builtin ({builtin_label})" in printed
    fidelity = json.loads(report.read_text())["fidelity"]
    assert fidelity["reference"] == str(tiny_bert_dir)
    assert fidelity["english"]["domain"] == "out of domain" and fidelity["builtin"]["domain"] == builtin_label
    assert fidelity["english"]["sentences"] >= 500 and 0 < fidelity["english"]["mean_cosine"] < 1


def test_calibrating_on_the_evaluation_text_is_refused(tiny_bert_dir, tmp_path, capsys):
    assert main(["compress", str(tiny_bert_dir), "--calib", "english", "--nsamples", "8", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "'english' is the evaluation text" in capsys.readouterr().err
