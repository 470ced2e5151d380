"""Recovery fine-tuning of a compressed model: LoRA on the low-rank factors, then merged back into them.

A compressed model holds ``LowRankLinear`` layers (``down``: rank × in, ``up``: out × rank, both nn.Linear).
peft puts a LoRA adapter on every ``down`` and ``up``; a plain training loop trains the adapters only; then
``merge_and_unload`` folds s·B·A into each factor. The merged model has exactly the same shapes (and ranks)
as before, so it is saved in the compressed format and reloads with ``coala.load``.

Objectives:
- ``"lm"``: next-token cross-entropy on text windows (causal LMs; SVD-LLM's recovery step).
- ``"distill"``: match a teacher's (the uncompressed model's) last hidden states on real tokens:
  Σ‖h − h_t‖² / Σ‖h_t‖² (encoders such as the MiniLM sentence model).
Training runs with the model in eval mode (no dropout: the target is a deterministic function) in the model's
dtype (float32 recommended on CPU); losses are reduced in float32.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .lowrank import low_rank_layers, model_device

OBJECTIVES = ("lm", "distill")


@dataclass
class FinetuneConfig:
    """Settings of a recovery run (see module docstring)."""

    lora_rank: int = 8
    lora_alpha: float | None = None  # default 2 · lora_rank
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    objective: str = "lm"
    seed: int = 0
    history: list[float] = field(default_factory=list, repr=False)

    def validate(self) -> FinetuneConfig:
        for name in ("lora_rank", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


def factor_targets(model: nn.Module) -> list[str]:
    """Names of the ``down`` and ``up`` factors of every LowRankLinear (ValueError when there are none)."""
    layers = low_rank_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LowRankLinear layer: nothing to recover (is it compressed?)")
    return [f"{name}.{part}" for name in layers for part in ("down", "up")]


def _lm_loss(model, batch: dict[str, Tensor]) -> Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _distill_loss(model, teacher, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if getattr(out, "last_hidden_state", None) is None or getattr(target, "last_hidden_state", None) is None:
        raise ValueError("objective 'distill' needs models returning last_hidden_state (encoders); use 'lm'")
    h, target = out.last_hidden_state, target.last_hidden_state
    if h.shape != target.shape:
        raise ValueError(f"teacher states {tuple(target.shape)} do not match the model's {tuple(h.shape)}")
    mask = batch["attention_mask"].bool()
    t = target[mask].float()
    return (h[mask].float() - t).square().sum() / t.square().sum().clamp_min(1e-30)


def recovery_loss(model, batch: dict[str, Tensor], objective: str, teacher: nn.Module | None = None) -> Tensor:
    """The training loss of one batch (float32 scalar)."""
    if objective == "lm":
        return _lm_loss(model, batch)
    if teacher is None:
        raise ValueError("objective 'distill' needs a teacher model (the uncompressed original)")
    return _distill_loss(model, teacher, batch)


def finetune(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> nn.Module:
    """LoRA recovery of ``model`` (modified in place and returned, merged, in eval mode).

    ``batches``: dicts with ``input_ids`` and ``attention_mask`` (batch × seq), cycled in a seeded random order
    for ``config.steps`` steps. ``config.history`` receives the loss of every step.
    """
    from peft import LoraConfig, get_peft_model

    config.validate()
    if not batches:
        raise ValueError("no training batches")
    if config.objective == "distill" and teacher is None:
        raise ValueError("objective 'distill' needs a teacher model (the uncompressed original)")
    targets = factor_targets(model)
    device = model_device(model)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                      target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    order: list[int] = []
    torch.manual_seed(config.seed)
    if teacher is not None:
        teacher.eval()
    peft_model.eval()  # no dropout: recovery matches the original function, noise would only bias it
    for _ in tqdm(range(config.steps), desc="recovery", disable=not progress):
        if not order:
            order = rng.sample(range(len(batches)), len(batches))
        batch = {k: v.to(device) for k, v in batches[order.pop()].items()}
        loss = recovery_loss(peft_model, batch, config.objective, teacher)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite recovery loss at step {len(config.history)}: lower --lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        config.history.append(float(loss.detach()))
    merged = peft_model.merge_and_unload()
    return merged.eval()


@torch.no_grad()
def mean_loss(model, batches, objective: str, teacher: nn.Module | None = None) -> float:
    """Mean recovery loss over ``batches`` (evaluation, no gradient)."""
    device = model_device(model)
    model.eval()
    losses = [float(recovery_loss(model, {k: v.to(device) for k, v in b.items()}, objective, teacher))
              for b in batches]
    return sum(losses) / len(losses)
