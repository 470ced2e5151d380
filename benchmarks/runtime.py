"""Cost of the streaming R factor against a streaming Gram, a monolithic QR, and the solve.

Run: ``python benchmarks/runtime.py [--quick]`` from the repository root (or ``coala bench runtime``).

1. Streaming statistics, float32, per width n: the same stream of loader blocks (2048 rows each, as a data loader
   would deliver them) goes into ``RFactor`` (buffers ``default_block_rows(n)`` rows, then R ← R([R; X_b]) by
   blocked Householder QR) and into ``GramAccumulator`` (G += X_bᵀX_b, one fp32 GEMM per block, as SVD-LLM).
   Reference: one monolithic ``torch.linalg.qr(X, mode="r")`` of all rows (materialised; the stream is not).
2. Sweeps at n = 1024 on one stream: ``RFactor(block_rows=b)``; the kernel's leaf width (columns per LAPACK
   geqrf call, ``qr_update.LEAF``); and the previous route (LAPACK geqrf of the stacked [R; X_b], b = 4n).
3. Per-layer solve from statistics to factors, for W of shape (n × n) and (4n × n):
   ``coala.decompose(W, stats, method=...).factors(rank)`` for "coala" (SVD of W Rᵀ) and "svd-llm" (fp64 Cholesky
   of G, its inverse, SVD of W L).

Every figure is the minimum over ``--repeats`` interleaved runs (methods alternate, so that load on a shared
machine hits all of them alike). Row counts: n = 1024 / 2048 / 4096 stream 294 912 / 122 880 / 61 440 rows
(144 / 60 / 30 loader blocks, cycled from 8 distinct random blocks with log-spaced column scales); the full
run takes ≈ 5–8 min on 2 cores. ``--quick``: n = 256, 512 and small streams (≈ 20 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import coala.linalg.qr_update as qr
from coala.linalg import RFactor, decompose
from coala.linalg.stats import ActivationStats, GramAccumulator
from coala.linalg.tsqr import default_block_rows

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

from _report import machine, markdown_table, new_figure, out_dir, write_markdown

LOADER_ROWS = 2048
FULL = {"rows": {1024: 294_912, 2048: 122_880, 4096: 61_440}, "sweep_n": 1024, "sweep_rows": 65_536,
        "solve_n": 1024, "repeats": 3}
QUICK = {"rows": {256: 16_384, 512: 8_192}, "sweep_n": 256, "sweep_rows": 16_384, "solve_n": 256, "repeats": 2}
SWEEP_BLOCKS = (256, 512, 1024, 2048, 4096, 8192, 16384)
SWEEP_LEAVES = (16, 32, 64, 128)  # qr_update.LEAF: columns per LAPACK geqrf call inside a 128-column panel


@dataclass
class Stream:
    """``count`` loader blocks (LOADER_ROWS × n, float32), cycled from a pool of distinct blocks."""

    pool: list[Tensor]
    count: int

    def __iter__(self) -> Iterator[Tensor]:
        """The ``count`` blocks, cycling through the pool."""
        return (self.pool[i % len(self.pool)] for i in range(self.count))

    @property
    def rows(self) -> int:
        """Rows in the whole stream."""
        return self.count * LOADER_ROWS

    @property
    def n(self) -> int:
        """Width (in_features)."""
        return self.pool[0].shape[1]

    def materialise(self) -> Tensor:
        """All rows as one (rows × n) tensor."""
        return torch.cat(list(self))


def make_stream(n: int, rows: int, seed: int = 0, pool: int = 8) -> Stream:
    """About ``rows`` rows of width ``n`` from ``pool`` random blocks with log-spaced column scales."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n)  # unequal column scales, as activations have
    blocks = [torch.randn(LOADER_ROWS, n, generator=g) * scales for _ in range(pool)]
    return Stream(blocks, max(1, rows // LOADER_ROWS))


# ---------------------------------------------------------------------------------------------- the workloads
def gram_stream(s: Stream) -> Tensor:
    """G = XᵀX accumulated block by block (the SVD-LLM route)."""
    acc = GramAccumulator(s.n)
    for block in s:
        acc.add_rows(block)
    return acc.G


def r_stream(s: Stream, block_rows: int | None = None) -> Tensor:
    """R of the stream by coala's RFactor (``block_rows`` rows per QR update; default: its own)."""
    f = RFactor(s.n, block_rows=block_rows)
    for block in s:
        f.add_rows(block)
    return f.R


def r_stream_leaf(s: Stream, leaf: int) -> Tensor:
    """``r_stream`` with the kernel's leaf width set to ``leaf`` (default block_rows)."""
    old, qr.LEAF = qr.LEAF, leaf
    try:
        return r_stream(s)
    finally:
        qr.LEAF = old


def stacked_geqrf_stream(s: Stream, block_rows: int) -> Tensor:
    """The previous route: buffer b rows, then LAPACK geqrf of the (n + b) × n matrix [R; X_b]."""
    n = s.n
    R = torch.zeros(n, n)
    pending: list[Tensor] = []
    have = 0
    for block in [*s, None]:
        if block is not None:
            pending.append(block)
            have += block.shape[0]
        if pending and (have >= block_rows or block is None):
            a, _ = torch.geqrf(torch.cat([R, *pending]))
            R = a[:n].triu()
            pending, have = [], 0
    return R


def race(tasks: dict[str, Callable[[], object]], repeats: int, bar: Any) -> dict[str, float]:
    """Minimum wall time of each task over ``repeats`` rounds; the tasks alternate within a round."""
    best = dict.fromkeys(tasks, float("inf"))
    for _ in range(repeats):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            bar.update(1)
    return best


# ---------------------------------------------------------------------------------------------- the sections
def bench_streams(cfg: dict, bar: Any) -> list[dict]:
    """Section 1: Gram vs streaming R vs monolithic QR per width."""
    out = []
    for n, rows in cfg["rows"].items():
        s = make_stream(n, rows, seed=n)
        X = s.materialise()
        t = race({"gram": lambda s=s: gram_stream(s), "r": lambda s=s: r_stream(s),
                  "mono": lambda X=X: torch.linalg.qr(X, mode="r")}, cfg["repeats"], bar)
        del X
        flops = 2.0 * s.rows * n * n
        out.append({"n": n, "rows": s.rows, "block_rows": default_block_rows(n), **t,
                    "r/gram": t["r"] / t["gram"], "r/mono": t["r"] / t["mono"], "mono/gram": t["mono"] / t["gram"],
                    "gram_gflops": flops / t["gram"] / 1e9, "r_gflops": flops / t["r"] / 1e9})
    return out


def bench_sweep(cfg: dict, bar: Any) -> tuple[list[dict], float]:
    """Section 2: block size, leaf width and the previous stacked-geqrf route; rows and the Gram time."""
    n = cfg["sweep_n"]
    s = make_stream(n, cfg["sweep_rows"], seed=1)
    tasks: dict[str, Callable[[], object]] = {"gram": lambda: gram_stream(s)}
    for b in SWEEP_BLOCKS:
        tasks[f"b={b}"] = lambda b=b: r_stream(s, b)
    for leaf in SWEEP_LEAVES:
        tasks[f"leaf={leaf}"] = lambda leaf=leaf: r_stream_leaf(s, leaf)
    tasks["geqrf"] = lambda: stacked_geqrf_stream(s, 4 * n)
    t = race(tasks, cfg["repeats"], bar)
    rows = [{"block_rows": b, "leaf": qr.LEAF, "s": t[f"b={b}"], "x_gram": t[f"b={b}"] / t["gram"],
             "route": "RFactor"} for b in SWEEP_BLOCKS]
    rows += [{"block_rows": default_block_rows(n), "leaf": leaf, "s": t[f"leaf={leaf}"],
              "x_gram": t[f"leaf={leaf}"] / t["gram"], "route": "RFactor, leaf width"} for leaf in SWEEP_LEAVES]
    rows.append({"block_rows": 4 * n, "leaf": "—", "s": t["geqrf"], "x_gram": t["geqrf"] / t["gram"],
                 "route": "stacked geqrf (previous)"})
    return rows, t["gram"]


def bench_solve(cfg: dict, bar: Any) -> list[dict]:
    """Section 3: statistics → factors for coala and svd-llm, square and tall W."""
    n = cfg["solve_n"]
    stats = ActivationStats(n, ("r", "gram"))
    for block in make_stream(n, 4 * max(n, LOADER_ROWS), seed=2):
        stats.update(block)
    _ = stats.r.R  # flush the buffer before timing
    g = torch.Generator().manual_seed(3)
    out = []
    for m in (n, 4 * n):
        W = torch.randn(m, n, generator=g) / n**0.5
        rank = n // 4
        t = race({meth: lambda W=W, meth=meth, rank=rank: decompose(W, stats, method=meth).factors(rank)
                  for meth in ("coala", "svd-llm")}, cfg["repeats"], bar)
        out.append({"shape": f"{m} × {n}", "rank": rank, **t, "ratio": t["coala"] / t["svd-llm"]})
    return out


# ---------------------------------------------------------------------------------------------- reporting
def plot(path: Path, streams: list[dict], sweep: list[dict], sweep_gram: float, solve: list[dict],
         sweep_n: int) -> None:
    """The four panels (streams, block size, leaf width, solve) saved to ``path``."""
    fig, axes = new_figure(2, 2, figsize=(12, 8.4))
    axes = axes.ravel()
    ax = axes[0]
    labels = [f"n={r['n']}\n{r['rows']:,} rows" for r in streams]
    x = torch.arange(len(streams)).tolist()
    for i, (key, name) in enumerate((("gram", "Gram G += XᵀX"), ("r", "streaming R (coala)"),
                                     ("mono", "monolithic qr(X)"))):
        ax.bar([v + (i - 1) * 0.27 for v in x], [r[key] for r in streams], width=0.27, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title("statistics of one input stream (float32)")
    ax.legend(fontsize=8)
    ax = axes[1]
    rf = [r for r in sweep if r["route"] == "RFactor"]
    ax.plot([r["block_rows"] for r in rf], [r["s"] for r in rf], "o-", label="RFactor(block_rows=b)")
    prev = next(r for r in sweep if r["route"].startswith("stacked"))
    ax.plot([prev["block_rows"]], [prev["s"]], "s", color="C3", label="stacked geqrf, b=4n (previous)")
    ax.axhline(sweep_gram, color="k", ls="--", lw=1, label="Gram")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per QR update b")
    ax.set_ylabel("seconds")
    ax.set_title(f"block size, n = {sweep_n}")
    ax.legend(fontsize=8)
    ax = axes[2]
    lw = [r for r in sweep if r["route"] == "RFactor, leaf width"]
    ax.plot([r["leaf"] for r in lw], [r["s"] for r in lw], "o-", label=f"block_rows = {lw[0]['block_rows']}")
    ax.axhline(sweep_gram, color="k", ls="--", lw=1, label="Gram")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("columns per LAPACK geqrf call (qr_update.LEAF)")
    ax.set_ylabel("seconds")
    ax.set_title(f"kernel leaf width, n = {sweep_n} (shipped: {qr.LEAF})")
    ax.legend(fontsize=8)
    ax = axes[3]
    x = list(range(len(solve)))
    ax.bar([v - 0.2 for v in x], [r["coala"] for r in solve], width=0.4, label="coala (SVD of W Rᵀ)")
    ax.bar([v + 0.2 for v in x], [r["svd-llm"] for r in solve], width=0.4, label="svd-llm (chol, inv, SVD)")
    ax.set_xticks(x, [f"W {r['shape']}\nrank {r['rank']}" for r in solve])
    ax.set_ylabel("seconds")
    ax.set_title("per-layer solve: statistics → factors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(d: Path, streams: list[dict], sweep: list[dict], sweep_gram: float, solve: list[dict], cfg: dict,
           wall: float) -> str:
    """Write runtime.md to ``d``; returns its tables as markdown."""
    t1 = markdown_table(
        ["n", "rows", "block_rows", "Gram s", "stream R s", "mono QR s", "R / Gram", "R / mono QR", "mono / Gram",
         "Gram GFLOP/s", "R GFLOP/s"],
        [[r["n"], r["rows"], r["block_rows"], r["gram"], r["r"], r["mono"], r["r/gram"], r["r/mono"],
          r["mono/gram"], r["gram_gflops"], r["r_gflops"]] for r in streams])
    t2 = markdown_table(["route", "b (rows per update)", "leaf width", "s", "× Gram"],
                        [[r["route"], r["block_rows"], r["leaf"], r["s"], r["x_gram"]] for r in sweep])
    t3 = markdown_table(["W", "rank", "coala s", "svd-llm s", "coala / svd-llm"],
                        [[r["shape"], r["rank"], r["coala"], r["svd-llm"], r["ratio"]] for r in solve])
    ratios = "\n".join(
        [f"- n = {r['n']}: stream-R / mono-QR = {r['r/mono']:.2f}, stream-R / Gram = {r['r/gram']:.2f}"
         for r in streams]
        + [f"- solve W {r['shape']}: coala / svd-llm = {r['ratio']:.2f}" for r in solve])
    text = (f"## Streaming statistics (float32, loader blocks of {LOADER_ROWS} rows)\n\n{t1}\n\n"
            f"## RFactor block size, n = {cfg['sweep_n']}, {cfg['sweep_rows']:,} rows (Gram: {sweep_gram:.3g} s)"
            f"\n\n{t2}\n\n## Per-layer solve (statistics → factors, float32)\n\n{t3}\n\n## Ratios\n\n{ratios}\n")
    notes = (f"Minimum of {cfg['repeats']} interleaved runs; GFLOP/s counts 2·rows·n² for both. "
             f"Threads: {torch.get_num_threads()}. Wall time of the whole benchmark: {wall:.0f} s.")
    write_markdown(d / "runtime.md", "Runtime: streaming R factor vs Gram, QR and solve", text, notes)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/runtime)")
    ap.add_argument("--quick", action="store_true", help="n = 256, 512, small streams (≈ 20 s)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure, the minimum is kept (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        cfg["repeats"] = args.repeats
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    d = out_dir(args.out, "runtime")
    from tqdm.auto import tqdm

    total = cfg["repeats"] * (3 * len(cfg["rows"]) + len(SWEEP_BLOCKS) + len(SWEEP_LEAVES) + 2 + 4)
    print(machine())
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=total, desc="runtime", leave=False) as bar:
        streams = bench_streams(cfg, bar)
        sweep, sweep_gram = bench_sweep(cfg, bar)
        solve = bench_solve(cfg, bar)
    wall = time.perf_counter() - t0
    plot(d / "runtime.png", streams, sweep, sweep_gram, solve, cfg["sweep_n"])
    print(report(d, streams, sweep, sweep_gram, solve, cfg, wall))
    print(f"wall time {wall:.0f} s; wrote {d / 'runtime.md'} and {d / 'runtime.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
