"""Tiny randomly initialised models of six architectures for the compression tests (fp32, eval mode)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB = 101
ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")


def build(kind: str, *, layers: int = 2, seed: int = 0, init: float = 0.02) -> nn.Module:
    """hidden 32, MLP 48 (GPT-2: 4·32), 4 heads (Llama/Mistral/Qwen2: 2 KV heads = grouped-query attention).

    ``init``: std of the random weights (transformers' initializer_range; ignored by GPT-2).
    """
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64,
                  initializer_range=init)
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
        cfg = cls[0](hidden_size=32, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=False,
                     **common)
        model = cls[1](cfg)
    elif kind == "opt":
        cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, bos_token_id=0,
                                     eos_token_id=0, pad_token_id=1, **common)
        model = transformers.OPTForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, **common)
        model = transformers.BertModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def batches(n: int = 3, batch: int = 4, seq: int = 16, seed: int = 1, pad: bool = False) -> list[dict]:
    """Random token batches; with ``pad`` the rows get different lengths (right padding, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            for row in range(1, batch):
                mask[row, seq - 3 * row :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def settings(**flat) -> dict:
    """Keyword arguments of ``coala.compress`` from flat settings: each name goes to the config that owns it
    (``CompressConfig``, ``CalibrationConfig``, ``RuntimeConfig``, ``OutputConfig``); progress bars off."""
    from dataclasses import fields

    from coala.config import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig

    flat = {"progress": False, **flat}
    out = {}
    for key, cls in (("config", CompressConfig), ("data", CalibrationConfig), ("runtime", RuntimeConfig),
                     ("output", OutputConfig)):
        names = {f.name for f in fields(cls)}
        out[key] = cls(**{k: flat.pop(k) for k in list(flat) if k in names})
    if flat:
        raise TypeError(f"unknown settings {sorted(flat)}")
    return out


def word_tokenizer():
    """A word-level fast tokenizer over the ``VOCAB`` tokens "<unk>", "<pad>", "<s>", "</s>", "w4" … "w100"
    (whitespace-split), for the tiny models of ``build`` where a real tokenizer is needed (pipelines, lm-eval)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "<s>", "</s>", *(f"w{i}" for i in range(4, VOCAB))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
