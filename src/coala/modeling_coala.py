"""Modelling code that ``coala.save_compressed`` writes beside a compressed model as ``modeling_coala.py``.

It lets transformers (and everything built on it: lm-eval, pipelines, sentence-transformers) load the folder
with ``trust_remote_code=True`` and without coala installed. This file is the generic part and must stay
self-contained (torch and transformers only; never ``import coala``): the folder's copy gets a footer naming
its classes, e.g.::

    from transformers import LlamaConfig, LlamaForCausalLM


    class CoalaLlamaConfig(LlamaConfig):
        model_type = "coala_llama"


    class CoalaLlamaForCausalLM(CoalaLowRankMixin, LlamaForCausalLM):
        config_class = CoalaLlamaConfig

The model class is the base transformers class whose ``__init__`` then swaps every layer listed in
``config.coala_low_rank`` ({dotted name: {"in_features", "out_features", "rank", "bias"}}) for a
``CoalaLowRank`` module with ``down`` (rank × in) and ``up`` (out × rank, bias) ``nn.Linear`` children: the
state-dict keys of coala's ``LowRankLinear``, so the stored weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class CoalaLowRank(nn.Module):
    """y = up(down(x)) = (x Bᵀ) Aᵀ + bias: in_features → rank → out_features (replaces nn.Linear or Conv1D)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def install_low_rank_layers(model: nn.Module, layers: dict) -> None:
    """Replace each listed submodule of ``model`` by a ``CoalaLowRank`` of the recorded shape, on the replaced
    layer's device and in its dtype (the meta device while ``from_pretrained`` builds the model)."""
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        weight = getattr(old, "weight", None)
        new = CoalaLowRank(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                           bias=bool(spec["bias"]), dtype=getattr(weight, "dtype", None),
                           device=getattr(weight, "device", None))
        setattr(parent, child, new)


class CoalaLowRankMixin:
    """Put first in the bases of a transformers model class: builds the base model, then swaps in the low-rank
    layers that ``config.coala_low_rank`` lists."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        install_low_rank_layers(self, getattr(config, "coala_low_rank", None) or {})
