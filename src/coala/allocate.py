"""Rank allocation under a parameter budget.

Ratio semantics (SVD-LLM's "compression ratio"): ``ratio`` is the fraction of the targeted matrices'
parameters that is REMOVED. An m × n matrix kept at rank r costs r·(m + n) instead of m·n, so the rank that
removes a fraction ``ratio`` is

    r = int(m·n·(1 − ratio) / (m + n))          (floor, as in SVD-LLM)

Edge decisions (documented, never silent):
  * r is clamped up to 1 when the floor gives 0 (ratio close to 1): a rank-0 layer would delete the layer,
    which coala never does; the achieved fraction is then below the one asked for and ``achieved`` says so.
  * when even rank r costs at least m·n (r·(m + n) ≥ m·n, e.g. a 1 × n or 2 × 2 matrix), the matrix stays
    dense and the rank is reported as None.
  * ratio must lie strictly inside (0, 1); anything else raises ValueError naming ``ratio``.
Biases are never counted: they are kept as they are.

Allocations are a registry (``ALLOCATIONS``, ``register_allocation``): each is one function from per-layer
evidence (shapes, and when it asks for them truncation-loss curves or measured sensitivities) to ranks. The
pipeline gathers the evidence an allocation ``needs`` and the CLI reads the names from the registry.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lowrank import low_rank_params


def _check_ratio(ratio: float, arg: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{arg} must be a number in (0, 1), got {type(ratio).__name__}")
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"{arg} must be strictly between 0 and 1 (the fraction of the targeted parameters removed), got {ratio}"
        )
    return ratio


def _check_shape(m: int, n: int, where: str = "") -> None:
    for arg, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"matrix shape{f' of {where}' if where else ''}: {arg} must be a positive int, got {v!r}")


def rank_for_ratio(m: int, n: int, ratio: float) -> int | None:
    """Rank of an m × n matrix (out × in) that removes the fraction ``ratio`` of its m·n weights.

    r = max(1, int(m·n·(1 − ratio)/(m + n))); None when rank r would not save parameters
    (r·(m + n) ≥ m·n): the matrix then stays dense.

    >>> rank_for_ratio(4096, 4096, 0.2)   # int(4096·4096·0.8/8192) = 1638
    1638
    """
    _check_shape(m, n)
    ratio = _check_ratio(ratio)
    r = max(1, int(m * n * (1.0 - ratio) / (m + n)))
    if low_rank_params(m, n, r) >= m * n:
        return None
    return r


def largest_saving_rank(m: int, n: int) -> int:
    """The largest rank r of an m × n matrix whose factors cost fewer weights than the matrix, r·(m + n) < m·n
    (0 when none does): the top of every allocation's search."""
    return (m * n - 1) // (m + n)


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """The same ratio for every matrix: name → rank (None: stays dense). shapes: name → (out, in)."""
    ratio = _check_ratio(ratio)
    out: dict[str, int | None] = {}
    for name, shape in shapes.items():
        m, n = _shape(name, shape)
        out[name] = rank_for_ratio(m, n, ratio)
    return out


def ranks_for_ratios(shapes: dict[str, tuple[int, int]], ratios: dict[str, float]) -> dict[str, int | None]:
    """Per-matrix ratios (e.g. from ``svd_llm_v2_ratios``) → ranks; shapes and ratios must have the same names."""
    if set(shapes) != set(ratios):
        missing = sorted(set(shapes) ^ set(ratios))
        raise ValueError(f"shapes and ratios name different matrices: {missing[:5]}")
    out: dict[str, int | None] = {}
    for name, shape in shapes.items():
        m, n = _shape(name, shape)
        out[name] = rank_for_ratio(m, n, _check_ratio(ratios[name], f"ratio of {name}"))
    return out


def _shape(name: str, shape: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape of {name} must be (out_features, in_features), got {shape!r}")
    m, n = int(shape[0]), int(shape[1])
    _check_shape(m, n, name)
    return m, n


def svd_llm_v2_ratios(
    losses: dict[str, float], groups: dict[str, str], ratio: float, *, max_ratio: float = 0.99
) -> dict[str, float]:
    """SVD-LLM V2 heterogeneous ratios: within each group of same-type matrices, lossier ones are cut less.

    For each group g (e.g. all q_proj across layers) of N_g matrices:
        s_i = 1 / log(L_i),   ratio_i = N_g · R · s_i / Σ_{j∈g} s_j,
    where L_i is matrix i's truncation loss at the uniform ratio R (SVD-LLM V2's formula, unchanged). The
    group's mean ratio is exactly R, so its parameter budget is R when its matrices share one shape, as
    same-type matrices across layers do.

    Args:
        losses: name → truncation loss L_i (a squared Frobenius error, summed over calibration tokens
            as published). Every L_i must be finite and > 1: the formula is defined through log L_i, and for
            L_i ≤ 1 the sign of log L_i flips the ordering (a ValueError names the matrix rather than
            returning a silently inverted allocation). A group of one matrix gets R whatever its loss.
        groups: name → group key, for exactly the names of ``losses``.
        ratio: the uniform ratio R in (0, 1).
        max_ratio: ratio_i above this (possible when one s_i dominates its group) is clipped down to it; the
            removed budget is not redistributed, so the achieved fraction falls slightly below R. Ratios are
            always > 0 when every L_i > 1. Use ``achieved`` to report the real fraction.

    Returns: name → ratio_i in (0, max_ratio].
    """
    ratio = _check_ratio(ratio)
    max_ratio = _check_ratio(max_ratio, "max_ratio")
    if set(losses) != set(groups):
        diff = sorted(set(losses) ^ set(groups))
        raise ValueError(f"losses and groups name different matrices, e.g. {diff[:5]}")
    members: dict[str, list[str]] = defaultdict(list)
    for name, g in groups.items():
        members[g].append(name)
    out: dict[str, float] = {}
    for g, names in members.items():
        if len(names) == 1:
            out[names[0]] = min(ratio, max_ratio)
            continue
        s: dict[str, float] = {}
        for name in names:
            L = float(losses[name])
            if not math.isfinite(L) or L <= 1.0:
                raise ValueError(
                    f"svd-llm-v2 allocation needs truncation losses > 1 (s = 1/log L); matrix {name} of group "
                    f"{g!r} has loss {L}. Pass unnormalised losses (sum over calibration tokens), or use a "
                    "uniform allocation"
                )
            s[name] = 1.0 / math.log(L)
        total = sum(s.values())
        for name in names:
            out[name] = min(len(names) * ratio * s[name] / total, max_ratio)
    return {name: out[name] for name in losses}


def achieved(
    shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None], *, model_params: int | None = None
) -> dict:
    """Parameter accounting for the targeted matrices (biases excluded).

    Args:
        shapes: name → (out, in). ranks: name → rank, or None for a matrix kept dense (same names).
        model_params: total parameter count of the original model (optional), to report the whole-model fraction.

    Returns a dict: ``params_before`` (Σ m·n), ``params_after`` (Σ r(m+n), or m·n for dense), ``removed``,
    ``removed_fraction`` (of the targeted parameters), ``low_rank`` / ``dense`` (matrix counts), and when
    model_params is given ``model_params_before``, ``model_params_after`` and ``model_removed_fraction``.
    """
    if set(shapes) != set(ranks):
        diff = sorted(set(shapes) ^ set(ranks))
        raise ValueError(f"shapes and ranks name different matrices, e.g. {diff[:5]}")
    before = after = low = dense = 0
    for name, shape in shapes.items():
        m, n = _shape(name, shape)
        r = ranks[name]
        before += m * n
        if r is None:
            after += m * n
            dense += 1
        else:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank of {name} must be a positive int or None, got {r!r}")
            after += low_rank_params(m, n, r)
            low += 1
    report = {
        "params_before": before,
        "params_after": after,
        "removed": before - after,
        "removed_fraction": (before - after) / before if before else 0.0,
        "low_rank": low,
        "dense": dense,
    }
    if model_params is not None:
        if model_params < before:
            raise ValueError(f"model_params={model_params} is smaller than the targeted parameters ({before})")
        report["model_params_before"] = model_params
        report["model_params_after"] = model_params - (before - after)
        report["model_removed_fraction"] = (before - after) / model_params if model_params else 0.0
    return report


# ------------------------------------------------------------------------------------- budgeted minimisation
@dataclass(frozen=True)
class RankOptions:
    """The choices of one (m × n) matrix for ``lagrangian_ranks``: ``ranks[k]`` (an int, or None = dense) costs
    ``cost[k]`` (float64, the predicted damage, ≥ 0; dense should cost 0)."""

    shape: tuple[int, int]
    ranks: list[int | None]
    cost: Tensor

    @property
    def params(self) -> Tensor:
        m, n = self.shape
        return torch.tensor([m * n if r is None else low_rank_params(m, n, r) for r in self.ranks],
                            dtype=torch.float64)


def lagrangian_ranks(options: Mapping[str, RankOptions], shapes: Mapping[str, tuple[int, int]], ratio: float
                     ) -> dict[str, int | None]:
    """Ranks (None = dense) for every matrix of ``shapes`` that remove at least ``ratio`` of their parameters
    while minimising Σ cost (docs/design.md §6). Matrices without options stay dense.

    Lagrangian relaxation: for a multiplier λ every matrix takes the option minimising cost + λ·params; λ grows
    ×4 from 1e-30 until the plan fits, then 100 bisection steps find the smallest λ that fits; parameters left in
    the budget are then spent greedily on the best cost reduction per parameter (λ moves plans in steps).
    """
    ratio = _check_ratio(ratio)
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes.values())
    fixed = sum(m * n for name, (m, n) in shapes.items() if name not in options)
    table = {name: (opt.ranks, opt.cost.to(torch.float64), opt.params) for name, opt in options.items()}

    def pick(lam: float) -> tuple[dict[str, int], float]:
        index, used = {}, float(fixed)
        for name, (_, cost, params) in table.items():
            index[name] = k = int(torch.argmin(cost + lam * params))
            used += float(params[k])
        return index, used

    lo, hi = 0.0, 1e-30
    while pick(hi)[1] > budget:
        lo, hi = hi, hi * 4
        if hi > 1e300:
            raise ValueError(f"ratio {ratio} cannot be reached with the allowed ranks; lower the ratio")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pick(mid)[1] > budget else (lo, mid)
    index, used = pick(hi)
    _spend_leftover(index, table, budget - used)
    return {name: table[name][0][index[name]] if name in table else None for name in shapes}


def _spend_leftover(index: dict[str, int], table: dict, left: float) -> None:
    """Move options in place to larger ones while parameters are left, best cost reduction per parameter first."""
    while True:
        best = None
        for name, (_, cost, params) in table.items():
            k = index[name]
            extra = params - params[k]
            fits = (extra > 0) & (extra <= left)
            if fits.any():
                gains = torch.where(fits, (cost[k] - cost) / extra.clamp_min(1.0), -torch.inf)
                j = int(torch.argmax(gains))
                if best is None or float(gains[j]) > best[0]:
                    best = (float(gains[j]), name, j)
        if best is None:
            return
        _, name, j = best
        params = table[name][2]
        left -= float(params[j] - params[index[name]])
        index[name] = j


# ---------------------------------------------------------------------------------------------- the registry
@dataclass
class LayerEvidence:
    """What an allocation may know about one targeted (out × in) matrix.

    ``kind``: its name inside the block ("self_attn.q_proj"), the group of same-type matrices across blocks.
    ``tail_loss``: loss[r] for r = 0..min(out, in), the truncation loss of rank r as the method measures it
    (for COALA ‖(W − W'_r)Xᵀ‖²_F; float64, on the CPU), from one decomposition of the original weight.
    ``sensitivity``: a ``coala.sensitivity.SensitivityCurve`` (measured output change when truncated alone).
    ``fisher``: curve[r] for r = 0..k (k the largest rank that saves parameters), the loss increase predicted for
    truncating the layer alone to rank r, from per-sample gradients of one backward pass (``coala.fisher``; float64).
    Each is filled only when the allocation declares it ``needs`` it.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    tail_loss: Tensor | None = None
    sensitivity: Any = None
    fisher: Tensor | None = None


AllocateFn = Callable[[Mapping[str, LayerEvidence], float], dict[str, "int | None"]]
EVIDENCE = ("tail_loss", "sensitivity", "fisher")


@dataclass(frozen=True)
class Allocation:
    """A rank allocation: ``allocate(evidence, ratio) -> {name: rank or None (dense)}`` removing ``ratio`` of the
    targeted parameters, and the evidence it ``needs`` beyond the shapes (a subset of ``EVIDENCE``)."""

    name: str
    allocate: AllocateFn
    needs: frozenset[str] = frozenset()


ALLOCATIONS: dict[str, Allocation] = {}


def register_allocation(name: str, *, needs: Iterable[str] = ()) -> Callable[[AllocateFn], AllocateFn]:
    """Decorator: make ``fn(evidence, ratio) -> plan`` available as ``CompressConfig(allocation=name)`` and
    ``coala compress --allocation NAME``. ``needs``: evidence to gather first (a subset of ``EVIDENCE``)."""
    needs = frozenset(needs)
    if needs - set(EVIDENCE):
        raise ValueError(f"allocation {name!r}: unknown evidence {sorted(needs - set(EVIDENCE))}; choose from "
                         f"{EVIDENCE}")

    def register(fn: AllocateFn) -> AllocateFn:
        if name in ALLOCATIONS or name == "auto":
            raise ValueError(f"allocation {name!r} is already registered")
        ALLOCATIONS[name] = Allocation(name, fn, needs)
        return fn

    return register


def allocation_names() -> list[str]:
    return sorted(ALLOCATIONS)


def get_allocation(name: str) -> Allocation:
    if name not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {name!r}; choose from {allocation_names()}")
    return ALLOCATIONS[name]


@register_allocation("uniform")
def uniform_allocation(evidence: Mapping[str, LayerEvidence], ratio: float) -> dict[str, int | None]:
    """The same ratio for every matrix (docs/design.md §6)."""
    return uniform_ranks({name: e.shape for name, e in evidence.items()}, ratio)


@register_allocation("svd-llm-v2", needs=("tail_loss",))
def svd_llm_v2_allocation(evidence: Mapping[str, LayerEvidence], ratio: float) -> dict[str, int | None]:
    """SVD-LLM V2's per-group ratios from each matrix's truncation loss at the uniform rank
    (``svd_llm_v2_ratios``); a matrix that the uniform ratio leaves dense stays dense."""
    uniform = uniform_allocation(evidence, ratio)
    cut = [name for name in evidence if uniform[name] is not None]
    losses = {name: float(evidence[name].tail_loss[uniform[name]]) for name in cut}
    ratios = svd_llm_v2_ratios(losses, {name: evidence[name].kind for name in cut}, ratio)
    ranks = ranks_for_ratios({name: evidence[name].shape for name in cut}, ratios)
    return {name: ranks.get(name) for name in evidence}
