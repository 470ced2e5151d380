"""Sensitivity-based rank allocation: spend the parameter budget where the model's output cares least.

Uniform ranks treat every matrix alike, but truncating some matrices moves the model's output far more than
truncating others (in MiniLM, the FFN output layers of the last blocks matter ~100× more per unit of their
own relative error than the attention query/key maps). This module measures that directly and allocates
ranks from the measurements (ASVD's "sensitivity-based truncation rank searching", Yuan et al. 2023):

1. For every targeted matrix alone, at a few probe ratios, replace W by its low-rank approximation and
   measure the change of the model's output on a few calibration samples (``output_change``):
   models with logits: the increase of the mean next-token NLL (ASVD's perplexity criterion);
   encoders: 1 − mean cosine of the mean-pooled last hidden states (sentence embeddings).
2. Between probes, interpolate the change linearly in the layer's relative truncation loss e(r) (exact for
   every rank from the one decomposition); ranks below the deepest probe are not allowed (no extrapolation).
3. Choose every rank (or "stays dense") to minimise Σ change subject to the budget: a Lagrange multiplier
   λ is bisected so that each layer independently minimises change(r) + λ·params(r) (``allocate``).

Changes of different matrices add up closely at these sizes (MiniLM at 20 %: the sum of the single-matrix
changes predicts the joint change to within 15 %), which is what step 3 relies on.
Precision: outputs compared in float32, sums in float64.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .allocate import (
    LayerEvidence,
    RankOptions,
    lagrangian_ranks,
    largest_saving_rank,
    rank_for_ratio,
    register_allocation,
)
from .blocks import no_kv_cache
from .evaluate import last_hidden_states, mean_pool
from .linalg.decomposition import Decomposition
from .lowrank import dense_weight, is_conv1d, model_device
from .models import is_causal_lm

PROBE_RATIOS = (0.2, 0.4, 0.6, 0.8)


@dataclass
class SensitivityCurve:
    """Measured output change of truncating one (out × in) matrix alone.

    ``loss_fraction[r]``: relative truncation loss e(r) of rank r (r = 0..min(out, in)), 1 → 0.
    ``probes``: (rank, change) pairs measured at the probe ratios.
    """

    name: str
    shape: tuple[int, int]
    loss_fraction: list[float]
    probes: list[tuple[int, float]]

    @property
    def min_rank(self) -> int:
        return min(r for r, _ in self.probes)

    def change(self, rank: int | None) -> float:
        """Interpolated output change at ``rank`` (None = dense = 0); ValueError below the deepest probe.

        The probes are read as a non-decreasing function of the truncation loss (a running maximum from the
        dense end, starting at 0): truncating more is never assumed to help, so a probe that measured a small
        improvement (noise, e.g. an NLL that fell by chance) counts as the change of the lighter probe before it.
        """
        if rank is None:
            return 0.0
        if rank < self.min_rank:
            raise ValueError(f"rank {rank} of layer {self.name} is below its deepest probe ({self.min_rank})")
        x = self.loss_fraction[min(rank, len(self.loss_fraction) - 1)]
        points, top = [(0.0, 0.0)], 0.0
        for e, d in sorted((self.loss_fraction[r], d) for r, d in self.probes):
            top = max(top, d)
            points.append((e, top))
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if x <= x1:
                return y0 if x1 <= x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return points[-1][1]


def _loss_fraction(dec: Decomposition) -> list[float]:
    tails = dec.truncation_loss()[: dec.max_rank + 1].to(torch.float64)
    total = float(tails[0])
    return (tails / total).tolist() if total > 0 else [0.0] * int(tails.shape[0])


@contextlib.contextmanager
def truncated(module: nn.Module, A: Tensor, B: Tensor):
    """Temporarily give an nn.Linear / Conv1D the weight A @ B (out × in); the original is put back after."""
    param = module.weight
    original = param.data
    new = (A @ B).to(original)
    param.data = new.T.contiguous() if is_conv1d(module) else new
    try:
        yield module
    finally:
        param.data = original


def first_samples(batches: Sequence[dict[str, Tensor]], nsamples: int) -> list[dict[str, Tensor]]:
    """The first ``nsamples`` rows of the batches (cut inside a batch when needed)."""
    out, left = [], nsamples
    for b in batches:
        if left <= 0:
            break
        k = min(left, int(b["input_ids"].shape[0]))
        out.append({key: v[:k] for key, v in b.items()})
        left -= k
    return out


def outputs(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> Tensor:
    """Per-sample output summary: token NLLs (causal LMs, ``models.is_causal_lm``) or unit sentence embeddings
    (encoders, with or without a head: mean-pooled last hidden states)."""
    device = model_device(model)
    causal = is_causal_lm(model)
    outs = []
    with torch.no_grad(), no_kv_cache(model):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            if causal:
                logits = model(**b).logits
                labels = b["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                      reduction="none")
                outs.append(nll[labels != -100])
            else:
                outs.append(F.normalize(mean_pool(last_hidden_states(model, b), mask), dim=-1))
    return torch.cat(outs)


@dataclass
class Probe:
    """The probe set: the first ``nsamples`` calibration samples, the original model's ``outputs`` on them, and
    the ratios at which each matrix is truncated."""

    batches: list[dict[str, Tensor]]
    reference: Tensor
    ratios: tuple[float, ...] = PROBE_RATIOS

    @classmethod
    def build(cls, model: nn.Module, batches: Sequence[dict[str, Tensor]], nsamples: int,
              ratios: Sequence[float] = PROBE_RATIOS) -> Probe:
        """Run the (still original) ``model`` once on the probe samples."""
        probe = first_samples(batches, nsamples)
        return cls(probe, outputs(model, probe), tuple(ratios))


def output_change(model: nn.Module, batches: Sequence[dict[str, Tensor]], reference: Tensor, where: str = "") -> float:
    """How far the model's outputs moved from ``reference`` (= ``outputs`` of the original model).

    ``where`` names the probe (layer and rank) in the error raised on non-finite outputs."""
    now = outputs(model, batches)
    if not torch.isfinite(now).all():
        raise ValueError(f"non-finite model outputs while probing the sensitivity of {where or 'the model'}")
    if now.ndim == 1:  # token NLLs
        return float(now.to(torch.float64).mean() - reference.to(torch.float64).mean())
    return float(1.0 - (now * reference).sum(-1).to(torch.float64).mean())


def measure(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    decompositions: Mapping[str, Decomposition],
    batches: Sequence[dict[str, Tensor]],
    reference: Tensor,
    probe_ratios: Sequence[float] = PROBE_RATIOS,
) -> dict[str, SensitivityCurve]:
    """One ``SensitivityCurve`` per layer of ``layers`` (name → module of ``model``), each probed alone."""
    curves: dict[str, SensitivityCurve] = {}
    for name, module in layers.items():
        dec = decompositions[name]
        m, n = dense_weight(module).shape
        ranks = sorted({r for r in (rank_for_ratio(m, n, p) for p in probe_ratios) if r is not None})
        probes = []
        for r in ranks:
            A, B = dec.factors(r)
            with truncated(module, A, B):
                probes.append((r, output_change(model, batches, reference, f"layer {name} at rank {r}")))
        if probes:
            curves[name] = SensitivityCurve(name, (int(m), int(n)), _loss_fraction(dec), probes)
    return curves


def allocate(curves: Mapping[str, SensitivityCurve], ratio: float, shapes: Mapping[str, tuple[int, int]]
             ) -> dict[str, int | None]:
    """Ranks (None = dense) for every layer of ``shapes`` removing at least ``ratio`` of their parameters
    while minimising the summed interpolated output change (``coala.allocate.lagrangian_ranks``). A layer may
    take dense or any rank between its deepest probe and the largest rank that saves parameters; layers without
    a curve stay dense."""
    options = {}
    for name, c in curves.items():
        ranks = [None, *range(c.min_rank, largest_saving_rank(*c.shape) + 1)]
        cost = torch.tensor([c.change(r) for r in ranks], dtype=torch.float64)
        options[name] = RankOptions(c.shape, ranks, cost)
    try:
        return lagrangian_ranks(options, shapes, ratio)
    except ValueError as err:
        raise ValueError(f"{err} (or probe deeper ratios)") from err


@register_allocation("sensitivity", needs=("sensitivity",))
def sensitivity_allocation(evidence: Mapping[str, LayerEvidence], ratio: float) -> dict[str, int | None]:
    """ASVD-style sensitivity allocation (this module's docstring): ranks from the measured curves; a matrix
    without a curve stays dense."""
    curves = {name: e.sensitivity for name, e in evidence.items() if e.sensitivity is not None}
    return allocate(curves, ratio, {name: e.shape for name, e in evidence.items()})
