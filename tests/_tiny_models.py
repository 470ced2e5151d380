"""Tiny randomly initialised transformers models (Llama with GQA, GPT-2 Conv1D, BERT, OPT) for fast tests."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from coala.lowrank import LowRankLinear, dense_bias, dense_weight, find_linear_layers, replace_module

VOCAB = 97


def tiny(kind: str, *, tie: bool = True, seed: int = 0) -> nn.Module:
    """A tiny fp32 model in eval mode. kind: llama | gpt2 | bert | opt."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        model = transformers.BertModel(cfg)
    elif kind == "opt":
        cfg = transformers.OPTConfig(
            hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
        model = transformers.OPTForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def inputs(seed: int = 1, batch: int = 2, seq: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def factorise(model: nn.Module, targets=None, rank=None) -> dict[str, int]:
    """Replace the targeted layers by LowRankLinear built from an fp64 SVD, truncated to ``rank`` (None: exact).

    ``rank`` may be an int or a callable (name, out, in) -> int. Returns name → rank used.
    """
    ranks = {}
    for name, layer in find_linear_layers(model, targets).items():
        W = dense_weight(layer).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = S.numel() if rank is None else (rank(name, *W.shape) if callable(rank) else min(rank, S.numel()))
        new = LowRankLinear.from_factors((U[:, :r] * S[:r]).float(), Vh[:r].float(), dense_bias(layer))
        replace_module(model, name, new)
        ranks[name] = r
    return ranks


def tiny_llama_lm(vocab_size: int, hidden: int = 64, **config):
    """A randomly initialised 2-block Llama causal LM (grouped-query attention), seed 0, eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, **{"max_position_embeddings": 256, **config},
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
