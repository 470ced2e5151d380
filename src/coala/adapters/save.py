"""Saving an initialised LoRA model so that plain transformers + peft can load it, and converting a trained
adapter back to a plain LoRA on the original base.

Layout written by ``save_lora(peft_model, DIR)``::

    DIR/base/          the residual base model (W − scaling·B·A on targeted layers), transformers format
                       (config.json + model.safetensors [+ tokenizer]); load with AutoModel*.from_pretrained
    DIR/adapter/       the initial adapter (adapter_config.json + adapter_model.safetensors); its config has
                       init_lora_weights=True so that loading never re-runs a data-driven init on the residual
    DIR/coala_lora.json  how it was made (method, mode, μ, base class, user metadata)

At step 0, ``PeftModel.from_pretrained(AutoModel*.from_pretrained(DIR/base), DIR/adapter)`` computes what
the original model computed. After training, ``convert_to_lora(trained, DIR, OUT)`` uses peft's
``save_pretrained(..., path_initial_model_for_weight_conversion=DIR/adapter)``: OUT holds a rank-2r LoRA
(ΔW = s·BA − s·B₀A₀) that applies to the *original* base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from peft import PeftModel
from torch import nn

FORMAT = "coala-lora"
VERSION = 1
META_FILE = "coala_lora.json"


def _residual_state_dict(base: nn.Module) -> dict:
    """The wrapped model's state dict with LoRA parameters dropped and peft's ``.base_layer`` unwrapped."""
    out = {}
    for key, value in base.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_lora(peft_model: PeftModel, out_dir: str | Path, *, tokenizer=None, meta: dict | None = None) -> Path:
    """Write DIR/base (residual base), DIR/adapter (initial adapter) and DIR/coala_lora.json; returns DIR."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_lora expects a peft.PeftModel, got {type(peft_model).__name__}")
    if "default" not in peft_model.peft_config or len(peft_model.peft_config) != 1:
        raise ValueError(f"save_lora expects exactly one adapter named 'default', got {list(peft_model.peft_config)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    if not hasattr(base, "save_pretrained"):
        raise TypeError(f"the base model ({type(base).__name__}) is not a transformers model: no save_pretrained")
    base.save_pretrained(out / "base", state_dict=_residual_state_dict(base))
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")
    config = peft_model.peft_config["default"]
    init, corda = config.init_lora_weights, getattr(config, "corda_config", None)
    config.init_lora_weights = True  # the residual is already in DIR/base: loading must not re-initialise
    if corda is not None:
        config.corda_config = None
    try:
        peft_model.save_pretrained(out / "adapter")
    finally:
        config.init_lora_weights = init
        if corda is not None:
            config.corda_config = corda
    info = {
        "format": FORMAT,
        "version": VERSION,
        "base_class": type(base).__name__,
        "init": getattr(peft_model, "coala_init", None),
        "meta": meta or {},
    }
    (out / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def read_meta(path: str | Path) -> dict:
    """The coala_lora.json of a saved directory (FileNotFoundError / ValueError when it is not one)."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {path} was not written by coala's save_lora")
    info = json.loads(f.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{f} is not a {FORMAT} file (format={info.get('format')!r})")
    return info


def load_lora(path: str | Path, *, model_class=None, is_trainable: bool = False, **from_pretrained_kwargs) -> PeftModel:
    """Load DIR/base with ``model_class`` (default: the class it was saved from) and DIR/adapter on top."""
    info = read_meta(path)
    if model_class is None:
        model_class = getattr(transformers, info["base_class"], None)
        if model_class is None:
            raise ValueError(f"transformers has no class {info['base_class']!r}; pass model_class=")
    base = model_class.from_pretrained(Path(path) / "base", **from_pretrained_kwargs)
    return PeftModel.from_pretrained(base, Path(path) / "adapter", is_trainable=is_trainable)


def convert_to_lora(trained: PeftModel, init_dir: str | Path, out_dir: str | Path) -> Path:
    """Save ``trained`` (initialised by coala and saved with ``save_lora`` to ``init_dir``) as a plain LoRA of
    rank 2r for the original base model (peft's ``path_initial_model_for_weight_conversion`` route)."""
    read_meta(init_dir)
    initial = Path(init_dir) / "adapter"
    if not (initial / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{initial}/adapter_config.json not found")
    trained.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(initial))
    return Path(out_dir)
