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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import achieved, allocation_names, get_allocation
from .compress import calibration_set, collect_statistics, decompose_layers
from .config import CalibrationConfig, CompressConfig, RuntimeConfig, csv_floats, csv_names, option
from .distributed import balance, gather_json, is_main, rank, world_size
from .fisher import fisher_batches, truncation_curves
from .layer_solve import fold_bases_of, solve_layers
from .linalg.dtypes import ACCUMULATION_DTYPES
from .linalg.methods import get_method
from .models import is_causal_lm
from .planning import plan_from_decompositions
from .plotting import PLOT_EXTRA_HINT, machine, new_figure

# Which way is better for each metric kind (for the bold "best" cells).
HIGHER_IS_BETTER = {"ppl": False, "cos_mean": True, "cos_p05": True, "task": True, "weighted_err": False}


@dataclass(frozen=True)
class CompareConfig:
    """Settings of ``compare`` (the calibration sampling and the runtime come as ``CalibrationConfig`` /
    ``RuntimeConfig``, as for ``compress``).

    ``evals``: "ppl:SOURCE" (perplexity on a source's test split), "fidelity:SOURCE" (embedding cosine on a
    source's evaluation sentences, ``coala.data.evaluation_sentences``; "fidelity" alone: builtin), "task:NAME"
    (lm-eval zero-shot, with ``limit``); None: ``default_evals``, out of domain (english) and in domain (builtin)
    — perplexity for models with logits, fidelity for encoders. ``allocation`` as in ``CompressConfig`` ("auto":
    each method's own).
    """

    methods: tuple[str, ...] = option(("coala", "svd-llm", "svd-llm-v2", "asvd", "svd"), "methods to compare",
                                      parse=csv_names)
    ratios: tuple[float, ...] = option((0.2, 0.4, 0.6), "fractions of the targeted parameters removed",
                                       parse=csv_floats)
    evals: tuple[str, ...] | None = option(
        None, "ppl:SOURCE, fidelity:SOURCE, task:NAME (default: ppl:english,ppl:builtin for LMs, "
              "fidelity:english,fidelity:builtin for encoders: out of domain and in domain)",
        parse=csv_names, flag="--eval")
    mu: float = option(0.0, "COALA regularisation weight mu >= 0", parse=float)
    adaptive_mu: bool = option(False, "the paper's adaptive mu rule (COALA)")
    targets: tuple[str, ...] | None = option(None, "comma-separated linear layer names inside the blocks",
                                             parse=csv_names)
    allocation: str = option("auto", "rank allocation (auto: each method's own)",
                             choices=lambda: ["auto", *allocation_names()])
    stats_dtype: str = option("float32", "accumulation dtype of the statistics", choices=lambda: ACCUMULATION_DTYPES)
    ppl_seqlen: int = option(2048, "perplexity window length", parse=int)
    eval_tokens: int | None = option(None, "perplexity on at most this many tokens of each text (the first whole "
                                           "windows; default: all)", parse=int)
    limit: float | None = option(None, "lm-eval examples per task", parse=float)
    eval_batch_size: int = option(32, "sentences per batch for the fidelity evaluation", parse=int)

    def __post_init__(self) -> None:
        for name in ("methods", "ratios", "evals"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list, not the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
                raise ValueError(f"every ratio must be strictly between 0 and 1, got {r!r}")
        if self.eval_tokens is not None and (isinstance(self.eval_tokens, bool) or self.eval_tokens < 1):
            raise ValueError(f"eval_tokens must be a positive number of tokens, got {self.eval_tokens!r}")
        for spec in self.evals or ():
            if spec.partition(":")[0] not in ("ppl", "fidelity", "task"):
                raise ValueError(f"unknown --eval item {spec!r}: use ppl:SOURCE, fidelity:SOURCE or task:NAME")
        if (self.mu or self.adaptive_mu) and not any(get_method(m).uses_mu for m in self.methods):
            raise ValueError(f"mu / adaptive_mu apply to method 'coala' only, and none of {self.methods} is it")
        for method in self.methods:  # every (method, ratio) must be a valid CompressConfig: checked up front
            for ratio in self.ratios:
                self.compress_config(method, ratio)

    def compress_config(self, method: str, ratio: float) -> CompressConfig:
        """The ``CompressConfig`` of one cell of the table (μ applies to coala only)."""
        mu = {"mu": self.mu, "adaptive_mu": self.adaptive_mu} if get_method(method).uses_mu else {}
        return CompressConfig(ratio=ratio, method=method, targets=self.targets, allocation=self.allocation,
                              stats_dtype=self.stats_dtype, **mu)


@dataclass
class CompareResult:
    """``rows``: one dict per model (the original first) with method, ratio, removed, weighted_err and a value per
    metric key ("ppl:english", "cos_mean:builtin", "task:piqa", ...); ``labels``: the column header of each metric
    key, naming the text and how it relates to the calibration text ("ppl english (out of domain)")."""

    rows: list[dict]
    metrics: list[str]
    times: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)

    def table(self) -> tuple[list[str], list[list[object]]]:
        headers = ["method", "allocation", "ratio", "removed (targeted)",
                   *(self.labels.get(m, m) for m in self.metrics), "mean rel. weighted err"]
        body = [[r["method"], r.get("allocation", "-"), r["ratio"], r["removed"], *(r.get(m) for m in self.metrics),
                 r["weighted_err"]] for r in self.rows]
        return headers, body


def _metric_kind(metric: str) -> str:
    return metric.split(":")[0] if ":" in metric else metric


def metric_label(metric: str, calibration="builtin") -> str:
    """Column header of a metric key: "ppl:english" → "ppl english (out of domain)" (``coala.data.domain_label``
    against ``calibration``); "task:NAME" stays as it is."""
    from .data import domain_label

    kind, _, source = metric.partition(":")
    if kind not in ("ppl", "cos_mean", "cos_p05") or not source:
        return metric
    name = Path(source).name if Path(source).suffix else source
    return f"{kind.replace('_', ' ')} {name} ({domain_label(source, calibration)})"


def _evaluate(model: nn.Module, tokenizer, evals: Sequence[str], config: CompareConfig, references: dict,
              windows: dict) -> dict:
    """The metrics of one model; ``windows`` caches the perplexity windows (cut once, scored for every model)."""
    from .data import load_texts
    from .evaluate import embedding_fidelity, lm_eval_tasks, perplexity, perplexity_windows

    out: dict[str, float] = {}
    for spec in evals:
        kind, _, arg = spec.partition(":")
        if kind == "ppl":
            seqlen = min(config.ppl_seqlen, getattr(model.config, "max_position_embeddings", config.ppl_seqlen))
            if (arg, seqlen) not in windows:
                cut = perplexity_windows(tokenizer, load_texts(arg or "builtin", "test"), seqlen,
                                         source=arg or "builtin")
                if config.eval_tokens is not None:
                    cut = replace(cut, ids=cut.ids[: max(1, config.eval_tokens // seqlen)])
                windows[arg, seqlen] = cut
            res = perplexity(model, tokenizer, windows[arg, seqlen], progress=False)
            out[f"ppl:{arg or 'builtin'}"] = res.ppl
        elif kind == "fidelity":
            sentences, ref_emb = references[arg or "builtin"]
            fid = embedding_fidelity(model, ref_emb, tokenizer, sentences, batch_size=config.eval_batch_size)
            out[f"cos_mean:{arg or 'builtin'}"], out[f"cos_p05:{arg or 'builtin'}"] = fid.mean_cosine, fid.p05_cosine
        elif kind == "task":
            res = lm_eval_tasks(model, tokenizer, [arg], limit=config.limit, batch_size=1)
            out[f"task:{arg}"] = res[arg]["value"]
        else:
            raise ValueError(f"unknown --eval item {spec!r}: use ppl:SOURCE, fidelity:SOURCE or task:NAME")
    return out


def default_evals(model: nn.Module) -> list[str]:
    """Out of domain and in domain: ppl:english, ppl:builtin for a causal LM (``models.is_causal_lm``);
    fidelity:english, fidelity:builtin for an encoder, with or without a head (BertForMaskedLM: its last hidden
    states, not a next-token perplexity of its masked-LM logits)."""
    kind = "ppl" if is_causal_lm(model) else "fidelity"
    return [f"{kind}:english", f"{kind}:builtin"]


def compare(model: nn.Module, tokenizer, config: CompareConfig | None = None, *, calibration="builtin",
            data: CalibrationConfig | None = None, runtime: RuntimeConfig | None = None) -> CompareResult:
    """Every method × ratio from one calibration pass over ``model`` (left unchanged); rows hold the metrics,
    the first row is the original model's. In a distributed run the calibration pass is shared (each rank its
    batches) and so are the methods (each rank decomposes and evaluates its own); every rank returns all rows,
    with ``solve_s`` / ``eval_s`` summed over the ranks."""
    config = config or CompareConfig()
    runtime = runtime or RuntimeConfig()
    if not is_main():
        runtime = replace(runtime, progress=False)
    evals = list(config.evals or default_evals(model))
    t0 = time.perf_counter()
    base = config.compress_config(config.methods[0], config.ratios[0])
    batches, _ = calibration_set(model, calibration, data or CalibrationConfig(), tokenizer)
    stats = collect_statistics(model, batches, base, methods=list(config.methods), data=data, runtime=runtime,
                               tokenizer=tokenizer)
    times = {"calibration_s": time.perf_counter() - t0, "solve_s": 0.0, "eval_s": 0.0}
    references = {}  # fidelity source → (its sentences, the original model's embeddings of them)
    for spec in evals:
        kind, _, source = spec.partition(":")
        if kind == "fidelity" and (source or "builtin") not in references:
            from .data import evaluation_sentences
            from .evaluate import sentence_embeddings

            sentences = evaluation_sentences(source or "builtin")
            references[source or "builtin"] = (sentences, sentence_embeddings(model, tokenizer, sentences,
                                                                              batch_size=config.eval_batch_size))
    layers = {name: model.get_submodule(name) for name in stats}
    times["allocation_s"] = 0.0
    windows: dict = {}  # perplexity windows, cut once for every model
    # the original row and each method's cells are work items, shared out between the ranks of a distributed run
    items = ["original", *config.methods]
    owners = balance([1.0] + [len(config.ratios) + 1.0] * len(config.methods), world_size())
    mine = [item for item, owner in zip(items, owners, strict=True) if owner == rank()]
    bar = tqdm(total=sum(len(config.ratios) for item in mine if item != "original"), desc="compare",
               disable=not runtime.progress)
    local: dict[str, list[dict]] = {}
    for method in mine:
        if method == "original":
            t = time.perf_counter()
            local[method] = [{"method": "original", "allocation": "-", "ratio": 0.0, "removed": 0.0,
                              "weighted_err": 0.0, **_evaluate(model, tokenizer, evals, config, references, windows)}]
            times["eval_s"] += time.perf_counter() - t
            continue
        local[method] = []
        t = time.perf_counter()
        first = config.compress_config(method, config.ratios[0])
        decs = decompose_layers(model, stats, first, device=runtime.device, progress=runtime.progress)
        times["solve_s"] += time.perf_counter() - t
        fisher = None
        if "fisher" in get_allocation(first.resolved_allocation).needs:  # one pass per method, for every ratio
            t = time.perf_counter()
            fisher = truncation_curves(model, layers, fold_bases_of(layers, stats, first),
                                       fisher_batches(batches, base.fisher_samples,
                                                      base.fisher_seqlen_for(is_causal_lm(model))),
                                       progress=runtime.progress)
            times["allocation_s"] += time.perf_counter() - t
        for ratio in config.ratios:
            t = time.perf_counter()
            cell = config.compress_config(method, ratio)
            with torch.no_grad():
                plan = plan_from_decompositions(model, layers, cell, decs, stats, fisher=fisher)
                candidate = copy.deepcopy(model)
                report_rows, _ = solve_layers(candidate, layers, stats, plan, cell, device=runtime.device,
                                              decompositions=decs, progress=False)
            errors = [r.rel_error for r in report_rows if r.rank is not None and r.rel_error is not None]
            times["solve_s"] += time.perf_counter() - t
            t = time.perf_counter()
            metrics = _evaluate(candidate, tokenizer, evals, config, references, windows)
            times["eval_s"] += time.perf_counter() - t
            removed = achieved({r.name: (r.out_features, r.in_features) for r in report_rows},
                               {r.name: r.rank for r in report_rows})["removed_fraction"]
            local[method].append({"method": method, "allocation": cell.resolved_allocation, "ratio": ratio,
                                  "removed": removed,
                                  "weighted_err": sum(errors) / len(errors) if errors else float("nan"), **metrics})
            del candidate
            bar.update(1)
    bar.close()
    mine_all = {"rows": local, "times": times}
    shared = gather_json(mine_all, what="compare: results") if world_size() > 1 else [mine_all]
    found = {item: rows for part in shared for item, rows in part["rows"].items()}
    rows = [row for item in items for row in found[item]]
    for key in ("solve_s", "eval_s"):  # summed over the ranks (work done), not wall time
        times[key] = sum(part["times"][key] for part in shared)
    times["total_s"] = time.perf_counter() - t0
    metrics = [k for k in rows[0] if k not in ("method", "allocation", "ratio", "removed", "weighted_err")]
    return CompareResult(rows, metrics, times, {m: metric_label(m, calibration) for m in metrics})


def _best(rows: list[dict], metric: str) -> float | None:
    vals = [r[metric] for r in rows if r["method"] != "original" and isinstance(r.get(metric), float)
            and math.isfinite(r[metric])]
    if not vals:
        return None
    return max(vals) if HIGHER_IS_BETTER.get(metric.partition(":")[0], True) else min(vals)


def results_markdown(result: CompareResult) -> str:
    """The paper's table layout: rows method × ratio, metric columns, best per column (per ratio) in bold."""
    headers, body = result.table()
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    cols = [*result.metrics, "weighted_err"]
    keys = ["method", "allocation", "ratio", "removed", *cols]
    for row, cells in zip(result.rows, body, strict=True):
        same_ratio = [r for r in result.rows if r["ratio"] == row["ratio"]]
        out = []
        for key, v in zip(keys, cells, strict=True):
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
        ax.set_title(result.labels.get(metric, metric), fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    return {**paths, "png": out / "results.png"}
