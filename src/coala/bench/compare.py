"""``coala bench compare``: the comparison table on the bundled MiniLM (offline) and the time saved by the
shared single calibration pass against running every method × ratio on its own (calibration + solve each).

Writes results.csv / results.md / results.png (the table and plot of ``coala compare``) and timing.md.
"""

from __future__ import annotations

import argparse
import copy
import time

from coala.bench._report import markdown_table, out_dir, write_markdown
from coala.models import load_model


def _sequential_seconds(model, tokenizer, methods, ratios, nsamples) -> float:
    """Calibration + solve for each method × ratio separately (what one compress run per cell costs)."""
    from coala.compress import CompressConfig, compress

    total = 0.0
    for method in methods:
        for ratio in ratios:
            candidate = copy.deepcopy(model)
            t = time.perf_counter()
            compress(candidate, "builtin", CompressConfig(method=method, ratio=ratio, nsamples=nsamples,
                                                          propagate="original", progress=False),
                     tokenizer=tokenizer)
            total += time.perf_counter() - t
            del candidate
    return total


def main(argv: list[str] | None = None) -> int:
    from coala.compare import CompareConfig, compare, results_markdown, write_results

    p = argparse.ArgumentParser(prog="coala bench compare", description=__doc__)
    p.add_argument("--out", default=None, help="output folder (default results/compare)")
    p.add_argument("--quick", action="store_true", help="2 ratios, 32 calibration samples")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--skip-sequential", action="store_true", help="do not time the one-by-one route")
    args = p.parse_args(argv)
    out = out_dir(args.out, "compare")
    methods = ["coala", "svd-llm", "svd-llm-v2", "asvd", "svd"]
    ratios = [0.2, 0.4] if args.quick else [0.2, 0.4, 0.6]
    nsamples = 32 if args.quick else args.nsamples
    loaded = load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    t = time.perf_counter()
    result = compare(model, tokenizer, CompareConfig(methods=methods, ratios=ratios, nsamples=nsamples))
    wall = time.perf_counter() - t
    write_results(result, out)
    print(results_markdown(result))
    shared = result.times["calibration_s"] + result.times["solve_s"]
    rows = [["shared single pass (compare)", result.times["calibration_s"], result.times["solve_s"], shared]]
    if not args.skip_sequential:
        seq = _sequential_seconds(model, tokenizer, methods, ratios, nsamples)
        rows.append(["one compress run per method × ratio", "—", "—", seq])
    table = markdown_table(["route", "calibration s", "solve s", "calibration + solve s"], rows)
    note = (f"{len(methods)} methods × {len(ratios)} ratios on all-MiniLM-L6-v2, {nsamples} calibration "
            f"samples; evaluation ({result.times['eval_s']:.1f} s) is the same for both routes and not counted. "
            f"Whole compare run incl. evaluation: {wall:.1f} s.")
    if len(rows) == 2:
        note += f" Speed-up of the shared pass: {rows[1][3] / shared:.2f}×."
    print(table)
    print(note)
    write_markdown(out / "timing.md", "Shared calibration pass vs one run per cell", table, note)
    return 0
