"""Save and load compressed models: safetensors + JSON only (no pickle anywhere).

Folder layout written by ``save_compressed`` (a Hugging Face-like folder):

    config.json                      the base model's config (``model.config.save_pretrained``)
    generation_config.json           when the model has one
    model.safetensors                all weights, or, when larger than ``max_shard_size``:
    model-0000i-of-0000N.safetensors + model.safetensors.index.json  ({"metadata", "weight_map"})
    tokenizer files                  when a tokenizer is given
    modeling_coala.py                transformers loads the folder with trust_remote_code=True, coala not needed;
                                     config.json then names the class it defines (see ``coala.portable``)
    modules.json, 1_Pooling/, ...    a sentence-transformers source model's files, carried over
    coala.json                       written last (see below)

``coala.json`` holds the caller's ``meta`` (method, μ, calibration, ...) plus:
``format_version``; ``model_class`` (e.g. "LlamaForCausalLM"); ``ranks`` {module name: rank} for every
LowRankLinear; ``low_rank`` {module name: {"in_features", "out_features", "rank", "bias"}}; ``tied``
{dropped key: kept key} for weights shared between modules (a tied lm_head is stored once, under the
input embedding's key, and re-tied on load); ``weights`` (the file or index name); ``dtypes`` (of the stored
floating tensors); ``versions`` (torch, transformers, safetensors, coala); ``checksums`` {file: SHA-256} of the
weights files (and the index), verified by ``load`` (``verify=False`` skips it; folders without it load as before).

Saving is atomic and durable: everything is written into a temporary sibling folder ``.NAME.tmp-XXXX``, fsynced,
and renamed into place at the end (an existing NAME is swapped atomically where the OS can); on any error it is
removed and no (half-written) NAME folder appears. Modes are ``save_pretrained``'s (0755 / 0644 under umask 022).
The resumable block checkpoint lives in ``coala.checkpoint`` (``BlockCheckpoint``, re-exported here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .checkpoint import BlockCheckpoint
from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError
from .files import normal_modes
from .integrity import WRITE_ERRORS, check_file, check_model_class, fault_point, replace_dir, sha256_file
from .lowrank import LowRankLinear, low_rank_layers, replace_module
from .portable import read_base_config, write_loading_code
from .version import __version__

__all__ = ["FORMAT_VERSION", "BlockCheckpoint", "OutputExistsError", "load", "read_meta", "save_compressed"]

FORMAT_VERSION = 1
META_FILE = "coala.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RESERVED_META_KEYS = (  # coala.json keys save_compressed writes itself (a caller's meta may not use them)
    "format_version", "model_class", "ranks", "low_rank", "tied", "weights", "dtypes", "versions", "checksums")


class OutputExistsError(CoalaFileError, FileExistsError):
    """The output folder exists and is not empty (pass overwrite=True to replace it)."""


def _dedup_shared(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights) keeping the first key; copy partial views of a shared storage."""
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for key, t in state.items():
        if t.is_meta:
            raise ValueError(f"cannot save {key}: it is on the meta device (offloaded or not materialised)")
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in storages and t.numel():
            t = t.clone()  # a different view of an already saved storage: safetensors needs disjoint tensors
        storages.add(storage)
        out[key] = t
    return out, tied


def _write_weights(state: dict[str, Tensor], folder: Path, max_shard_size: int | str) -> tuple[str, list[str]]:
    """(the weights entry of coala.json: the file or the index, every file written)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k].detach().to("cpu").contiguous() for k in keys}
        safetensors.torch.save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
        fault_point(f"{filename} written")
    files = list(split.filename_to_tensors)
    if not split.is_sharded:
        return files[0], files
    index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    fault_point(f"{INDEX_FILE} written")
    return INDEX_FILE, [*files, INDEX_FILE]


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "coala": __version__,
    }


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    tokenizer=None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (a transformers PreTrainedModel possibly holding LowRankLinear layers) to ``out_dir``.

    Args:
        model: the (compressed) model; its ``config`` is saved and its class name recorded.
        out_dir: the folder to create. Its parent is created when missing.
        meta: JSON-serialisable description supplied by the caller (method, mu, calibration, ratio, ...); it
            must not use the reserved keys ``format_version``, ``model_class``, ``ranks``, ``low_rank``,
            ``tied``, ``weights``, ``dtypes``, ``versions``.
        tokenizer: saved alongside when given (``tokenizer.save_pretrained``).
        max_shard_size: weight files larger than this are split (an int in bytes or a string like "2GB").
        overwrite: replace an existing non-empty ``out_dir`` (atomically swapped in at the end).
        source: the folder (or Hub id, local cache only) the model was loaded from, whose sentence-transformers
            files (modules.json, 1_Pooling/, ...) and, without ``tokenizer``, tokenizer files are carried over
            (default: ``model.name_or_path``).

    Returns: the folder path. Raises OutputExistsError (a FileExistsError and ValueError) when ``out_dir``
    exists and is not empty; TypeError for a model without a config or a non-dict meta; ValueError for a
    reserved key in meta; CoalaFileError naming ``out_dir`` when writing fails (disk full, permissions). Any
    error while writing leaves neither ``out_dir`` nor the temporary folder behind; every file is fsynced before
    the folder is renamed into place.
    """
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    clash = sorted(set(meta) & set(RESERVED_META_KEYS))
    if clash:
        raise ValueError(f"meta uses reserved coala.json keys {clash}; rename them")
    config = getattr(model, "config", None)
    if not callable(getattr(config, "save_pretrained", None)):
        raise TypeError(f"save_compressed needs a transformers model with a .config, got {type(model).__name__}")
    out = Path(os.path.abspath(out_dir))
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a folder", path=out)
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"output folder {out} exists and is not empty (pass overwrite=True to replace it)",
                                    path=out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise CoalaFileError(f"cannot create the output folder {out}: {err}", path=out) from err
    try:
        state, tied = _dedup_shared(model.state_dict())
        weights, files = _write_weights(state, tmp, max_shard_size)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_loading_code(tmp, model, source=source)  # modeling_coala.py, config.json's auto_map, ST files
        normal_modes(tmp)  # 0755 / 0644 under the umask, not mkdtemp's 0700 and the weights' 0600
        fault_point("config and tokenizer written")
        layers = low_rank_layers(model)
        record = dict(meta)
        record.update(
            format_version=FORMAT_VERSION,
            model_class=type(model).__name__,
            ranks={name: m.rank for name, m in layers.items()},
            low_rank={
                name: {
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "rank": m.rank,
                    "bias": m.up.bias is not None,
                }
                for name, m in layers.items()
            },
            tied=tied,
            weights=weights,
            dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}),
            versions=_versions(),
            checksums={name: sha256_file(tmp / name) for name in files},
        )
        with open(tmp / META_FILE, "w") as f:
            json.dump(record, f, indent=2)  # raises TypeError on a non-JSON value: the folder is discarded
            f.write("\n")
        fault_point(f"{META_FILE} written")
        replace_dir(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WRITE_ERRORS) and not isinstance(err, CoalaError):
            raise CoalaFileError(f"could not write the model to {out}: {err}; nothing was written there",
                                 path=out) from err
        raise
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed coala.json of a saved folder (CoalaFileNotFoundError / CoalaFileError naming the path)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CoalaFileNotFoundError(f"no compressed model folder at {folder}", path=folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CoalaFileNotFoundError(
            f"{meta_path} not found: {folder} is not a folder written by coala.save_compressed", path=meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CoalaFileError(f"{meta_path} is not valid JSON: {e}", path=meta_path) from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CoalaFileError(f"{meta_path}: unsupported format_version {found!r} (this coala reads {FORMAT_VERSION})",
                             path=meta_path)
    for key, kind in (("model_class", str), ("low_rank", dict), ("tied", dict), ("weights", str),
                      ("checksums", (dict, type(None)))):
        if not isinstance(meta.get(key), kind):
            what = kind.__name__ if isinstance(kind, type) else kind[0].__name__
            raise CoalaFileError(f"{meta_path}: {key!r} must be a {what}, got {meta.get(key)!r:.80}", path=meta_path)
    return meta


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, new parameters are created on the meta device (buffers stay real): no weight memory."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_state(folder: Path, weights: str, device: str,
                checksums: dict[str, str] | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of the folder and, for each key, the file it came from. Every file is checked first: complete
    (safetensors header and data), and with ``checksums`` ({file: SHA-256}) unchanged since it was saved."""
    path = folder / weights
    if not path.is_file():
        raise CoalaFileNotFoundError(f"weights file {path} not found", path=path)
    checksums = checksums or {}
    if weights.endswith(".index.json"):
        check_file(path, checksums.get(weights), folder / META_FILE)
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CoalaFileError(f"{path} is not a valid safetensors index (needs a 'weight_map'): {e}",
                                 path=path) from e
        files = sorted(set(weight_map.values()))
    else:
        files = [weights]
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise CoalaFileNotFoundError(f"weights shard {shard} (listed in {path}) not found", path=shard)
        check_file(shard, checksums.get(name), folder / META_FILE)  # complete, and unchanged since saved
        for key, t in safetensors.torch.load_file(str(shard), device=device).items():
            state[key] = t
            origin[key] = name
    return state, origin


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model class {name!r} is not a transformers model class; pass model_cls= to load()")
    return cls


def load(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_cls: type | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model written by ``save_compressed``: same class, LowRankLinear layers, tied weights, eval().

    Args:
        path: the folder.
        device: where the model goes (default CPU); tensors are read straight onto it.
        dtype: cast the stored floating weights to this dtype (default: as stored).
        model_cls: the model class when it is not a transformers class (default: ``transformers.<model_class>``).
        verify: check each weights file against the SHA-256 that ``coala.json`` records (one extra read of the
            weights; False skips it). Every file is checked for completeness either way.

    Nothing is downloaded and no code from the folder runs (its modeling_coala.py is for transformers): the
    architecture is built from the saved base config with parameters on the meta device, the recorded
    low-rank layers are swapped in, and the stored tensors are assigned strictly. Folders written before
    modeling_coala.py existed load the same way.

    Raises ``CoalaError`` naming the file: ``CoalaFileNotFoundError`` (missing folder, coala.json or weights
    file), ``CoalaFileError`` (bad coala.json or config.json, a truncated or changed weights file), CoalaError
    (coala.json's model class does not match config.json; missing / unexpected / wrongly shaped tensors).
    """
    from transformers import GenerationConfig

    folder = Path(path)
    meta = read_meta(folder)
    cls = model_cls if model_cls is not None else _model_class(meta["model_class"])
    try:
        config = read_base_config(folder)  # the base class's config (config.json names the remote-code class)
    except (OSError, ValueError) as e:
        if isinstance(e, CoalaError):
            raise
        raise CoalaFileError(f"{folder / 'config.json'} cannot be read as a model config: {e}",
                             path=folder / "config.json") from e
    check_model_class(cls, config, folder / META_FILE)
    with _parameters_on_meta():
        try:
            model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CoalaError(f"{folder}: {cls.__name__} cannot be built from {folder / 'config.json'}: {e}",
                             path=folder) from e
        for name, spec in meta["low_rank"].items():
            try:
                new = LowRankLinear(
                    int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]), bias=bool(spec["bias"])
                )
                replace_module(model, name, new)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{folder / META_FILE}: bad low-rank entry {name!r}: {e}") from e
    device_str = str(torch.device(device)) if device is not None else "cpu"
    state, origin = _read_state(folder, meta["weights"], device_str, meta.get("checksums") if verify else None)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    tied: dict[str, str] = meta["tied"]
    expected = set(model.state_dict()) - set(tied)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise ValueError(f"{folder / meta['weights']}: missing tensors for {type(model).__name__}: {missing[:8]}")
    if unexpected:
        raise ValueError(
            f"{folder / origin[unexpected[0]]}: unexpected tensors {unexpected[:8]} (not in {type(model).__name__})"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / meta['weights']}: tensors do not fit {type(model).__name__}: {e}") from e
    for dropped, kept in tied.items():
        _alias(model, dropped, kept, folder)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{folder}: tensors not restored (still on the meta device): {left[:8]}")
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.config.dtype = dtype
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def _alias(model: nn.Module, dropped: str, kept: str, folder: Path) -> None:
    """Make tensor ``dropped`` the very same Parameter/buffer as ``kept`` (re-tying shared weights)."""
    owner_name, _, attr = dropped.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
        source_owner_name, _, source_attr = kept.rpartition(".")
        source_owner = model.get_submodule(source_owner_name) if source_owner_name else model
    except AttributeError as e:
        raise ValueError(f"{folder / META_FILE}: tied entry {dropped} -> {kept} names no module: {e}") from e
    if source_attr in source_owner._parameters and attr in owner._parameters:
        owner._parameters[attr] = source_owner._parameters[source_attr]
    elif source_attr in source_owner._buffers and attr in owner._buffers:
        owner._buffers[attr] = source_owner._buffers[source_attr]
    else:
        raise ValueError(f"{folder / META_FILE}: tied entry {dropped} -> {kept} does not name two parameters/buffers")
