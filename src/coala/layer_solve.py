"""Per-layer work shared by every pipeline: decompose, measure the evidence a rank allocation needs, solve and
swap a set of layers, restore saved layers on resume.

Precision: every solve runs in float32 (float64 when the weight and the statistics are float64) whatever the
model's dtype; factors are cast back to the layer's dtype. The reported errors are computed in the
statistics' dtype from the R factor and summed in float64; truncation losses are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import sensitivity
from .allocate import LayerEvidence, largest_saving_rank
from .capture import InputCapture
from .compress_report import LayerReport
from .config import CompressConfig
from .linalg.decomposition import Decomposition
from .linalg.methods import decompose
from .linalg.parallel import parallel_map, worker_count
from .linalg.stats import ActivationStats
from .lowrank import dense_bias, dense_weight, install_low_rank, linear_shape

StatsSource = InputCapture | Mapping[str, ActivationStats] | None


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


def forced_ranks(shapes: Mapping[str, tuple[int, int]], rank: int | str) -> dict[str, int]:
    """One rank for every matrix ("full" = min(out, in)); ValueError naming a layer the rank does not fit."""
    plan: dict[str, int] = {}
    for name, (m, n) in shapes.items():
        r = min(m, n) if rank == "full" else int(rank)
        if r > min(m, n):
            raise ValueError(f"rank {r} exceeds min(out, in) = {min(m, n)} of layer {name} ({m} x {n})")
        plan[name] = r
    return plan


def stats_for(source: StatsSource, name: str) -> ActivationStats | None:
    """The statistics of layer ``name`` from a capture or a name → stats mapping (None when there are none)."""
    if source is None:
        return None
    if isinstance(source, InputCapture):
        return source.stats_for(name)
    if name not in source:
        raise KeyError(f"no statistics for layer {name}")
    return source[name]


def weight_and_stats(module: nn.Module, stats: ActivationStats | None, device: torch.device | None = None
                     ) -> tuple[Tensor, ActivationStats | None]:
    """The layer's (out × in) weight (detached) and its statistics, both moved to ``device`` when it is given and
    differs from the weight's."""
    W = dense_weight(module).detach()
    if device is not None and W.device != device:
        return W.to(device), (stats.to(device) if stats is not None else None)
    return W, stats


def is_paired(W: Tensor, stats: ActivationStats | None) -> bool:
    """Whether ``stats`` are the paired statistics of propagate="corrected": rows [x̃, target], twice W's width."""
    return stats is not None and stats.r is not None and stats.in_features == 2 * W.shape[-1]


def decompose_weight(W: Tensor, stats: ActivationStats | None, config: CompressConfig, name: str) -> Decomposition:
    """One decomposition of W (out × in) with ``config``'s method and μ (the error-correcting COALA solve on paired
    statistics)."""
    return decompose(W, stats, method=config.method, mu=config.mu, adaptive_mu=config.adaptive_mu, name=name,
                     paired=is_paired(W, stats))


def decompose_layer(module: nn.Module, stats: ActivationStats | None, config: CompressConfig, name: str,
                    device: torch.device | None = None) -> Decomposition:
    """One decomposition of the layer's (out × in) weight with ``config``'s method and μ (on ``device``)."""
    return decompose_weight(*weight_and_stats(module, stats, device), config, name)


def fold_bases(module: nn.Module, stats: ActivationStats | None, config: CompressConfig, name: str,
               device: torch.device | None = None) -> tuple[Tensor, Tensor] | None:
    """``config``'s method fitted on each of the two folds of the calibration samples: its left bases (U_0, U_1),
    each out × k_f in the weight's dtype on the CPU (what the Fisher pass scores, ``coala.fisher``). k_f ≤ k, the
    largest rank that saves parameters; fewer when the fold's fit has fewer directions of nonzero singular value
    (e.g. fewer rows than k, ``Decomposition.basis``). None when no rank saves parameters. The statistics must hold
    their folds (``folds=2``); when every sample fell into one fold (a handful of samples) both are the fit on all
    of them."""
    k = largest_saving_rank(*linear_shape(module))
    if k < 1:
        return None
    if stats is None or stats.folds is None:
        raise ValueError(f"layer {name}: the Fisher allocation needs statistics kept in folds of the calibration "
                         "samples (collect them with folds=2)")
    if len(stats.folds) != 2:
        raise ValueError(f"layer {name}: the Fisher allocation fits two folds, the statistics hold {len(stats.folds)}")
    W, stats = weight_and_stats(module, stats, device)
    Wc = W.to(stats.dtype)

    def basis(part: ActivationStats) -> Tensor:
        return decompose_weight(Wc, part, config, name).basis()[:, :k].to("cpu", W.dtype)

    if any(part.num_rows == 0 for part in stats.folds):
        only = basis(stats)
        return only, only
    first, second = stats.folds
    return basis(first), basis(second)


def fold_bases_of(layers: Mapping[str, nn.Module], source: StatsSource, config: CompressConfig,
                  device: torch.device | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``fold_bases`` of every layer of ``layers`` (full name → module) that has a rank saving parameters, side by
    side on the CPU's workers."""
    names = list(layers)
    found = parallel_map(lambda n: fold_bases(layers[n], stats_for(source, n), config, n, device), names,
                         workers=worker_count(device))
    return {name: pair for name, pair in zip(names, found, strict=True) if pair is not None}


def new_evidence(shapes: Mapping[str, tuple[int, int]], prefix: str | None = None) -> dict[str, LayerEvidence]:
    return {name: LayerEvidence(name, layer_kind(name, prefix), shape) for name, shape in shapes.items()}


def add_evidence(evidence: dict[str, LayerEvidence], decompositions: Mapping[str, Decomposition],
                 needs: frozenset[str], *, model: nn.Module | None = None,
                 layers: Mapping[str, nn.Module] | None = None, probe: sensitivity.Probe | None = None) -> None:
    """Fill ``evidence`` for the layers of ``decompositions`` (from the ORIGINAL weights): truncation-loss curves,
    and with "sensitivity" in ``needs`` each layer of ``layers`` truncated alone in ``model`` (where it lives)."""
    if "tail_loss" in needs or "sensitivity" in needs:
        for name, dec in decompositions.items():
            evidence[name].tail_loss = dec.truncation_loss().cpu()
    if "sensitivity" in needs:
        curves = sensitivity.measure(model, {n: layers[n] for n in decompositions}, decompositions, probe.batches,
                                     probe.reference, probe.ratios)
        for name, curve in curves.items():
            evidence[name].sensitivity = curve


def weighted_error(W: Tensor, A: Tensor, B: Tensor, stats: ActivationStats | None) -> tuple[float | None, float | None]:
    """(‖(W − AB)Rᵀ‖²_F, ‖(W − AB)Rᵀ‖_F / ‖WRᵀ‖_F) with R the statistics' R factor; (None, None) without R."""
    if stats is None or stats.r is None:
        return None, None
    R = stats.r.R
    Wc = W.to(device=R.device, dtype=R.dtype)
    if is_paired(W, stats):  # ‖W Yᵀ − AB X̃ᵀ‖ = ‖W S[:, n:]ᵀ − AB S[:, :n]ᵀ‖ with S the R factor of [X̃, Y]
        n = W.shape[1]
        target = Wc @ R[:, n:].T
        diff = target - A.to(Wc) @ (B.to(Wc) @ R[:, :n].T)
        loss, base = float(diff.to(torch.float64).square().sum()), float(target.to(torch.float64).square().sum())
        return loss, (math.sqrt(loss / base) if base > 0 else 0.0)
    WR = Wc @ R.T  # (W − AB)Rᵀ = WRᵀ − A(BRᵀ): 2n²(m + r) + 2mrn flops instead of 4mn² + 2mrn, same rounding level
    diff = WR - A.to(Wc) @ (B.to(Wc) @ R.T)
    loss = float(diff.to(torch.float64).square().sum())
    base = float(WR.to(torch.float64).square().sum())
    return loss, (math.sqrt(loss / base) if base > 0 else 0.0)


def solve_layers(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    source: StatsSource,
    plan: Mapping[str, int | None],
    config: CompressConfig,
    *,
    device: torch.device | str | None = None,
    decompositions: Mapping[str, Decomposition] | None = None,
    progress: bool = True,
) -> tuple[list[LayerReport], dict[str, Tensor]]:
    """Solve every layer of ``layers`` (full name → module of ``model``) at its planned rank and swap in a
    ``LowRankLinear`` (rank None: the layer stays dense). Solves run on ``device`` (default: where the layer is).

    ``decompositions``: ready ones by layer name (of the uncompressed weights), used instead of solving again.
    Returns the report rows and the new layers' tensors (``name.down.weight``, ``name.up.weight``,
    ``name.up.bias``), which are what a block checkpoint stores.
    """
    rows: list[LayerReport] = []
    state: dict[str, Tensor] = {}
    device = torch.device(device) if device is not None else None
    todo = [name for name in layers if plan[name] is not None and name not in (decompositions or {})]
    if len(todo) > 1 and worker_count() > 1:  # side by side, one thread each (docs/design.md §11); holds the block's
        # decompositions at once (one at a time with a single thread)
        fresh = parallel_map(lambda name: decompose_weight(*weight_and_stats(layers[name], stats_for(source, name),
                                                                             device), config, name), todo)
        decompositions = {**(decompositions or {}), **dict(zip(todo, fresh, strict=True))}
    for name, module in tqdm(layers.items(), desc="solve", disable=not progress, leave=False):
        m, n = linear_shape(module)
        rank = plan[name]
        if rank is None:
            rows.append(LayerReport(name, layer_kind(name), m, n, None, m * n, m * n, 0.0, 0.0, None))
            continue
        W, stats = weight_and_stats(module, stats_for(source, name), device)
        dec = (decompositions or {}).get(name)
        if dec is None:
            dec = decompose_weight(W, stats, config, name)
        A, B = dec.factors(rank)
        loss, rel = weighted_error(W, A, B, stats)
        mu = dec.effective_mu(rank) if hasattr(dec, "effective_mu") else None
        new = install_low_rank(model, name, A, B, dense_bias(module))
        state.update({f"{name}.{k}": v for k, v in new.state_dict().items()})
        rows.append(LayerReport(name, layer_kind(name), m, n, rank, m * n, rank * (m + n), loss, rel, mu))
    return rows, state


def restore_layers(model: nn.Module, state: Mapping[str, Tensor], rows: list[dict]) -> None:
    """Swap in the low-rank layers of a finished block from its checkpoint (exactly the tensors it produced)."""
    for row in rows:
        if row["rank"] is not None:
            name = row["name"]
            install_low_rank(model, name, state[f"{name}.up.weight"], state[f"{name}.down.weight"],
                             state.get(f"{name}.up.bias"))
