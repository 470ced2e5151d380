"""The blocks of a Hugging Face transformer and the inputs that reach them (GPTQ / SVD-LLM style).

1. ``find_blocks``: the repeated blocks are the largest ``nn.ModuleList`` whose members all have one class
   (``model.layers``, ``h``, ``encoder.layer``, ``decoder.layers`` …) — no table per architecture.
2. ``catch_block_inputs``: run the model on each calibration batch until block 0 is called; a forward
   pre-hook records the block's positional arguments (the hidden states) and keyword arguments (attention
   mask, position embeddings / ids …) and stops the forward. KV caches are disabled while catching.
3. ``BlockInputs``: what block 0 received for every batch; the walker (``coala.walker``) overwrites the hidden
   states with each block's outputs, which become the next block's inputs.

Memory: the hidden states of all calibration samples (one copy, tokens × hidden, in the model's dtype) stay
where the model's embeddings are (usually the CPU); outputs overwrite inputs batch by batch. Only one block,
one batch of activations and that block's statistics are on the compute device at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import CoalaError
from .lowrank import find_linear_layers, model_device


class _BlockReached(Exception):
    """Raised by the pre-hook on block 0 to stop the forward once its inputs are recorded."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks of ``model``: (dotted name, ModuleList).

    Chosen generically: among all ``nn.ModuleList`` whose members share one class, the one holding the most
    parameters (ties: the most members, then the first found).
    """
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        key = (sum(p.numel() for p in module.parameters()), len(module))
        if key[0] > 0 and (best is None or key > best[0]):
            best = (key, name, module)
    if best is None:
        raise CoalaError(
            f"found no repeated blocks in {type(model).__name__}: coala compresses models whose layers are an "
            "nn.ModuleList of identical blocks (model.layers, h, encoder.layer, …)", argument="model",
        )
    return best[1], best[2]


def block_layers(
    model: nn.Module, blocks: nn.ModuleList, prefix: str, targets: Sequence[str] | None
) -> list[dict[str, nn.Module]]:
    """For each block, full dotted name → targeted linear layer inside it (validated for every block).

    A target must match a linear layer in every block (layers outside the blocks — embeddings, lm_head,
    pooler — are never compressed); ValueError otherwise, naming the target.
    """
    out = []
    for i, block in enumerate(blocks):
        try:
            found = find_linear_layers(block, targets)
        except ValueError as err:
            raise CoalaError(f"in block {prefix}.{i}: {err} (targets are matched inside the blocks only)",
                             argument="targets", layer=f"{prefix}.{i}") from err
        if not found:
            raise CoalaError(f"block {prefix}.{i} contains no linear layer to compress", argument="targets",
                             layer=f"{prefix}.{i}")
        out.append({f"{prefix}.{i}.{name}": m for name, m in found.items()})
    return out


def _to(obj, device: torch.device):
    """Move the tensors inside (nested tuples / lists / dicts of) ``obj`` to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _strip(obj):
    """Detach tensors; drop KV-cache objects (they would grow with every block call)."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_strip(o) for o in obj)
    if isinstance(obj, list):
        return [_strip(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()}
    if type(obj).__name__.endswith("Cache"):
        return None
    return obj


def _share(new, old):
    """Reuse ``old``'s tensors where ``new`` holds equal ones (position ids / embeddings, causal masks)."""
    if isinstance(new, Tensor) and isinstance(old, Tensor):
        same = new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
        return old if same and torch.equal(new, old) else new
    if isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old):
        return tuple(_share(a, b) for a, b in zip(new, old, strict=True))
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _share(v, old[k]) if k in old else v for k, v in new.items()}
    return new


class BlockInputs:
    """What block 0 received for each calibration batch; the hidden states are replaced as blocks run.

    Per batch b: ``hidden(b)`` (batch × seq × hidden, model dtype), ``args[b]`` (the positional arguments after
    the hidden states), ``kwargs[b]`` (attention mask, position embeddings, …; without "hidden_states") and
    ``masks[b]`` (the batch × seq padding mask, 1 = real token, or None when the batch has no padding) and
    ``sizes[b]`` (its number of samples).

    The hidden states live in memory (one tensor per batch, overwritten in place) or, with ``offload_dir``,
    in one safetensors file per batch there, so that host memory does not grow with the number of samples.
    """

    def __init__(self, offload_dir: str | os.PathLike | None = None) -> None:
        self.args: list[tuple] = []
        self.kwargs: list[dict] = []
        self.masks: list[Tensor | None] = []
        self.sizes: list[int] = []
        self.as_keyword: list[bool] = []
        self._hidden: list[Tensor | None] = []
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        if self.offload_dir is not None:
            self.offload_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.args)

    def _path(self, b: int) -> Path:
        return self.offload_dir / f"hidden-{b:06d}.safetensors"

    def append(self, hidden: Tensor, args: tuple, kwargs: dict, mask: Tensor | None, as_keyword: bool) -> None:
        self.args.append(args)
        self.kwargs.append(kwargs)
        self.masks.append(mask)
        self.sizes.append(int(hidden.shape[0]))
        self.as_keyword.append(as_keyword)
        self._hidden.append(None)
        self.set_hidden(len(self._hidden) - 1, hidden)

    def hidden(self, b: int) -> Tensor:
        if self.offload_dir is not None:
            return safetensors.torch.load_file(str(self._path(b)))["hidden"]
        return self._hidden[b]

    def set_hidden(self, b: int, h: Tensor) -> None:
        if self.offload_dir is not None:
            safetensors.torch.save_file({"hidden": h.detach().to("cpu").contiguous()}, str(self._path(b)))
            return
        store = self._hidden[b]
        if store is not None and store.shape == h.shape:  # in place: no allocation churn for the cache
            store.copy_(h)
        else:
            self._hidden[b] = h.detach().clone() if store is None else h.to(device=store.device, dtype=store.dtype)

    def call(self, b: int, device: torch.device) -> tuple[tuple, dict]:
        """(args, kwargs) of block calls for batch b, on ``device``."""
        h = self.hidden(b).to(device)
        args, kwargs = _to(self.args[b], device), _to(self.kwargs[b], device)
        if self.as_keyword[b]:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args), kwargs

    def copy(self, offload_dir: str | os.PathLike | None = None) -> BlockInputs:
        """A second stream of the same batches: the same per-batch arguments (shared, never written) and a copy of
        the current hidden states, in memory or offloaded to ``offload_dir``."""
        twin = BlockInputs(offload_dir)
        twin.args, twin.kwargs, twin.masks = list(self.args), list(self.kwargs), list(self.masks)
        twin.sizes, twin.as_keyword = list(self.sizes), list(self.as_keyword)
        twin._hidden = [None] * len(self)
        for b in range(len(self)):
            twin.set_hidden(b, self.hidden(b))
        return twin

    def close(self) -> None:
        """Delete the offloaded files (the folder too when nothing else is in it)."""
        if self.offload_dir is None or not self.offload_dir.is_dir():
            return
        for p in self.offload_dir.glob("hidden-*.safetensors"):
            p.unlink(missing_ok=True)
        if not any(self.offload_dir.iterdir()):
            self.offload_dir.rmdir()


def normalize_batches(calibration: Iterable) -> list[dict[str, Tensor]]:
    """Calibration batches as dicts of model inputs: accepts dicts with "input_ids" (and optionally
    "attention_mask", "token_type_ids", …) or bare (batch × seq) int tensors of input ids."""
    batches = []
    for i, item in enumerate(calibration):
        if isinstance(item, Tensor):
            item = {"input_ids": item}
        if not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError(f"calibration batch {i} must be a dict with 'input_ids' or an input-ids tensor, "
                            f"got {type(item).__name__}")
        ids = item["input_ids"]
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(f"calibration batch {i}: input_ids must be an integer (batch × seq) tensor")
        batches.append(dict(item))
    if not batches:
        raise ValueError("calibration data is empty")
    return batches


@contextlib.contextmanager
def no_kv_cache(model: nn.Module):
    """Turn the model config's use_cache off for the duration of the with (no KV cache is built)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None and old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and old is not None:
            config.use_cache = old


def catch_block_inputs(
    model: nn.Module,
    block0: nn.Module,
    batches: list[dict[str, Tensor]],
    *,
    progress: bool = True,
    offload_dir: str | os.PathLike | None = None,
) -> BlockInputs:
    """Run ``model`` on each batch up to ``block0`` and record block 0's inputs (on the model's device)."""
    device = model_device(model)
    caught = BlockInputs(offload_dir)

    def hook(_module, args, kwargs):
        raise _BlockReached(args, kwargs)

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    prev_args: tuple = ()
    prev_kwargs: dict = {}
    try:
        with no_kv_cache(model), torch.no_grad():
            for batch in tqdm(batches, desc="catch block-0 inputs", disable=not progress, leave=False):
                try:
                    model(**_to(batch, device))
                except _BlockReached as stop:
                    args, kwargs = _strip(stop.args), _strip(stop.kwargs)
                else:
                    raise RuntimeError(f"the forward of {type(model).__name__} returned without calling block 0")
                as_keyword = not args
                if as_keyword and "hidden_states" not in kwargs:
                    raise RuntimeError("block 0 was called without hidden states (no positional argument and no "
                                       "'hidden_states' keyword)")
                hidden = kwargs.pop("hidden_states") if as_keyword else args[0]
                args = args[1:]
                # equal masks / position tensors of consecutive batches are stored once
                args, kwargs = _share(args, prev_args), _share(kwargs, prev_kwargs)
                mask = batch.get("attention_mask")
                caught.append(hidden, args, kwargs, None if mask is None or bool(mask.all()) else
                              mask.detach().cpu(), as_keyword)
                prev_args, prev_kwargs = args, kwargs
    except BaseException:
        caught.close()
        raise
    finally:
        handle.remove()
    return caught


def check_outputs(h: Tensor, mask: Tensor | None, where: str) -> None:
    """ValueError naming ``where`` when a block's outputs ``h`` (batch × seq × hidden) hold NaN / Inf on real
    tokens (``mask`` 1; None = every token is real)."""
    real = h if mask is None else h[mask.to(h.device) != 0]
    if not bool(torch.isfinite(real).all()):
        bad = int((~torch.isfinite(real)).sum())
        raise ValueError(f"{where} produced {bad} non-finite output values (NaN/Inf) on calibration data; "
                         "coala never replaces them: check the model's weights and dtype")
