"""``coala export DIR --dense OUT``: write a compressed folder as a plain model of its base class.

Every low-rank layer's A @ B is multiplied out into the base class's Linear / Conv1D weight and the model is
saved with ``save_pretrained`` (the base config, no auto_map, tokenizer and sentence-transformers files
carried): any tool loads OUT without trust_remote_code and computes what ``coala.load(DIR)`` computes, to float
rounding. It saves no memory (the matrices are dense again): it is for compatibility, and for quantising the
compressed model afterwards with tools that expect the base architecture. DIR itself already loads in
transformers with ``trust_remote_code=True``, low rank and all.
"""

from __future__ import annotations

import argparse

from coala.cli._common import DefaultsHelpFormatter, dtype_arg


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a compressed folder as a plain (dense) model of its base class",
                       description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("dir", help="compressed model folder (with coala.json)")
    p.add_argument("--dense", required=True, metavar="OUT",
                   help="output folder of the dense model (must be new or empty unless --overwrite)")
    p.add_argument("--dtype", type=dtype_arg, default=None,
                   help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--max-shard-size", default="2GB", help="largest weights file before the model is sharded")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coala.export import export_dense
    from coala.io import read_meta

    meta = read_meta(args.dir)  # FileNotFoundError / ValueError for a folder coala did not write
    out = export_dense(args.dir, args.dense, dtype=args.dtype, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size)
    print(f"exported {args.dir} ({len(meta['low_rank'])} low-rank layers multiplied out) as a plain "
          f"{meta['model_class']} to {out}; it loads without coala and without trust_remote_code")
    return 0
