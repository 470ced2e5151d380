"""``compare``: several methods at several ratios from ONE calibration pass, evaluated side by side.

The pass runs over the original model (``collect_statistics``) and gathers, per distinct input, every statistic
the chosen methods need (R factor, Gram, mean |x|). Each layer is then decomposed once per method, and the
factors for every ratio come from that one decomposition (``Decomposition.factors(rank)``).
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from .allocate import achieved, uniform_ranks
from .compress import CompressConfig, collect_statistics
from .layer_solve import _v2_from_losses, weighted_error
from .linalg.methods import decompose
from .lowrank import LowRankLinear, dense_bias, dense_weight, linear_shape, replace_module
from .plotting import PLOT_EXTRA_HINT, machine, new_figure

# Which way is better for each metric kind (for the bold "best" cells).
HIGHER_IS_BETTER = {"ppl": False, "cos_mean": True, "cos_p05": True, "task": True, "weighted_err": False}


@dataclass
class CompareConfig:
    """Settings of ``compare``.

    evals: "ppl:SOURCE" (perplexity on a source's test split), "fidelity" (embedding cosine on the built-in
    held-out sentences), "task:NAME" (lm-eval zero-shot, with ``limit``).
    """

    methods: list[str] = field(default_factory=lambda: ["coala", "svd-llm", "svd-llm-v2", "asvd", "svd"])
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    evals: list[str] | None = None
    mu: float = 0.0
    adaptive_mu: bool = False
    calibration: str = "builtin"
    nsamples: int = 256
    seqlen: int = 2048
    seed: int = 0
    targets: list[str] | None = None
    device: str | None = None
    ppl_seqlen: int = 2048
    limit: float | None = None
    batch_size: int = 32
    progress: bool = True


@dataclass
class CompareResult:
    rows: list[dict]
    metrics: list[str]
    times: dict[str, float]

    def table(self) -> tuple[list[str], list[list[object]]]:
        headers = ["method", "ratio", "removed (targeted)", *self.metrics, "mean rel. weighted err"]
        body = [[r["method"], r["ratio"], r["removed"], *(r.get(m) for m in self.metrics), r["weighted_err"]]
                for r in self.rows]
        return headers, body


def _metric_kind(metric: str) -> str:
    return metric.split(":")[0] if ":" in metric else metric


def _evaluate(model: nn.Module, tokenizer, evals: Sequence[str], config: CompareConfig, ref_emb) -> dict:
    from .data import builtin_sentences, load_texts
    from .evaluate import embedding_fidelity, lm_eval_tasks, perplexity

    out: dict[str, float] = {}
    for spec in evals:
        kind, _, arg = spec.partition(":")
        if kind == "ppl":
            seqlen = min(config.ppl_seqlen, getattr(model.config, "max_position_embeddings", config.ppl_seqlen))
            res = perplexity(model, tokenizer, load_texts(arg or "builtin", "test"), seqlen=seqlen,
                             batch_size=1, source=arg, progress=False)
            out[f"ppl:{arg or 'builtin'}"] = res.ppl
        elif kind == "fidelity":
            fid = embedding_fidelity(model, ref_emb, tokenizer, builtin_sentences("test"),
                                     batch_size=config.batch_size)
            out["cos_mean"], out["cos_p05"] = fid.mean_cosine, fid.p05_cosine
        elif kind == "task":
            res = lm_eval_tasks(model, tokenizer, [arg], limit=config.limit, batch_size=1)
            out[f"task:{arg}"] = res[arg]["value"]
        else:
            raise ValueError(f"unknown --eval item {spec!r}: use ppl:SOURCE, fidelity or task:NAME")
    return out


def default_evals(model: nn.Module) -> list[str]:
    causal = getattr(model, "get_output_embeddings", lambda: None)() is not None
    return ["ppl:builtin"] if causal else ["fidelity"]


def _plan(method: str, decs: dict, shapes: dict, ratio: float) -> dict[str, int | None]:
    uniform = uniform_ranks(shapes, ratio)
    if method != "svd-llm-v2":
        return uniform
    losses = {n: float(d.S[uniform[n]:].double().square().sum()) for n, d in decs.items() if uniform[n] is not None}
    return _v2_from_losses(losses, uniform, shapes, None, ratio)


def _swap(model: nn.Module, decs: dict, plan: dict[str, int | None], stats: dict) -> float:
    """Put the planned low-rank layers into ``model`` (a copy); returns the mean relative weighted error."""
    errs = []
    for name, rank in plan.items():
        if rank is None:
            continue
        module = model.get_submodule(name)
        W = dense_weight(module).detach()
        A, B = decs[name].factors(rank)
        errs.append(weighted_error(W, A, B, stats[name])[1])
        bias = dense_bias(module)
        new = LowRankLinear.from_factors(A.to(W.dtype), B.to(W.dtype), None if bias is None else bias.detach(),
                                         dtype=W.dtype)
        replace_module(model, name, new.to(W.device))
    valid = [e for e in errs if e is not None]
    return sum(valid) / len(valid) if valid else float("nan")


def compare(model: nn.Module, tokenizer, config: CompareConfig) -> CompareResult:
    """Every method × ratio from one calibration pass; rows hold the metrics, plus the original model's row."""
    for r in config.ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"every ratio must be strictly between 0 and 1, got {r}")
    evals = config.evals or default_evals(model)
    t0 = time.perf_counter()
    cc = CompressConfig(method="coala", mu=config.mu, adaptive_mu=config.adaptive_mu, targets=config.targets,
                        nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed, device=config.device,
                        progress=config.progress, error_stats=True)
    stats = collect_statistics(model, config.calibration, cc, methods=config.methods, tokenizer=tokenizer)
    times = {"calibration_s": time.perf_counter() - t0, "solve_s": 0.0, "eval_s": 0.0}
    ref_emb = None
    if "fidelity" in evals:
        from .data import builtin_sentences
        from .evaluate import sentence_embeddings

        ref_emb = sentence_embeddings(model, tokenizer, builtin_sentences("test"), batch_size=config.batch_size)
    shapes = {name: linear_shape(model.get_submodule(name)) for name in stats}
    t = time.perf_counter()
    rows = [{"method": "original", "ratio": 0.0, "removed": 0.0, "weighted_err": 0.0,
             **_evaluate(model, tokenizer, evals, config, ref_emb)}]
    times["eval_s"] += time.perf_counter() - t
    bar = tqdm(total=len(config.methods) * len(config.ratios), desc="compare", disable=not config.progress)
    for method in config.methods:
        t = time.perf_counter()
        mu_kw = {"mu": config.mu, "adaptive_mu": config.adaptive_mu} if method == "coala" else {}
        decs = {name: decompose(dense_weight(model.get_submodule(name)).detach(), stats[name], method=method,
                                name=name, **mu_kw) for name in stats}
        times["solve_s"] += time.perf_counter() - t
        for ratio in config.ratios:
            t = time.perf_counter()
            plan = _plan(method, decs, shapes, ratio)
            candidate = copy.deepcopy(model)
            err = _swap(candidate, decs, plan, stats)
            times["solve_s"] += time.perf_counter() - t
            t = time.perf_counter()
            metrics = _evaluate(candidate, tokenizer, evals, config, ref_emb)
            times["eval_s"] += time.perf_counter() - t
            removed = achieved(shapes, plan)["removed_fraction"]
            rows.append({"method": method, "ratio": ratio, "removed": removed, "weighted_err": err, **metrics})
            del candidate
            bar.update(1)
    bar.close()
    times["total_s"] = time.perf_counter() - t0
    metrics = [k for k in rows[0] if k not in ("method", "ratio", "removed", "weighted_err")]
    return CompareResult(rows, metrics, times)


def _best(rows: list[dict], metric: str) -> float | None:
    vals = [r[metric] for r in rows if r["method"] != "original" and isinstance(r.get(metric), float)
            and math.isfinite(r[metric])]
    if not vals:
        return None
    kind = "ppl" if metric.startswith("ppl") else ("task" if metric.startswith("task") else metric)
    return max(vals) if HIGHER_IS_BETTER.get(kind, True) else min(vals)


def results_markdown(result: CompareResult) -> str:
    """The paper's table layout: rows method × ratio, metric columns, best per column (per ratio) in bold."""
    headers, body = result.table()
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    cols = [*result.metrics, "weighted_err"]
    for row, cells in zip(result.rows, body, strict=True):
        same_ratio = [r for r in result.rows if r["ratio"] == row["ratio"]]
        out = []
        for h, v in zip(headers, cells, strict=True):
            key = "weighted_err" if h == "mean rel. weighted err" else h
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
            if key in cols and row["method"] != "original" and isinstance(v, float) and v == _best(same_ratio, key):
                text = f"**{text}**"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def write_results(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """results.csv, results.md and results.png (one panel per metric: metric vs ratio, a line per method).

    The PNG needs matplotlib (the ``plot`` extra): without it, a one-line note goes to stderr and the returned
    dict has no "png" entry.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headers, body = result.table()
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(body)
    times = ", ".join(f"{k} {v:.1f}" for k, v in result.times.items())
    (out / "results.md").write_text(
        f"# coala compare\n\n{results_markdown(result)}\n\nBest per column and ratio in bold. "
        f"Times (s): {times}.\n\nMachine: {machine()}\n"
    )
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    metrics = [*result.metrics, "weighted_err"]
    try:
        fig, axes = new_figure(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    except ImportError:
        print(f"coala compare: results.png skipped, matplotlib is not installed ({PLOT_EXTRA_HINT})", file=sys.stderr)
        return paths
    original = result.rows[0]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method in dict.fromkeys(r["method"] for r in result.rows[1:]):
            pts = [(r["ratio"], r[metric]) for r in result.rows if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        if metric != "weighted_err":
            ax.axhline(original[metric], color="k", ls="--", lw=1, label="original")
        if metric.startswith("ppl") or metric == "weighted_err":
            ax.set_yscale("log")
        ax.set_xlabel("ratio of targeted parameters removed")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    return {**paths, "png": out / "results.png"}
