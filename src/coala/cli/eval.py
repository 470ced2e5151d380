"""``coala eval MODEL_OR_DIR``: perplexity, lm-eval zero-shot tasks and embedding fidelity, as a table and JSON.

With nothing asked, quality out of domain and in domain: perplexity (causal LMs) or embedding fidelity
(encoders) on the built-in evaluation text ``english`` and on the held-out split of the calibration mix
``builtin``, each labelled by how it relates to the model's calibration text (``coala.data.domain_label``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coala.cli._common import DefaultsHelpFormatter, add_threads_argument, dtype_arg, print_table, set_threads


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an original or compressed model (perplexity, lm-eval, fidelity)",
                       description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local model folder, compressed folder, .gguf file, or smollm2 (default: the bundled "
                        "MiniLM)")
    p.add_argument("--ppl", default="",
                   help="comma-separated perplexity sources: english,builtin,docs,prose,wikitext2,c4,PATH (default, "
                        "with no --tasks / --fidelity: english,builtin for causal LMs)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (zero-shot), e.g. piqa,arc_easy")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (int) or fraction")
    p.add_argument("--include-path", default=None, help="lm-eval: folder with extra task YAML definitions")
    p.add_argument("--fidelity", action="store_true",
                   help="embedding fidelity against --reference (default for encoder models)")
    p.add_argument("--reference", default=None,
                   help="reference model for fidelity (default: the base model recorded in coala.json)")
    p.add_argument("--fidelity-text", default="english,builtin",
                   help="comma-separated texts for fidelity: english (out of domain), builtin (held-out calibration "
                        "mix), docs, prose, or a .txt / .jsonl PATH (a .txt file without blank lines holds one "
                        "sentence per line; with blank lines, one paragraph between them)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--dtype", type=dtype_arg, default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON to this path")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _short(model: str) -> str:
    """The last part of a folder path or Hub id, for the table."""
    return Path(str(model).rstrip("/")).name or str(model)


def _split(arg: str) -> list[str]:
    return [s.strip() for s in arg.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    from coala.data import domain_label, evaluation_sentences, load_texts
    from coala.evaluate import embedding_fidelity, lm_eval_tasks, perplexity, sentence_embeddings
    from coala.io import read_meta
    from coala.models import load_model

    set_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = read_meta(loaded.source).get("calibration") if loaded.compressed else None  # None: builtin
    results: dict = {"model": args.model or loaded.source, "compressed": loaded.compressed,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if loaded.gguf is not None:
        results["gguf"] = loaded.gguf
    nothing_asked = not args.ppl and not args.tasks and not args.fidelity
    ppl_sources = _split(args.ppl) or (["english", "builtin"] if nothing_asked and loaded.causal else [])
    rows: list[tuple[str, str, str]] = []
    for source in ppl_sources:
        texts = load_texts(source, "test")
        seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen) or args.seqlen)
        res = perplexity(model, tokenizer, texts, seqlen=seqlen, batch_size=args.batch_size, source=source)
        domain = domain_label(source, calibration)
        results.setdefault("perplexity", {})[source] = {**res.to_dict(), "domain": domain}
        rows.append((f"ppl {source} ({domain})", f"{res.ppl:.4f}",
                     f"{res.windows} × {res.seqlen} tokens, {res.dtype}"))
    if args.tasks:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        tasks = lm_eval_tasks(model, tokenizer, _split(args.tasks), limit=limit, batch_size=args.batch_size,
                              include_path=args.include_path)
        results["tasks"] = tasks
        rows += [(t, f"{r['value']:.4f}", r["metric"]) for t, r in tasks.items()]
    if args.fidelity or (nothing_asked and not loaded.causal):
        reference = args.reference or loaded.base_model
        if reference is None:
            raise ValueError("--fidelity needs --reference MODEL (no base model is recorded for this one)")
        ref_model = load_model(reference, device=args.device, dtype=args.dtype).model
        results["fidelity"] = {"reference": reference}
        for source in _split(args.fidelity_text):
            texts = evaluation_sentences(source)
            ref = sentence_embeddings(ref_model, tokenizer, texts, batch_size=max(args.batch_size, 32))
            fid = embedding_fidelity(model, ref, tokenizer, texts, batch_size=max(args.batch_size, 32))
            domain = domain_label(source, calibration)
            results["fidelity"][source] = {**fid.to_dict(), "domain": domain}
            rows.append((f"cosine mean {source} ({domain})", f"{fid.mean_cosine:.4f}",
                         f"vs reference {_short(reference)}, {fid.sentences} sentences"))
            rows.append((f"cosine p05 {source} ({domain})", f"{fid.p05_cosine:.4f}", "5th percentile"))
    if not rows:
        raise ValueError("nothing to evaluate: give --ppl, --tasks or --fidelity")
    name = _short(results["model"])
    kind = "original" if not loaded.compressed else (
        f"compressed from {_short(loaded.base_model)}" if loaded.base_model else "compressed")
    calibrated = _calibration_name(calibration) if loaded.compressed else None
    calibrated = f", calibrated on {calibrated}" if calibrated else ""
    print(f"{name}: {kind}{calibrated}, {results['dtype']}"
          + ("; cosine: its mean-pooled sentence embeddings against the reference's" if "fidelity" in results else ""))
    print_table(("metric", f"value ({name})", "details"), rows)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json_path}")
    return 0


def _calibration_name(description: dict | None) -> str | None:
    """The calibration text recorded in coala.json (a named source or a file), for the title line; None when it
    was something else (texts or batches given in Python) or is not recorded."""
    from coala.data import SOURCES

    if not isinstance(description, dict):
        return None
    if description.get("source") == "file" and description.get("path"):
        return str(description["path"])
    return description.get("source") if description.get("source") in SOURCES else None
