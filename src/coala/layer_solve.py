"""Per-layer work of ``coala.compress``: rank plans, the solve + swap of one block's layers, restore on resume.

Precision: every solve runs in float32 (float64 when the weight and the statistics are float64) whatever the
model's dtype; factors are cast back to the layer's dtype. The reported errors are computed in the
statistics' dtype from the R factor and summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .allocate import ranks_for_ratios, svd_llm_v2_ratios, uniform_ranks
from .capture import InputCapture
from .compress_report import LayerReport
from .linalg.decomposition import Decomposition
from .linalg.methods import decompose, get_method
from .linalg.stats import ActivationStats
from .lowrank import LowRankLinear, dense_bias, dense_weight, linear_shape, replace_module


def layer_kind(name: str, prefix: str | None = None) -> str:
    """The layer's name inside its block ("model.layers.3.self_attn.q_proj" → "self_attn.q_proj"): the
    group of same-type matrices across blocks (SVD-LLM V2's allocation groups)."""
    if prefix and name.startswith(prefix + "."):
        rest = name[len(prefix) + 1 :]
        return rest.split(".", 1)[1] if "." in rest else rest
    parts = name.split(".")
    for j, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[j + 1 :])
    return name


def plan_ranks(shapes: dict[str, tuple[int, int]], config) -> dict[str, int | None]:
    """name → rank (None = stays dense): ``config.rank`` for all ("full" = min(out, in)), else the uniform ratio."""
    if config.rank is None:
        return uniform_ranks(shapes, float(config.ratio))
    plan: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        r = min(m, n) if config.rank == "full" else int(config.rank)
        if r > min(m, n):
            raise ValueError(f"rank {r} exceeds min(out, in) = {min(m, n)} of layer {name} ({m} x {n})")
        plan[name] = r
    return plan


def _stats_for(source, name: str) -> ActivationStats | None:
    if source is None:
        return None
    if isinstance(source, InputCapture):
        return source.stats_for(name)
    if name not in source:
        raise KeyError(f"no statistics for layer {name}")
    return source[name]


def _v2_loss(W: Tensor, stats: ActivationStats, rank: int, name: str, dec: Decomposition | None = None) -> float:
    """SVD-LLM V2's theoretical truncation loss at ``rank``: Σ_{i ≥ rank} σ_i² of the whitened W."""
    if dec is None:
        dec = decompose(W, stats, method="svd-llm-v2", name=name)
    return float(dec.S[rank:].to(torch.float64).square().sum())


def _v2_from_losses(losses: dict[str, float], uniform: dict[str, int | None], shapes, prefix, ratio):
    groups = {name: layer_kind(name, prefix) for name in losses}
    ratios = svd_llm_v2_ratios(losses, groups, ratio)
    ranks = ranks_for_ratios({n: shapes[n] for n in losses}, ratios)
    return {name: (ranks[name] if name in ranks else None) for name in uniform}


def v2_plan(walker, shapes: dict[str, tuple[int, int]], config, dtype: torch.dtype) -> tuple[dict, float]:
    """Probe pass for svd-llm-v2 (original propagation, Gram statistics only): each matrix's truncation loss at
    the uniform ratio, then SVD-LLM V2's per-group ratios → ranks. Returns (plan, seconds spent solving)."""
    import time

    uniform = uniform_ranks(shapes, float(config.ratio))
    losses: dict[str, float] = {}
    solve_s = 0.0
    walker.catch()
    last = len(walker) - 1
    for i in tqdm(range(len(walker)), desc="svd-llm-v2 probe", disable=not config.progress):
        with walker.on_device(i):
            cap = walker.statistics(i, {"gram"}, dtype=dtype, write=i < last)
            t0 = time.perf_counter()
            for name, module in walker.layers[i].items():
                if uniform[name] is not None:
                    losses[name] = _v2_loss(dense_weight(module).detach(), cap.stats_for(name), uniform[name], name)
            solve_s += time.perf_counter() - t0
    return _v2_from_losses(losses, uniform, shapes, walker.prefix, float(config.ratio)), solve_s


def v2_plan_from_stats(layers: dict[str, nn.Module], stats: Mapping[str, ActivationStats], config,
                       decompositions: Mapping[str, Decomposition] | None = None) -> dict:
    """The svd-llm-v2 plan from statistics already collected (``collect_statistics``)."""
    shapes = {name: linear_shape(m) for name, m in layers.items()}
    uniform = uniform_ranks(shapes, float(config.ratio))
    decs = decompositions or {}
    losses = {name: _v2_loss(dense_weight(m).detach(), stats[name], uniform[name], name, decs.get(name))
              for name, m in layers.items() if uniform[name] is not None}
    return _v2_from_losses(losses, uniform, shapes, None, float(config.ratio))


def sensitivity_plan(walker, shapes: dict[str, tuple[int, int]], config, dtype: torch.dtype) -> tuple[dict, float]:
    """Probe pass for ``allocation="sensitivity"`` (original propagation, ``coala.sensitivity``): block by block,
    the method's statistics and one decomposition per layer; then each layer truncated alone at the probe
    ratios while the whole model (where it lives) runs ``config.sensitivity_samples`` calibration samples.
    Returns (plan, seconds spent outside the walker's calibration passes, which ``walker.calib_seconds`` counts)."""
    import time

    from . import sensitivity

    t0, calib0 = time.perf_counter(), walker.calib_seconds
    probe = sensitivity.first_samples(walker.batches, config.sensitivity_samples)
    reference = sensitivity.outputs(walker.model, probe)
    kinds = set(get_method(config.method).needs)
    curves: dict[str, sensitivity.SensitivityCurve] = {}
    walker.catch()
    last = len(walker) - 1
    for i in tqdm(range(len(walker)), desc="sensitivity probes", disable=not config.progress):
        with walker.on_device(i):
            cap = walker.statistics(i, kinds, dtype=dtype, write=i < last) if kinds else None
            decs = {name: decompose(dense_weight(module).detach(), _stats_for(cap, name), method=config.method,
                                    mu=config.mu, adaptive_mu=config.adaptive_mu, name=name)
                    for name, module in walker.layers[i].items()}
            del cap
        curves.update(sensitivity.measure(walker.model, walker.layers[i], decs, probe, reference,
                                          config.probe_ratios))
    plan = sensitivity.allocate(curves, float(config.ratio), shapes)
    return plan, time.perf_counter() - t0 - (walker.calib_seconds - calib0)


def weighted_error(W: Tensor, A: Tensor, B: Tensor, stats: ActivationStats | None) -> tuple[float | None, float | None]:
    """(‖(W − AB)Rᵀ‖²_F, ‖(W − AB)Rᵀ‖_F / ‖WRᵀ‖_F) with R the statistics' R factor; (None, None) without R."""
    if stats is None or stats.r is None:
        return None, None
    R = stats.r.R
    Wc = W.to(device=R.device, dtype=R.dtype)
    diff = (Wc - A.to(Wc) @ B.to(Wc)) @ R.T
    loss = float(diff.to(torch.float64).square().sum())
    base = float((Wc @ R.T).to(torch.float64).square().sum())
    return loss, (math.sqrt(loss / base) if base > 0 else 0.0)


def solve_layers(
    model: nn.Module,
    layers: dict[str, nn.Module],
    source: InputCapture | Mapping[str, ActivationStats] | None,
    plan: dict[str, int | None],
    config,
    decompositions: Mapping[str, Decomposition] | None = None,
) -> tuple[list[LayerReport], dict[str, Tensor]]:
    """Solve and swap every layer of ``layers`` (full name → module) in place.

    ``decompositions``: ready ``Decomposition`` objects by layer name (from ``decompose_layers``) that are
    used instead of solving again. Returns the report rows and the new layers' tensors (``name.down.weight``,
    ``name.up.weight``, ``name.up.bias``), which are what a block checkpoint stores.
    """
    rows: list[LayerReport] = []
    state: dict[str, Tensor] = {}
    device = torch.device(config.device) if config.device is not None else None
    for name, module in tqdm(layers.items(), desc="solve", disable=not config.progress, leave=False):
        W = dense_weight(module).detach()
        m, n = W.shape
        rank, kind = plan[name], layer_kind(name)
        if rank is None:
            rows.append(LayerReport(name, kind, m, n, None, m * n, m * n, 0.0, 0.0, None))
            continue
        stats = _stats_for(source, name)
        if device is not None and W.device != device:
            from .calibrate import stats_to

            W = W.to(device)
            stats = stats_to(stats, device) if stats is not None else None
        dec = (decompositions or {}).get(name)
        if dec is None:
            dec = decompose(W, stats, method=config.method, mu=config.mu, adaptive_mu=config.adaptive_mu,
                            name=name)
        A, B = dec.factors(rank)
        loss, rel = weighted_error(W, A, B, stats)
        mu = dec.effective_mu(rank) if hasattr(dec, "effective_mu") else None
        bias = dense_bias(module)
        home = dense_weight(module).device
        new = LowRankLinear.from_factors(
            A.to(W.dtype), B.to(W.dtype), None if bias is None else bias.detach(), dtype=W.dtype
        ).to(home)
        replace_module(model, name, new)
        state.update({f"{name}.{k}": v for k, v in new.state_dict().items()})
        rows.append(LayerReport(name, kind, m, n, rank, m * n, rank * (m + n), loss, rel, mu))
    return rows, state


def restore_block(model: nn.Module, state: dict[str, Tensor], meta: dict) -> None:
    """Swap in the low-rank layers of a finished block from its checkpoint (exactly the tensors it produced)."""
    for row in meta["layers"]:
        if row["rank"] is None:
            continue
        name = row["name"]
        old = model.get_submodule(name)
        new = LowRankLinear.from_factors(state[f"{name}.up.weight"], state[f"{name}.down.weight"],
                                         state.get(f"{name}.up.bias"))
        replace_module(model, name, new.to(dense_weight(old).device))
