"""A compressed folder that loads wherever a Hugging Face model loads, and never loads wrong.

``save_compressed`` calls ``write_loading_code`` on the folder it is writing. That step

- writes ``modeling_coala.py`` (the self-contained ``coala.modeling_coala`` plus a footer naming this folder's
  classes, e.g. ``CoalaLlamaConfig`` / ``CoalaLlamaForCausalLM``: the base transformers classes, with the
  low-rank layers swapped in by ``__init__``);
- rewrites ``config.json``: ``model_type`` becomes ``coala_<base type>`` (a type only that file defines),
  ``architectures`` names the new class, ``auto_map`` points every Auto class that maps to the base class
  (``AutoModelForCausalLM``, ``AutoModel``, ``AutoModelForMaskedLM``, ...) and ``AutoConfig`` at the file,
  ``coala_low_rank`` lists the factorised layers ({name: {"in_features", "out_features", "rank", "bias"}}) and
  ``coala_base`` records the base ``model_type`` / ``architectures`` / classes; the ``quantization_config`` of a
  model read from a GGUF file goes (its weights are saved dequantized). Loading the folder with
  ``trust_remote_code=True`` therefore gives the compressed model; loading it without is refused by
  transformers ("contains custom code which must be executed"), never a base model with random weights;
- carries a sentence-transformers model's files over from the folder the model came from (``modules.json``,
  ``sentence_bert_config.json``, ``config_sentence_transformers.json``, the module folders such as
  ``1_Pooling``, the tokenizer files such as ``vocab.txt`` that the saved tokenizer did not write) and, for
  other models, the source's tokenizer files when no tokenizer was saved.

``read_base_config`` undoes the config rewrite for ``coala.load`` (which builds the base class itself and runs
no code from the folder); a folder written before this step existed has a plain base config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from .lowrank import low_rank_layers

__all__ = ["CODE_FILE", "carry_source_files", "read_base_config", "source_folder", "write_loading_code"]

CODE_FILE = "modeling_coala.py"
CONFIG_FILE = "config.json"
COALA_CONFIG_KEYS = ("auto_map", "coala_base", "coala_low_rank")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def auto_classes(model_type: str, class_name: str) -> list[str]:
    """The transformers Auto classes (``AutoModelForCausalLM``, ...) that load ``class_name`` for ``model_type``."""
    from transformers.models.auto import modeling_auto

    found = []
    for name in sorted(dir(modeling_auto)):
        if not name.startswith("AutoModel"):
            continue
        names = getattr(getattr(getattr(modeling_auto, name), "_model_mapping", None), "_model_mapping", None)
        if not isinstance(names, dict):
            continue
        entry = names.get(model_type)
        if class_name in (entry if isinstance(entry, (tuple, list)) else (entry,)):
            found.append(name)
    return found or ["AutoModel"]


def _code(config_class: str, model_class: str, model_type: str) -> str:
    """Text of the folder's modeling_coala.py: the generic module plus the classes of this base model."""
    generic = (Path(__file__).parent / CODE_FILE).read_text()
    footer = f'''

# ---------------------------------------------------------------- this folder's classes (coala.save_compressed)
from transformers import {config_class}, {model_class}  # noqa: E402


class Coala{config_class}({config_class}):
    model_type = "{model_type}"


class Coala{model_class}(CoalaLowRankMixin, {model_class}):
    config_class = Coala{config_class}
'''
    return generic.rstrip("\n") + "\n" + footer


def _transformers_class(obj: object) -> str | None:
    """The name of ``type(obj)`` when it is the top-level transformers class of that name, else None."""
    import transformers

    name = type(obj).__name__
    return name if getattr(transformers, name, None) is type(obj) else None


def write_loading_code(folder: str | os.PathLike, model: nn.Module, *, source: str | os.PathLike | None = None
                       ) -> None:
    """Write modeling_coala.py, rewrite config.json (see the module docstring) and carry the source's
    sentence-transformers / tokenizer files into ``folder``, which already holds config.json and the weights.

    ``source``: the folder (or Hub id, read from the local cache only) the model was loaded from; default
    ``model.name_or_path``. A model whose class or config class is not a top-level transformers class gets
    no modelling file: its config.json still names the ``coala_<type>`` model type, so transformers refuses
    it instead of loading it wrong, and ``coala.load`` reads it.
    """
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    base_type = config.get("model_type") or getattr(model.config, "model_type", "") or "model"
    model_class, config_class = _transformers_class(model), _transformers_class(model.config)
    layers = {name: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                     "bias": m.up.bias is not None} for name, m in low_rank_layers(model).items()}
    config["coala_base"] = {"model_type": base_type, "architectures": config.get("architectures"),
                            "model_class": type(model).__name__, "config_class": type(model.config).__name__}
    config["coala_low_rank"] = layers
    config["model_type"] = f"coala_{base_type}"
    config["architectures"] = [f"Coala{type(model).__name__}"]
    config.pop("auto_map", None)
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]  # loaded from a GGUF file, saved dequantized: nothing left to dequantize
    if model_class is not None and config_class is not None:
        module = CODE_FILE.removesuffix(".py")
        config["auto_map"] = {"AutoConfig": f"{module}.Coala{config_class}",
                              **{auto: f"{module}.Coala{model_class}" for auto in auto_classes(base_type, model_class)}}
        (folder / CODE_FILE).write_text(_code(config_class, model_class, config["model_type"]))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    carry_source_files(source if source is not None else source_folder(model), folder)


def source_folder(model: nn.Module) -> Path | None:
    """The local folder ``model`` was loaded from: its ``name_or_path`` when that is a folder, or the cached
    snapshot of that Hub id (local cache only, nothing is downloaded); None when neither exists."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name), CONFIG_FILE)
    except Exception:  # not a valid repo id, no cache: nothing to carry
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def carry_source_files(source: str | os.PathLike | None, folder: str | os.PathLike) -> list[str]:
    """Copy a sentence-transformers model's files (``modules.json``, the files and module folders it needs, its
    tokenizer files such as vocab.txt) and, for any other model when ``folder`` has no tokenizer yet, the
    tokenizer files from ``source`` into ``folder``; files already in ``folder`` are never replaced. Returns the
    names copied (none when ``source`` is None or not a folder)."""
    if source is None or not Path(source).is_dir():
        return []
    src, dst = Path(source), Path(folder)
    if src.resolve() == dst.resolve():
        return []
    names: list[str] = []
    if (src / "modules.json").is_file():
        names += [n for n in SENTENCE_TRANSFORMERS_FILES if (src / n).is_file()]
        try:
            modules = json.loads((src / "modules.json").read_text())
        except json.JSONDecodeError:
            modules = []
        names += [str(m["path"]) for m in modules if isinstance(m, dict) and m.get("path")
                  and (src / str(m["path"])).is_dir()]
    if names or not (dst / "tokenizer_config.json").is_file():  # a sentence-transformers model's own tokenizer
        names += [n for n in TOKENIZER_FILES if (src / n).is_file()]
    copied = []
    for name in names:
        target = dst / name
        if target.exists():
            continue
        if (src / name).is_dir():
            shutil.copytree(src / name, target)
        else:
            shutil.copyfile(src / name, target)
        copied.append(name)
    return copied


def read_base_config(folder: str | os.PathLike):
    """The base model's transformers config of a compressed folder (what ``coala.load`` builds the model from):
    config.json with the ``write_loading_code`` entries undone; a folder without them loads as it is."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE} cannot be read: {err}") from err
    base = raw.get("coala_base")
    if not isinstance(base, dict):  # written before coala wrote modeling_coala.py: a plain base config
        return AutoConfig.from_pretrained(str(folder))
    plain = {k: v for k, v in raw.items() if k not in COALA_CONFIG_KEYS}
    plain["model_type"] = base.get("model_type")
    if base.get("architectures") is None:
        plain.pop("architectures", None)
    else:
        plain["architectures"] = base["architectures"]
    if plain["model_type"] not in CONFIG_MAPPING:
        raise ValueError(f"{folder / CONFIG_FILE}: base model type {plain['model_type']!r} is unknown to this "
                         "transformers")
    config = CONFIG_MAPPING[plain["model_type"]].from_dict(plain)
    config._name_or_path = str(folder)
    return config
