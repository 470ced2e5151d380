"""Output-gradient (Fisher) weights: how much the model's loss cares about each layer's output error.

Replacing a layer's weight W by W' changes its outputs by Δy_t = (W − W') x_t at every token t. To second order
(the Gauss–Newton / empirical-Fisher approximation, as in FWSVD, Hsu et al. 2022), the summed loss moves by

    ΔL ≈ ½ Σ_t (g_tᵀ Δy_t)²,        g_t = ∂L/∂y_t   (the gradient at the layer's output, original model).

Averaging g_t g_tᵀ to an isotropic c·I per layer (c_ℓ = Σ_t ‖g_t‖² / (d_out · T)) turns this into
ΔL_ℓ(r) ≈ ½ c_ℓ · ‖(W − W'_r)Xᵀ‖²_F = ½ c_ℓ · loss_ℓ(r): the truncation-loss curve of the layer's own
decomposition, measured on calibration samples the projection was not fitted on (``coala.linalg.heldout``),
scaled by one number per layer measured in ONE forward and backward pass of the original model
(docs/design.md §6, "Fisher allocation").

The loss L: models with logits — the summed next-token NLL of the samples; encoders (no loss of their own) —
Σ_s ⟨z_s, e_s⟩ with e_s the unit mean-pooled sentence embedding and z_s ~ N(0, I) a fixed random direction per
sample, so that E_z[(g_tᵀ Δy_t)²] measures the change of the embedding itself (Hutchinson's estimator; for unit
vectors 1 − cos ≈ ½‖Δe‖²).

Precision: the pass runs in the model's dtype; squared gradient norms are summed in float64. Weights get no
gradients (parameters are frozen during the pass); only activation gradients are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .allocate import LayerEvidence, RankOptions, lagrangian_ranks, register_allocation
from .blocks import no_kv_cache
from .evaluate import mean_pool
from .lowrank import linear_shape, model_device

__all__ = ["fisher_allocation", "gradient_scales"]


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters without gradients for the duration (restored after); the input embeddings' output is made to
    require grad so that activation gradients still flow."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings: the Fisher pass cannot start a graph")
    handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _loss(model: nn.Module, out, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """The summed next-token NLL (models with logits) or Σ_s ⟨z_s, unit embedding_s⟩ (encoders)."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    logits = getattr(out, "logits", None)
    if logits is not None:
        labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    emb = F.normalize(mean_pool(out.last_hidden_state, mask).float(), dim=-1)
    z = torch.randn(emb.shape, generator=generator, dtype=torch.float32).to(emb.device)
    return (z * emb).sum()


def gradient_scales(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[dict[str, Tensor]], *,
                    seed: int = 0, progress: bool = True) -> dict[str, float]:
    """c_ℓ = Σ_t ‖∂L/∂y_{ℓ,t}‖² / (d_out · T) for every layer of ``layers`` (full name → nn.Linear / Conv1D of
    ``model``), from one forward + backward of the whole ``model`` (where it lives) over ``batches``.

    Args:
        batches: dicts with "input_ids" (B × S int64) and optionally "attention_mask" (B × S); T counts the
            tokens with mask 1.
        seed: the random directions z_s of encoders.

    Returns: name → c_ℓ (a float ≥ 0). Raises ValueError naming the layer whose gradients are not finite.
    """
    device = model_device(model)
    sums = {name: torch.zeros((), dtype=torch.float64) for name in layers}
    handles = []

    def watch(name: str):
        def add(grad: Tensor) -> None:  # returns None: the gradient flows on unchanged
            sums[name] += grad.detach().double().square().sum().cpu()

        def forward_hook(module, inputs, output):
            if not bool(torch.isfinite(output).all()):
                raise ValueError(f"layer {name}: non-finite outputs in the Fisher pass over the original model (its "
                                 "activations overflow on the calibration samples)")
            if output.requires_grad:
                output.register_hook(add)
        return forward_hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(watch(name)))
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        with _frozen(model), no_kv_cache(model), torch.enable_grad():
            for batch in tqdm(batches, desc="fisher pass", disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = _loss(model, model(**batch), batch, generator)
                if not torch.isfinite(loss):
                    raise ValueError("non-finite loss in the Fisher pass of the original model")
                loss.backward()
                tokens += int(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum())
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for name, module in layers.items():
        value = float(sums[name]) / (linear_shape(module)[0] * max(tokens, 1))
        if not value == value or value == float("inf"):
            raise ValueError(f"non-finite output gradients at layer {name} in the Fisher pass")
        scales[name] = value
    return scales


@register_allocation("fisher", needs=("heldout_loss", "fisher"))
def fisher_allocation(evidence: Mapping[str, LayerEvidence], ratio: float) -> dict[str, int | None]:
    """Ranks minimising Σ_ℓ c_ℓ · loss_ℓ(r_ℓ) (the predicted loss increase, this module's docstring) under the
    parameter budget (``lagrangian_ranks``): any rank from 1 to the largest that saves parameters, or dense.
    loss_ℓ is the held-out truncation loss (fitted on half of the calibration samples, measured on the other
    half, both ways): the in-sample tail under-states the error of wide layers fitted on few tokens, and an
    allocation that trusts it cuts exactly those (docs/design.md §6)."""
    options = {}
    for name, e in evidence.items():
        m, n = e.shape
        top = (m * n - 1) // (m + n)
        if top < 1:
            continue
        loss = e.heldout_loss.to(torch.float64)
        tail = loss[1 : top + 1] * e.fisher
        options[name] = RankOptions(e.shape, [*range(1, top + 1), None],
                                    torch.cat([tail, torch.zeros(1, dtype=torch.float64)]))
    return lagrangian_ranks(options, {name: e.shape for name, e in evidence.items()}, ratio)
