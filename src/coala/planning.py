"""Rank plans: from the configuration and, when the allocation asks for it, evidence measured on the original model.

A plan maps every targeted layer's full name to its rank (None: the layer stays dense). ``CompressConfig.rank``
forces one rank everywhere; otherwise the registered allocation (``coala.allocate.ALLOCATIONS``) decides, from
per-layer ``LayerEvidence``. Evidence beyond the shapes (truncation-loss curves, measured sensitivities) comes
from one decomposition per layer of the ORIGINAL weights, gathered either

- in a pass of the block walker over the original model (``plan_in_pass``, what ``compress`` does: statistics
  of one block at a time, decompositions dropped after each block), or
- from statistics and decompositions already in memory (``plan_from_decompositions``: ``compare``,
  ``apply_low_rank``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .allocate import get_allocation
from .config import CompressConfig
from .fisher import fisher_batches, truncation_curves
from .layer_solve import add_evidence, decompose_layer, fold_bases_of, forced_ranks, new_evidence, stats_for
from .linalg.decomposition import Decomposition
from .linalg.methods import get_method
from .lowrank import linear_shape
from .models import is_causal_lm
from .sensitivity import Probe
from .walker import BlockStep, BlockWalker

Plan = dict[str, int | None]


def plan_in_pass(walker: BlockWalker, config: CompressConfig, batches: Sequence[dict[str, Tensor]]) -> Plan:
    """The plan for every layer of ``walker``, running one walk over the original model when the allocation
    needs evidence (``kinds`` = the method's statistics; the hidden states propagate through the original blocks).
    The whole model must still be original: sensitivity probes run it where it lives."""
    shapes = {name: linear_shape(m) for layers in walker.layers for name, m in layers.items()}
    if config.rank is not None:
        return forced_ranks(shapes, config.rank)
    allocation = get_allocation(config.resolved_allocation)
    evidence = new_evidence(shapes, walker.prefix)
    if allocation.needs:
        probe = (Probe.build(walker.model, batches, config.sensitivity_samples, config.probe_ratios)
                 if "sensitivity" in allocation.needs else None)
        fisher = "fisher" in allocation.needs
        bases: dict[str, tuple[Tensor, Tensor]] = {}  # kept until the Fisher pass (about one model's weights)

        def solve(step: BlockStep) -> dict[str, Decomposition]:
            if fisher:
                bases.update(fold_bases_of(step.layers, step.capture, config))
            if not allocation.needs & {"tail_loss", "sensitivity"}:
                return {}
            return {name: decompose_layer(module, stats_for(step.capture, name), config, name)
                    for name, module in step.layers.items()}

        def after(step: BlockStep, decompositions: dict[str, Decomposition]) -> None:
            add_evidence(evidence, decompositions, allocation.needs, model=walker.model, layers=step.layers,
                         probe=probe)

        walker.walk(solve, kinds=get_method(config.method).needs, dtype=config.accumulation_dtype,
                    propagate="original", after=after, desc=f"{allocation.name} allocation", folds=2 if fisher else 1)
        if fisher:
            all_layers = {name: m for layers in walker.layers for name, m in layers.items()}
            add_fisher(evidence, walker.model, all_layers, bases, batches, config, progress=walker.progress)
    return allocation.allocate(evidence, float(config.ratio))


def plan_from_decompositions(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    config: CompressConfig,
    decompositions: Mapping[str, Decomposition] | None = None,
    stats: Mapping | None = None,
    probe: Probe | None = None,
    batches: Sequence[dict[str, Tensor]] | None = None,
    fisher: Mapping[str, Tensor] | None = None,
) -> Plan:
    """The plan for ``layers`` (full name → module of the original ``model``) from ready ``decompositions`` (or
    ones computed here from ``stats`` when the allocation needs them). Sensitivity needs a ``probe``; the Fisher
    curves come from ``fisher`` (name → curve, ``coala.fisher.truncation_curves``) or from a backward pass over
    ``batches`` scoring fits on the folds of ``stats`` (collected with folds=2)."""
    shapes = {name: linear_shape(m) for name, m in layers.items()}
    if config.rank is not None:
        return forced_ranks(shapes, config.rank)
    allocation = get_allocation(config.resolved_allocation)
    evidence = new_evidence(shapes)
    if allocation.needs:
        if "sensitivity" in allocation.needs and probe is None:
            raise ValueError(f"allocation {allocation.name!r} probes the model on calibration samples: use "
                             "coala.compress (or pass a sensitivity.Probe)")
        if "fisher" in allocation.needs and fisher is not None:
            for name in layers:
                evidence[name].fisher = fisher.get(name)
        elif "fisher" in allocation.needs:
            if batches is None:
                raise ValueError(f"allocation {allocation.name!r} runs a backward pass on calibration samples: pass "
                                 "the calibration batches (apply_low_rank(..., batches=)), use coala.compress, or "
                                 "choose allocation='uniform'")
            add_fisher(evidence, model, layers, fold_bases_of(layers, stats, config), batches, config)
        decs = dict(decompositions or {})
        if allocation.needs & {"tail_loss", "sensitivity"}:
            for name, module in layers.items():
                if name not in decs:
                    decs[name] = decompose_layer(module, stats_for(stats, name), config, name)
        add_evidence(evidence, decs, allocation.needs, model=model, layers=layers, probe=probe)
    return allocation.allocate(evidence, float(config.ratio))


def add_fisher(evidence: dict, model: nn.Module, layers: Mapping[str, nn.Module],
               bases: Mapping[str, tuple[Tensor, Tensor]], batches: Sequence[dict[str, Tensor]],
               config: CompressConfig, progress: bool = False) -> None:
    """Fill ``evidence[name].fisher`` with each layer's truncation curve from one forward + backward of the ORIGINAL
    ``model`` on the first ``config.fisher_samples`` calibration samples, each cut to its first
    ``config.fisher_seqlen_for`` positions (by default half of each sample on causal LMs, whole samples on encoders;
    ``coala.fisher.fisher_batches``, ``truncation_curves``), scoring the method's fold ``bases``
    (``layer_solve.fold_bases``)."""
    seqlen = config.fisher_seqlen_for(is_causal_lm(model))
    curves = truncation_curves(model, layers, bases, fisher_batches(batches, config.fisher_samples, seqlen),
                               progress=progress)
    for name, curve in curves.items():
        evidence[name].fisher = curve
