"""``coala compare [MODEL]``: methods × ratios from one calibration pass → results.csv, results.md, results.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from coala.cli._common import default_model_path, load_model_and_tokenizer, print_table


def _floats(arg: str) -> list[float]:
    try:
        return [float(s) for s in arg.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {arg!r}") from err


def _names(arg: str) -> list[str]:
    return [s.strip() for s in arg.split(",") if s.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare methods at several ratios from one calibration pass")
    p.add_argument("model", nargs="?", default=None, help="hub id or local folder (default: the bundled MiniLM)")
    p.add_argument("--methods", type=_names, default=["coala", "svd-llm", "svd-llm-v2", "asvd", "svd"])
    p.add_argument("--ratios", type=_floats, default=[0.2, 0.4, 0.6],
                   help="fractions of the targeted parameters removed (default 0.2,0.4,0.6)")
    p.add_argument("--eval", dest="evals", type=_names, default=None,
                   help="ppl:SOURCE, fidelity, task:NAME (default: ppl:builtin for LMs, fidelity for encoders)")
    p.add_argument("--calib", default="builtin", help="calibration source: builtin, wikitext2, c4 or PATH")
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 256; 128 for MiniLM)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mu", type=float, default=0.0)
    p.add_argument("--adaptive-mu", action="store_true")
    p.add_argument("--targets", type=_names, default=None)
    p.add_argument("--limit", type=float, default=None, help="lm-eval examples per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coala.compare import CompareConfig, compare, write_results

    default = args.model is None
    target = str(default_model_path()) if default else args.model
    nsamples = args.nsamples or (128 if default else 256)
    model, tokenizer, info = load_model_and_tokenizer(target, device=args.device)
    if info["compressed"]:
        raise ValueError(f"{target} is already compressed: compare starts from an original model")
    config = CompareConfig(methods=args.methods, ratios=args.ratios, evals=args.evals, mu=args.mu,
                           adaptive_mu=args.adaptive_mu, calibration=args.calib, nsamples=nsamples,
                           seqlen=args.seqlen, seed=args.seed, targets=args.targets, device=args.device,
                           limit=args.limit)
    result = compare(model, tokenizer, config)
    headers, body = result.table()
    print_table(headers, [[f"{v:.4g}" if isinstance(v, float) else v for v in row] for row in body])
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.times.items()))
    for kind, path in write_results(result, Path(args.out)).items():
        print(f"wrote {kind}: {path}")
    return 0
