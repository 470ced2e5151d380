"""Calibration context for LoRA initialisation: batches in, one R factor per targeted layer input out.

A calibration source is any iterable of batches; a batch is either a tensor of token ids (batch × seq) or a
mapping of model keyword arguments (``input_ids``, ``attention_mask``, …; a tokenizer's BatchEncoding works).
Padding positions (``attention_mask == 0``) are excluded from the statistics. Inputs shared by several targeted
layers (q/k/v, gate/up) are captured once (``coala.capture.InputCapture``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..capture import InputCapture
from ..data import calibration_batches
from ..distributed import all_reduce_, ensure_joined, is_distributed, is_main
from ..distributed_run import shard_batches
from ..lowrank import model_device

Batch = Tensor | Mapping[str, Tensor]


def iter_batches(calibration: Iterable[Batch], device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Normalise batches to keyword dicts on ``device``; TypeError/ValueError for anything else."""
    if calibration is None:
        raise ValueError("calibration data is required for context-aware initialisation (coala, corda)")
    if isinstance(calibration, (Tensor, Mapping, str)):
        raise TypeError(
            "calibration must be an iterable of batches (a list of token-id tensors or of tokenizer outputs), "
            f"got a single {type(calibration).__name__}; wrap it in a list"
        )
    for i, batch in enumerate(calibration):
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        elif isinstance(batch, Mapping):
            batch = dict(batch)
        else:
            raise TypeError(f"calibration batch {i} must be a Tensor or a mapping, got {type(batch).__name__}")
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"calibration batch {i} has neither input_ids nor inputs_embeds: {sorted(batch)}")
        yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def text_batches(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    pad_id: int | None = None,
) -> list[dict[str, Tensor]]:
    """Every document, in order, cut into consecutive windows of at most ``seq_len`` tokens (with the special
    tokens), ``batch_size`` windows per batch, right-padded: ``coala.data.calibration_batches`` in "documents"
    mode, which does the work (``max_windows``: keep only the first windows; None: all).

    Returns dicts with ``input_ids`` and ``attention_mask`` (int64, batch × longest window). The tokenizer is
    not modified (padding uses ``pad_id``, else its pad token id, else 0; padded rows are masked out anyway).
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    return calibration_batches(list(texts), tokenizer, nsamples=max_windows, seqlen=seq_len, mode="documents",
                               batch_size=batch_size, pad_id=pad_id).batches


@torch.no_grad()
def collect_input_factors(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Iterable[Batch],
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Run ``calibration`` through ``model``; return layer name → R factor (in × in, ``dtype``) of its inputs.

    ``layers`` are nn.Linear / Conv1D modules inside ``model``. Accumulation (TSQR) runs in ``dtype``
    (float32 or float64) whatever the activation dtype. The model is put in eval mode and restored. In a
    distributed run (docs/design.md §12) each rank runs its share of the batches and every rank returns the
    factors of all of them.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    ensure_joined(device)  # started by torchrun: join its process group
    if is_distributed():  # each rank streams its share of the batches; the factors are reduced below
        calibration = shard_batches(list(iter_batches(calibration, device)))
    n_batches = 0
    try:
        with InputCapture(model, dict(layers), kinds=("r",), dtype=dtype) as cap:
            for batch in tqdm(iter_batches(calibration, device), desc="calibration",
                              disable=not progress or not is_main()):
                cap.mask = batch.get("attention_mask")
                model(**batch)
                n_batches += 1
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration data is empty: no batch was run")
    all_reduce_([cap.stats[k] for k in sorted(cap.stats)], what="LoRA calibration statistics")  # distributed only
    out = {}
    for name in layers:
        rf = cap.stats_for(name).r
        rf.require_rows()
        out[name] = rf.R
    return out


def single_sequences(calibration: Iterable[Batch], device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Each row of each batch as its own batch of one, padding positions removed (peft's CorDA hook needs
    batch size 1 and would otherwise count padding)."""
    for batch in iter_batches(calibration, device):
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        for row in range(ids.shape[0]):
            keep = mask[row].bool() if mask is not None else torch.ones_like(ids[row], dtype=torch.bool)
            yield {"input_ids": ids[row][keep][None], "attention_mask": torch.ones_like(ids[row][keep])[None]}
