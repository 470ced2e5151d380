"""``export_dense``: a compressed folder written back as a plain model of its base class (``coala export --dense``).

Every low-rank layer's product A @ B is multiplied out (in float64, then cast to the layer's dtype) into the
dense layer the base class has at that place (``nn.Linear``, or GPT-2's ``Conv1D`` whose weight is stored
transposed); the result is saved with ``save_pretrained``: the base config (no ``auto_map``, no
modeling_coala.py), the tokenizer and sentence-transformers files of the compressed folder. Any tool loads it
without ``trust_remote_code`` and computes what ``coala.load`` computes, to float rounding. It saves no
memory (every matrix is dense again): it is for compatibility, and for quantising the compressed model with
tools that expect the base architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .files import atomic_folder
from .io import OutputExistsError, load
from .lowrank import is_conv1d, low_rank_layers, replace_module
from .portable import carry_source_files

__all__ = ["export_dense"]


def _dense_like(skeleton: nn.Module, layer: nn.Module) -> nn.Module:
    """A copy of the base class's layer ``skeleton`` (on the meta device) holding ``layer``'s A @ B and bias."""
    weight = layer.up.weight.detach()
    dense = skeleton.to_empty(device=weight.device).to(weight.dtype)
    product = (layer.up.weight.detach().double() @ layer.down.weight.detach().double()).to(weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(product.T if is_conv1d(dense) else product)
        if getattr(dense, "bias", None) is not None:
            if layer.up.bias is None:
                dense.bias.zero_()
            else:
                dense.bias.copy_(layer.up.bias.detach())
    return dense


def export_dense(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write the compressed folder ``path`` to ``out`` as a plain model of its base class (see the module doc).

    Args:
        path: a folder written by ``coala.save_compressed``.
        out: the folder to create (atomically; an existing non-empty one only with ``overwrite``).
        dtype: cast the weights to this dtype (default: as stored).
        max_shard_size: weight files larger than this are split (``save_pretrained``'s option).

    Returns the output folder. Raises OutputExistsError for a non-empty ``out`` without ``overwrite``, and what
    ``coala.load`` raises for a bad ``path``.
    """
    target = Path(os.path.abspath(out))
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise OutputExistsError(f"output folder {target} exists and is not empty (pass overwrite to replace it)")
    if target == Path(os.path.abspath(path)):
        raise ValueError(f"export_dense: the output {target} is the compressed folder itself")
    model = load(path, dtype=dtype)
    with torch.device("meta"):
        skeleton = type(model)._from_config(model.config)  # the base layers' types and shapes, no memory
    for name, layer in low_rank_layers(model).items():
        replace_module(model, name, _dense_like(skeleton.get_submodule(name), layer))
    del skeleton
    with atomic_folder(target, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        carry_source_files(path, tmp)
    return target
