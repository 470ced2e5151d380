"""Exact reduction of streaming statistics over the ranks (docs/design.md §12): R factors up a binomial TSQR tree,
Gram matrices and Σ |x| by ``all_reduce`` in their accumulation dtypes, row counts as int64."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
    of them, in the same order on every rank (a mismatch is a DistributedError). R factors merge up binomial
    TSQR trees (R ← R([R_a; R_b]), never a Gram matrix; the trees of several factors have different roots, so
    their merges run on different ranks at once; each root broadcasts its result, so every rank holds the same
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
        factors = [p for p in parts if isinstance(p, RFactor)]
        merged = _tree_reduce([f.R.to(dev, copy=True) for f in factors], group)
        for f, R in zip(factors, merged, strict=True):
            f.load_state_dict({"R": R, "num_rows": f.num_rows, "in_features": f.in_features})
        for p, total in zip(parts, counts.tolist(), strict=True):
            if isinstance(p, GramAccumulator):
                G = p.G.to(dev, copy=True)
                dist.all_reduce(G, group=group)
                p.G = G.to(p.G.device)
            elif isinstance(p, AbsMeanAccumulator):
                S = p.total.to(dev, copy=True)
                dist.all_reduce(S, group=group)
                p.total = S.to(p.total.device)
            p.num_rows = total
    return stats


def balance(costs: Sequence[float], ranks: int, loads: Sequence[float] | None = None) -> list[int]:
    """The rank of each item: largest cost first, each to the least loaded rank (lowest rank on ties) — the
    greedy LPT schedule, the same on every rank. ``loads``: work the ranks already have (default none). With at
    least as many items as ranks and no prior loads, every rank gets one."""
    loads = [0.0] * ranks if loads is None else [float(x) for x in loads]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def merge_roots(widths: Sequence[int], ranks: int) -> list[int]:
    """The root of each R factor's tree (by width n, in the order reduced): ``balance`` by n³, the merge cost."""
    return balance([float(n) ** 3 for n in widths], ranks)


def merge_loads(stats: Iterable[Stat], ranks: int) -> list[float]:
    """Σ n³ of the R factors each rank roots when ``all_reduce_(stats)`` runs (its merges in a 2-rank tree)."""
    widths = [p.in_features for s in stats for p in _parts(s) if isinstance(p, RFactor)]
    loads = [0.0] * ranks
    for n, root in zip(widths, merge_roots(widths, ranks), strict=True):
        loads[root] += float(n) ** 3
    return loads


def _tree_reduce(Rs: list[Tensor], group=None) -> list[Tensor]:
    """The merged R of every rank's factor, for each factor of ``Rs`` (the same list on every rank).

    Each factor has its own root (``balance`` by n³: the merges of different factors run on different ranks at
    once) and its own binomial tree: in round k, the rank at distance d from the root (d = (rank − root) mod N)
    sends to d − 2ᵏ and stops when bit k of d is set, else receives from d + 2ᵏ (when there is one) and merges
    R ← R([R; R_other]). A round's sends and receives go out together (``batch_isend_irecv``: no ordering
    deadlock, NCCL included). Finally each root broadcasts its result: every rank holds the same bits. A rank
    holds at most its own factors and one received factor per factor it merges."""
    n, me = world_size(group), rank(group)
    roots = merge_roots([int(R.shape[0]) for R in Rs], n)
    out, active, step = list(Rs), [True] * len(Rs), 1
    while step < n:
        ops, received = [], []
        for i, R in enumerate(out):
            d = (me - roots[i]) % n
            if not active[i]:
                continue
            if d & step:
                ops.append(dist.P2POp(dist.isend, R, global_rank(group, (roots[i] + d - step) % n), group, tag=i))
                active[i] = False
            elif d + step < n:
                buf = torch.empty_like(R)
                ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, (roots[i] + d + step) % n), group, tag=i))
                received.append((i, buf))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for i, buf in received:
            out[i] = r_of_stacked(out[i], buf)
        step <<= 1
    for i, R in enumerate(out):
        dist.broadcast(R, global_rank(group, roots[i]), group=group)
    return out
