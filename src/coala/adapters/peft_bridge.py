"""The bridge to peft: create the LoRA model through peft's public API, then write lora_A / lora_B and the
residual base weights of each targeted layer.

Layouts: peft's ``lora_B`` is (out × r), ``lora_A`` is (r × in), and a layer computes
base(x) + scaling · x Aᵀ Bᵀ. ``nn.Linear`` stores its weight (out × in); GPT-2's ``Conv1D`` stores it
(in × out) and peft wraps it with ``fan_in_fan_out=True``. This module hides the difference: weights are
read and written in (out × in) orientation.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ..lowrank import is_conv1d

_PREFIX = "base_model.model."


def check_lora_config(config: LoraConfig) -> None:
    """Reject configurations with which an exact, data-driven initialisation is not possible."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("use_dora=True is not supported: DoRA's magnitude vector breaks exactness at init")


def create_peft_model(model: nn.Module, config: LoraConfig, *, init_lora_weights: bool | str = True) -> PeftModel:
    """``get_peft_model`` on ``model`` with a copy of ``config`` whose ``init_lora_weights`` is replaced.

    With ``True`` (peft's default, B = 0), the created model computes exactly what ``model`` computed.
    Raises ValueError (peft's message) when the targets match no module.
    """
    check_lora_config(config)
    cfg = copy.deepcopy(config)
    cfg.init_lora_weights = init_lora_weights
    return get_peft_model(model, cfg)


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """Targeted layers: name inside the original model (e.g. "model.layers.0.self_attn.q_proj") → LoRA layer."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix(_PREFIX)] = module
    return out


def base_layer(layer: LoraLayer) -> nn.Module:
    """The wrapped nn.Linear / Conv1D; TypeError for any other kind of layer."""
    base = layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        raise TypeError(
            f"coala initialises LoRA on nn.Linear and GPT-2 Conv1D layers only, got {type(base).__name__}"
        )
    return base


def weight_out_in(layer: LoraLayer) -> Tensor:
    """The base weight in (out × in) orientation (a view, in its stored dtype)."""
    base = base_layer(layer)
    return base.weight.T if is_conv1d(base) else base.weight


def check_not_tied(model: nn.Module, layers: dict[str, LoraLayer]) -> None:
    """Raise if a targeted weight is shared with another parameter (e.g. a tied lm_head): changing it would
    change the embeddings too."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, layer in layers.items():
        names = owners.get(id(base_layer(layer).weight), [])
        if len(names) > 1:
            raise ValueError(
                f"the weight of {name} is tied to {', '.join(n.removeprefix(_PREFIX) for n in names)}; "
                "a residual base weight would change them all: do not target it"
            )


def adapter_rank_and_scaling(layer: LoraLayer, adapter: str = "default") -> tuple[int, float]:
    """(r, scaling) peft assigned to this layer (rank_pattern, alpha_pattern and rsLoRA included)."""
    return int(layer.r[adapter]), float(layer.scaling[adapter])


@torch.no_grad()
def set_lora_factors(layer: LoraLayer, B: Tensor, A: Tensor, adapter: str = "default", name: str = "") -> None:
    """Write lora_B (out × r) and lora_A (r × in), then make the base weight the residual W − scaling·B·A.

    The residual is computed in float64 from the factors *as stored* (after their cast to the adapter's
    dtype), then rounded once to the base weight's dtype: base + adapter reproduces W up to that rounding.
    """
    r, scaling = adapter_rank_and_scaling(layer, adapter)
    W = weight_out_in(layer)
    m, n = W.shape
    if tuple(B.shape) != (m, r) or tuple(A.shape) != (r, n):
        raise ValueError(
            f"{name or 'layer'}: factors must be B ({m} × {r}) and A ({r} × {n}), "
            f"got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_A.copy_(A.to(device=lora_A.device, dtype=lora_A.dtype))
    lora_B.copy_(B.to(device=lora_B.device, dtype=lora_B.dtype))
    dtype = torch.float64
    product = scaling * (lora_B.to(device=W.device, dtype=dtype) @ lora_A.to(device=W.device, dtype=dtype))
    residual = W.to(dtype) - product
    W.copy_(residual.to(W.dtype))  # W is a view of the stored weight: Conv1D's transpose is written back too
