"""The bundled encoder with few calibration samples: ``coala compress --nsamples 32`` on all-MiniLM-L6-v2.

Run: ``python benchmarks/minilm.py [--seeds 0,1,2] [--allocations auto,uniform] [--propagations auto,corrected]``
from the repository root (or ``coala bench minilm``). For each allocation (and propagation) and sampling seed:
``coala.compress`` with default settings otherwise (COALA, μ = 0, 20 % of the targeted parameters removed, the
built-in calibration mix, 32 samples), then the mean cosine between the original and the compressed model's
sentence embeddings on ``english`` (written apart from every calibration text: out of domain) and on the held-out
sentences of the built-in mix (in domain), and the run time of ``compress``. ``auto`` is COALA's default (the Fisher
allocation on held-out truncation curves, docs/design.md §6). Target (issue 10): out-of-domain mean cosine ≥ 0.93
in ≤ 60 s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

from _report import markdown_table, new_figure, out_dir, write_markdown


def run(args) -> list[dict]:
    """One row per (allocation, seed): cosines out of / in domain, the compress time and calibration tokens."""
    import coala
    from coala.data import evaluation_sentences
    from coala.evaluate import embedding_fidelity, sentence_embeddings
    from coala.models import load_model

    model, tok, _ = load_model()
    texts = {k: evaluation_sentences(k)[: args.sentences] for k in ("english", "builtin")}
    refs = {k: sentence_embeddings(model, tok, t) for k, t in texts.items()}
    rows = []
    for allocation, propagate in settings(args):
        for seed in args.seeds:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            config = coala.CompressConfig(ratio=args.ratio, allocation=allocation, propagate=propagate)
            report = coala.compress(m, "builtin", config,
                                    data=coala.CalibrationConfig(nsamples=args.nsamples, seed=seed),
                                    runtime=coala.RuntimeConfig(progress=False), tokenizer=tok)
            seconds = time.perf_counter() - t0
            cos = {k: embedding_fidelity(m, refs[k], tok, t).mean_cosine for k, t in texts.items()}
            rows.append({"allocation": report.allocation, "asked": label(allocation, propagate), "seed": seed,
                         "seconds": seconds, "tokens": report.calibration.get("tokens"), **cos})
            print(f"{label(allocation, propagate)} ({report.allocation}) seed {seed}: english (out of domain) "
                  f"{cos['english']:.4f}, "
                  f"builtin (in domain) {cos['builtin']:.4f}, {seconds:.1f} s, "
                  f"{report.calibration.get('tokens')} tokens", flush=True)
            del m
    return rows


def settings(args) -> list[tuple[str, str]]:
    """(allocation, propagation) pairs, allocations first."""
    return [(a, p) for a in args.allocations for p in args.propagations]


def label(allocation: str, propagate: str) -> str:
    return allocation if propagate == "auto" else f"{allocation}, propagate {propagate}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma-separated")
    ap.add_argument("--allocations", default="auto,uniform", help="allocations, comma-separated")
    ap.add_argument("--propagations", default="auto",
                    help="propagations, comma-separated: auto (coala's default), corrected (error-correcting)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sentences", type=int, default=None, help="evaluate on the first N sentences of each text")
    ap.add_argument("--out", default=None, help="output folder (default results/minilm)")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.allocations = [a for a in args.allocations.split(",") if a]
    args.propagations = [p for p in args.propagations.split(",") if p]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    body = []
    names = [label(a, p) for a, p in settings(args)]
    for name in names:
        mine = [r for r in rows if r["asked"] == name]
        mean = {k: statistics.mean(r[k] for r in mine) for k in ("english", "builtin", "seconds")}
        spread = statistics.pstdev([r["english"] for r in mine]) if len(mine) > 1 else 0.0
        body.append([f"{name} ({mine[0]['allocation']})", f"{mean['english']:.3f} ± {spread:.3f}",
                     f"{mean['builtin']:.3f}", f"{mean['seconds']:.1f}", len(mine)])
    table = markdown_table(["allocation", "mean cos english (out of domain)", "mean cos builtin (in domain)",
                            "compress s", "seeds"], body)
    print(table)
    out = out_dir(args.out, "minilm")
    title = f"all-MiniLM-L6-v2, {args.ratio:.0%} removed, {args.nsamples} calibration samples"
    notes = (f"Seeds {args.seeds} (mean ± population std over seeds); torch threads {torch.get_num_threads()}. "
             "Target: ≥ 0.93 out of domain in ≤ 60 s.")
    write_markdown(out / "minilm.md", title, table, notes)
    fig, ax = new_figure()
    for i, name in enumerate(names):
        mine = [r for r in rows if r["asked"] == name]
        ax.scatter([i - 0.1] * len(mine), [r["english"] for r in mine], label="english (out of domain)" if i == 0
                   else None, color="C0")
        ax.scatter([i + 0.1] * len(mine), [r["builtin"] for r in mine], label="builtin (in domain)" if i == 0
                   else None, color="C1")
    ax.axhline(0.93, color="k", linestyle=":", label="target 0.93")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.legend()
    fig.savefig(out / "minilm.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'minilm.md'} and {out / 'minilm.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
