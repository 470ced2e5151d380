"""Context-free baselines: PiSSA (principal singular components of W, peft-native ``init_lora_weights="pissa"``)
and MiLoRA (minor singular components; peft 0.21 has no MiLoRA init — its "mica" is a different method that
freezes B and zeroes A — so it is implemented here with the same residual-base bridge as coala).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from torch import nn

from .ipm_kpm import plain_svd_factors
from .peft_bridge import (
    adapter_rank_and_scaling,
    base_layer,
    check_not_tied,
    create_peft_model,
    lora_layers,
    set_lora_factors,
    weight_out_in,
)
from .registry import register_lora_init


@register_lora_init("pissa")
def pissa_peft_model(model: nn.Module, calibration: None, config: LoraConfig, **_unused) -> PeftModel:
    """PiSSA via peft (full SVD of each targeted weight, top r triplets in the adapter)."""
    return create_peft_model(model, config, init_lora_weights="pissa")


@register_lora_init("milora")
def milora_peft_model(model: nn.Module, calibration: None, config: LoraConfig, **_unused) -> PeftModel:
    """MiLoRA (Wang et al. 2024): the r smallest singular triplets of W in the adapter, base = W − them."""
    peft_model = create_peft_model(model, config, init_lora_weights=True)
    layers = lora_layers(peft_model)
    factors = {}
    try:
        check_not_tied(peft_model, layers)
        for name, layer in layers.items():
            base_layer(layer)
            r, scaling = adapter_rank_and_scaling(layer)
            W = weight_out_in(layer).detach()
            factors[name] = plain_svd_factors(W, r, minor=True, scaling=scaling, name=name)
    except BaseException:
        peft_model.unload()  # give the caller back the model as it was (peft wrapped it in place)
        raise
    for name, (B, A) in factors.items():
        set_lora_factors(layers[name], B, A, name=name)
    return peft_model
