"""The report of a compression run: per-layer ranks, parameters and errors, totals, time and memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerReport:
    """One targeted matrix W (out × in).

    ``rank`` is None when the matrix stayed dense (a low-rank factorisation would not save parameters).
    ``truncation_loss`` = ‖(W − W')Xᵀ‖²_F over the calibration tokens X that reached the layer, and
    ``rel_error`` = ‖(W − W')Xᵀ‖_F / ‖W Xᵀ‖_F; both are computed from the R factor of X (‖·Xᵀ‖ = ‖·Rᵀ‖) and
    are None when R was not collected (``CompressConfig.error_stats=False`` with a method that needs no R). With
    ``propagate="corrected"`` both measure the corrected objective instead: ‖W Yᵀ − W'X̃ᵀ‖ and its ratio to ‖W Yᵀ‖,
    X̃ the layer's inputs on the compressed path and Y = αX + (1 − α)X̃ the target mix (``linalg.corrected``).
    ``mu`` is the μ actually used (the adaptive rule's μ_eff for COALA), None for methods without μ.
    """

    name: str
    kind: str
    out_features: int
    in_features: int
    rank: int | None
    params_before: int
    params_after: int
    truncation_loss: float | None = None
    rel_error: float | None = None
    mu: float | None = None


@dataclass
class CompressionReport:
    """What ``coala.compress`` did. ``to_json()`` for machines, ``table()`` for people."""

    method: str
    ratio: float | None
    mu: float
    adaptive_mu: bool
    propagate: str
    allocation: str = "uniform"
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)
    output: str | None = None
    resumed_blocks: int = 0

    # ------------------------------------------------------------------ totals
    @property
    def targeted_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def removed_fraction(self) -> float:
        """Achieved fraction of the targeted matrices' parameters removed."""
        before = self.targeted_params_before
        return (before - self.targeted_params_after) / before if before else 0.0

    @property
    def model_removed_fraction(self) -> float:
        """Achieved fraction of the whole model's parameters removed."""
        b = self.model_params_before
        return (b - self.model_params_after) / b if b else 0.0

    @property
    def ranks(self) -> dict[str, int | None]:
        return {r.name: r.rank for r in self.layers}

    def totals(self) -> dict:
        return {
            "targeted_params_before": self.targeted_params_before,
            "targeted_params_after": self.targeted_params_after,
            "targeted_removed_fraction": self.removed_fraction,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_removed_fraction": self.model_removed_fraction,
            "low_rank_layers": sum(r.rank is not None for r in self.layers),
            "dense_layers": sum(r.rank is None for r in self.layers),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text (NaN / Inf losses are written as null)."""
        return json.dumps(_finite(self.to_dict()), indent=indent)

    # ------------------------------------------------------------------ table
    def table(self) -> str:
        """A plain-text table: one row per layer, then totals, time and memory."""

        def num(v: float | None, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        head = f"{'layer':<48} {'shape':>11} {'rank':>6} {'params':>10} {'kept':>10} {'trunc. loss':>11} {'rel.err':>8}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.out_features}x{r.in_features}"
            rank = "dense" if r.rank is None else str(r.rank)
            lines.append(
                f"{_clip(r.name, 48):<48} {shape:>11} {rank:>6} {r.params_before:>10} {r.params_after:>10} "
                f"{num(r.truncation_loss, '11.4g'):>11} {num(r.rel_error, '8.4f'):>8}"
            )
        t = self.totals()
        corrected = self.propagate == "corrected"  # compressed propagation with a partly corrected fit
        stream = "compressed" if corrected else self.propagate
        fit = ", each layer fitted partly to the original model's (propagate: corrected)" if corrected else ""
        lines += [
            "-" * len(head),
            f"targeted layers: {t['targeted_params_before']:,} -> {t['targeted_params_after']:,} parameters "
            f"({100 * t['targeted_removed_fraction']:.2f}% removed; {t['low_rank_layers']} low-rank, "
            f"{t['dense_layers']} dense)",
            f"whole model:     {t['model_params_before']:,} -> {t['model_params_after']:,} parameters "
            f"({100 * t['model_removed_fraction']:.2f}% removed)",
            f"ranks: {self.allocation} allocation; next block calibrated on the {stream} block's outputs{fit}",
        ]
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        if errs:
            lines.append(f"relative weighted error: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
        if self.times:
            lines.append(
                "time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in self.times.items())
            )
        if self.peak_memory:
            lines.append("peak memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in self.peak_memory.items()))
        return "\n".join(lines)


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else "…" + s[-(width - 1) :]


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """Peak resident memory of this process (MiB, since it started) and, on CUDA, peak allocated device memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    out = {"host_rss": rss_mib}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
