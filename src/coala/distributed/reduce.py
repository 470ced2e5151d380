"""Exact reduction of streaming statistics over the ranks (docs/design.md §11): R factors up a binomial TSQR tree,
Gram matrices and Σ |x| by ``all_reduce`` in their accumulation dtypes, row counts as int64."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import CoalaError
from ..linalg.qr_update import r_of_stacked
from ..linalg.stats import AbsMeanAccumulator, ActivationStats, GramAccumulator
from ..linalg.tsqr import RFactor
from .session import DistributedError, comm_device, global_rank, is_distributed, phase, rank, world_size
from .transport import gather_json

Stat = ActivationStats | RFactor | GramAccumulator | AbsMeanAccumulator


_KINDS = (ActivationStats, RFactor, GramAccumulator, AbsMeanAccumulator)


def _parts(stat: Stat) -> list:
    if isinstance(stat, ActivationStats):
        return [stat, *(a for a in (stat.r, stat.gram, stat.absmean) if a is not None)]
    if isinstance(stat, _KINDS):
        return [stat]
    raise CoalaError(f"all_reduce_ takes ActivationStats, RFactor, GramAccumulator or AbsMeanAccumulator "
                     f"objects, got {type(stat).__name__}", argument="stats")


def _signature(acc) -> list:
    if isinstance(acc, RFactor):
        return ["r", acc.in_features, str(acc.dtype)]
    if isinstance(acc, GramAccumulator):
        return ["gram", acc.in_features, str(acc.G.dtype)]
    if isinstance(acc, AbsMeanAccumulator):
        return ["absmean", acc.in_features]
    return ["stats", acc.in_features, sorted(acc.kinds)]


def all_reduce_(stats: Stat | Iterable[Stat], group=None, *, what: str = "statistics") -> Stat | Iterable[Stat]:
    """In place, on every rank: each statistic becomes that of the rows of all ranks (in one process: nothing).

    ``stats``: one ``ActivationStats`` / ``RFactor`` / ``GramAccumulator`` / ``AbsMeanAccumulator`` or a sequence
    of them, in the same order on every rank (a mismatch is a DistributedError). R factors merge up a binomial
    TSQR tree (R ← R([R_a; R_b]), never a Gram matrix; rank 0's result is broadcast, so every rank holds the same
    bits), Gram matrices and Σ |x| are summed by ``all_reduce``, row counts as int64. Returns ``stats``.
    """
    items = [stats] if isinstance(stats, _KINDS) else list(stats)
    parts = [p for s in items for p in _parts(s)]
    if not is_distributed(group):
        return stats
    for p in parts:  # pending rows folded in, overflow reported, before any rank enters a collective
        if isinstance(p, RFactor):
            _ = p.R
    dev = comm_device(group)
    with phase(what, group):  # one check-in for the whole reduction
        signatures = gather_json([_signature(p) for p in parts], what=f"{what}: layout", group=group)
        for r, sig in enumerate(signatures):
            if sig != signatures[0]:
                raise DistributedError(f"rank {r} holds other statistics than rank 0 in '{what}' ({len(sig)} vs "
                                       f"{len(signatures[0])} accumulators): the ranks run different models or "
                                       "settings", ranks=[r], shared=True)
        counts = torch.tensor([p.num_rows for p in parts], dtype=torch.int64, device=dev)
        dist.all_reduce(counts, group=group)
        for p, total in zip(parts, counts.tolist(), strict=True):
            if isinstance(p, RFactor):
                merged = _tree_reduce_r(p.R.to(dev, copy=True), group)
                p.load_state_dict({"R": merged, "num_rows": total, "in_features": p.in_features})
            elif isinstance(p, GramAccumulator):
                G = p.G.to(dev, copy=True)
                dist.all_reduce(G, group=group)
                p.G = G.to(p.G.device)
            elif isinstance(p, AbsMeanAccumulator):
                S = p.total.to(dev, copy=True)
                dist.all_reduce(S, group=group)
                p.total = S.to(p.total.device)
            p.num_rows = total
    return stats


def _tree_reduce_r(R: Tensor, group=None) -> Tensor:
    """The merged R of every rank's R (binomial tree to rank 0, then broadcast): round k, rank i receives from
    i + 2ᵏ when i is a multiple of 2ᵏ⁺¹, else sends to i − 2ᵏ and stops."""
    me, n, step = rank(group), world_size(group), 1
    while step < n:
        if me & step:
            dist.send(R, global_rank(group, me - step), group=group)
            break
        if me + step < n:
            other = torch.empty_like(R)
            dist.recv(other, global_rank(group, me + step), group=group)
            R = r_of_stacked(R, other)
        step <<= 1
    dist.broadcast(R, global_rank(group, 0), group=group)
    return R
