"""``coala compare [MODEL]``: methods × ratios from one calibration pass → results.csv, results.md, results.png.

The flags are derived from ``coala.compare.CompareConfig`` and ``coala.config``'s calibration and runtime configs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coala.cli._common import DefaultsHelpFormatter, add_threads_argument, print_table, set_threads


def add_parser(sub) -> None:
    from coala.compare import CompareConfig
    from coala.config import CalibrationConfig, RuntimeConfig, add_arguments

    p = sub.add_parser("compare", help="compare methods at several ratios from one calibration pass",
                       description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder, .gguf file, or smollm2 (default: the bundled MiniLM)")
    p.add_argument("--calib", default="builtin",
                   help="calibration source: builtin, docs, prose, wikitext2, c4 or PATH")
    p.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    add_arguments(p, CompareConfig)
    add_arguments(p, CalibrationConfig, defaults={"nsamples": None},
                  helps={"nsamples": "calibration samples (default: 128 for the bundled MiniLM, else 256)"})
    add_arguments(p, RuntimeConfig, defaults={"device": "cpu"},
                  helps={"device": "where the model is loaded and each block computed, e.g. cuda (default: cpu)"})
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coala.compare import CompareConfig, compare, write_results
    from coala.config import CalibrationConfig, RuntimeConfig, from_arguments
    from coala.distributed_run import on_main
    from coala.models import load_model

    set_threads(args.threads)
    default = args.model is None
    config = from_arguments(CompareConfig, args)
    data = from_arguments(CalibrationConfig, args, nsamples=args.nsamples or (128 if default else 256))
    runtime = from_arguments(RuntimeConfig, args)
    loaded = load_model(args.model, device=runtime.device or "cpu")
    if loaded.compressed:
        raise ValueError(f"{loaded.source} is already compressed: compare starts from an original model")
    model, tokenizer = loaded.model, loaded.tokenizer
    result = compare(model, tokenizer, config, calibration=args.calib, data=data, runtime=runtime)
    headers, body = result.table()
    print_table(headers, [[f"{v:.4g}" if isinstance(v, float) else v for v in row] for row in body])
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.times.items()))
    written = on_main(lambda: write_results(result, Path(args.out)), "write the results") or {}  # rank 0 writes
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0
