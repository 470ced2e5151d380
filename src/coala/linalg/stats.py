"""Activation statistics that stream: R factor (COALA), Gram matrix (SVD-LLM), mean |x| (ASVD).

``ActivationStats`` bundles whichever of them a set of methods needs, so one calibration pass serves
several methods. Precision: the Gram is a raw fp32 sum (as SVD-LLM publishes; float64 when asked);
mean |x| sums in float64; the R factor as in ``RFactor``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .checks import flatten_rows
from .tsqr import RFactor

STAT_KINDS = ("r", "gram", "absmean")


class GramAccumulator:
    """Raw sum G = Σ xᵀx over all rows (n × n), in ``dtype`` (float32 by default, as SVD-LLM)."""

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device=None, name=None):
        self.in_features, self.name = in_features, name
        self.G = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.num_rows = 0

    def update(self, x: Tensor, mask: Tensor | None = None) -> GramAccumulator:
        return self.add_rows(flatten_rows(x, self.in_features, mask, where=self.name))

    def add_rows(self, rows: Tensor) -> GramAccumulator:
        r = rows.to(device=self.G.device, dtype=self.G.dtype)
        self.G.addmm_(r.T, r)
        self.num_rows += rows.shape[0]
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        self.G += other.G.to(self.G)
        self.num_rows += other.num_rows
        return self

    def state_dict(self) -> dict:
        return {"G": self.G.clone(), "num_rows": int(self.num_rows)}

    def load_state_dict(self, state: dict) -> GramAccumulator:
        self.G = state["G"].to(self.G)
        self.num_rows = int(state["num_rows"])
        return self


class AbsMeanAccumulator:
    """Per-column mean of |x| over all rows (n,), summed in float64."""

    def __init__(self, in_features: int, *, device=None, name=None):
        self.in_features, self.name = in_features, name
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.num_rows = 0

    def update(self, x: Tensor, mask: Tensor | None = None) -> AbsMeanAccumulator:
        return self.add_rows(flatten_rows(x, self.in_features, mask, where=self.name))

    def add_rows(self, rows: Tensor) -> AbsMeanAccumulator:
        self.total += rows.to(device=self.total.device, dtype=torch.float64).abs().sum(0)
        self.num_rows += rows.shape[0]
        return self

    def merge(self, other: AbsMeanAccumulator) -> AbsMeanAccumulator:
        self.total += other.total.to(self.total)
        self.num_rows += other.num_rows
        return self

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.num_rows, 1)

    def state_dict(self) -> dict:
        return {"total": self.total.clone(), "num_rows": int(self.num_rows)}

    def load_state_dict(self, state: dict) -> AbsMeanAccumulator:
        self.total = state["total"].to(self.total)
        self.num_rows = int(state["num_rows"])
        return self


class ActivationStats:
    """The statistics of one input stream that a set of methods needs, filled in one pass.

    Args:
        in_features: n.
        kinds: any of "r", "gram", "absmean".
        dtype: accumulation dtype of R and G (float32 or float64).
    """

    def __init__(
        self,
        in_features: int,
        kinds: Iterable[str] = ("r",),
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
        name: str | None = None,
    ) -> None:
        kinds = set(kinds)
        unknown = kinds - set(STAT_KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STAT_KINDS}")
        self.in_features, self.name, self.dtype, self.device = in_features, name, dtype, device
        self.r = RFactor(in_features, dtype=dtype, device=device, name=name) if "r" in kinds else None
        self.gram = GramAccumulator(in_features, dtype=dtype, device=device, name=name) if "gram" in kinds else None
        self.absmean = AbsMeanAccumulator(in_features, device=device, name=name) if "absmean" in kinds else None
        self.num_rows = 0
        self.folds: list[ActivationStats] | None = None  # the disjoint parts this was merged from (``of_folds``)

    @classmethod
    def of_folds(cls, folds: list[ActivationStats]) -> ActivationStats:
        """The statistics of all rows of ``folds`` (disjoint parts of one stream, e.g. alternate calibration
        samples), merged exactly into a new object (the parts are not changed) that keeps them as ``folds`` for
        fits on each fold (the Fisher allocation, ``coala.fisher``)."""
        first = folds[0]
        out = cls(first.in_features, first.kinds, dtype=first.dtype, device=first.device, name=first.name)
        for part in folds:
            out.merge(part)
        out.folds = list(folds)
        return out

    @property
    def kinds(self) -> set[str]:
        return {k for k in STAT_KINDS if getattr(self, k) is not None}

    def update(self, x: Tensor, mask: Tensor | None = None) -> ActivationStats:
        rows = flatten_rows(x, self.in_features, mask, where=self.name)
        for acc in self._parts():
            acc.add_rows(rows)
        self.num_rows += rows.shape[0]
        return self

    def merge(self, other: ActivationStats) -> ActivationStats:
        if other.kinds != self.kinds:
            raise ValueError(f"cannot merge statistics {sorted(other.kinds)} into {sorted(self.kinds)}")
        for mine, theirs in zip(self._parts(), other._parts(), strict=True):
            mine.merge(theirs)
        self.num_rows += other.num_rows
        return self

    def to(self, device: torch.device | str) -> ActivationStats:
        """A copy on ``device`` in the same accumulation dtype (pending rows of an R factor are folded in first)."""
        out = ActivationStats(self.in_features, self.kinds, dtype=self.dtype, device=device, name=self.name)
        out.load_state_dict(self.state_dict())
        out.folds = [part.to(device) for part in self.folds] if self.folds is not None else None
        return out

    def _parts(self) -> list:
        return [acc for acc in (self.r, self.gram, self.absmean) if acc is not None]

    def state_dict(self) -> dict:
        out: dict = {"num_rows": int(self.num_rows), "in_features": self.in_features}
        for k in STAT_KINDS:
            acc = getattr(self, k)
            if acc is not None:
                out[k] = acc.state_dict()
        return out

    def load_state_dict(self, state: dict) -> ActivationStats:
        for k in self.kinds:
            getattr(self, k).load_state_dict(state[k])
        self.num_rows = int(state["num_rows"])
        return self


def stats_from_rows(rows: Tensor, kinds: Iterable[str], dtype: torch.dtype) -> ActivationStats:
    """Exact statistics of an in-memory (N × n) activation matrix, in ``dtype``."""
    stats = ActivationStats(rows.shape[1], kinds, dtype=dtype, device=rows.device)
    if stats.r is not None:
        stats.r.block_rows = max(rows.shape[0], 1)  # one QR of all rows
    for acc in stats._parts():
        acc.add_rows(rows)
    stats.num_rows = rows.shape[0]
    return stats
