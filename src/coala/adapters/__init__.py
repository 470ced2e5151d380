"""LoRA adapter initialisation for peft: coala's inversion-free IPM / KPM, and baselines (CorDA, PiSSA, MiLoRA).

One module per method, as in peft: ``ipm_kpm`` (coala's maths), ``corda``, ``pissa`` (+ MiLoRA);
``peft_bridge`` writes factors and residual base weights into a peft model; ``context`` turns calibration
batches into R factors; ``save`` writes / reads DIR/base + DIR/adapter and converts a trained adapter to a
plain LoRA on the original base.
"""

from .context import collect_input_factors, text_batches
from .corda import corda_decompose
from .initialize import init_lora
from .ipm_kpm import MODES, balanced_factors, coala_lora_factors, plain_svd_factors
from .registry import LORA_INITS, register_lora_init
from .save import convert_to_lora, load_lora, save_lora

__all__ = [
    "LORA_INITS",
    "MODES",
    "balanced_factors",
    "coala_lora_factors",
    "collect_input_factors",
    "convert_to_lora",
    "corda_decompose",
    "init_lora",
    "load_lora",
    "plain_svd_factors",
    "register_lora_init",
    "save_lora",
    "text_batches",
]
