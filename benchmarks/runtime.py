"""Cost of the streaming R factor against the streaming Gram, per width and thread count; the per-layer route
against SVD-LLM's; what the thread default does on a busy machine; the kernel's tunables; the GPU.

Run: ``python benchmarks/runtime.py [--quick] [--threads 1,2] [--sections streams,route,busy,sweep,gpu]`` from the
repository root (or ``coala bench runtime``). Every figure is a median over ``--repeats`` interleaved runs (the
tasks alternate, so that load on a shared machine hits all of them alike); ratios come from one run.

1. streams: for n = 576 (SmolLM2's width), 1024, 2048, 4096 and each thread count (default: 1, 2 and torch's
   default), the same stream of loader blocks (2048 rows, float32, log-spaced column scales) into ``RFactor``
   (default block rows and lanes) and into ``GramAccumulator`` (G += XᵀX, one GEMM per block, as SVD-LLM), R read at
   the end (lanes merged). Printed: R / Gram per (n, threads); target ≤ 1.3.
2. route: the per-layer route, statistics + factors, 32,768 tokens, W (n × n), rank n/4, n = 1024 and 4096:
   coala (RFactor, SVD of W Rᵀ) against SVD-LLM (Gram, float64 Cholesky and inverse, SVD of W L). Target ≤ 1.0.
3. busy (2 threads' worth of cores or fewer): one other process spins on a core, as on a shared machine; R stream,
   Gram stream and a 1536 × 576 SVD at 1 and 2 threads — why coala's command line defaults to 1 thread there.
4. sweep (n = 576 and 1024, each thread count): rows per update and lane, panel and leaf width of the kernel
   (``qr_update.PANEL/LEAF``).
5. gpu (only when CUDA is available): n = 1024 and 4096, 262,144 rows: Gram against the stacked geqrf (one
   cuSOLVER geqrf of [R; X_b] per block, what RFactor does on a GPU) and the blocked kernel run on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import coala.linalg.qr_update as qr
from coala.linalg import RFactor, decompose
from coala.linalg.lapack import svd
from coala.linalg.stats import ActivationStats, GramAccumulator
from coala.linalg.tsqr import default_block_rows, default_lanes

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

from _report import machine, markdown_table, new_figure, out_dir, write_markdown

LOADER_ROWS = 2048
FULL = {"streams": {576: 65_536, 1024: 65_536, 2048: 32_768, 4096: 32_768}, "route": (1024, 4096),
        "route_rows": 32_768, "sweep_n": (576, 1024), "sweep_rows": 65_536, "gpu": (1024, 2048, 4096),
        "gpu_rows": 262_144, "repeats": 3}
QUICK = {"streams": {256: 16_384, 576: 16_384}, "route": (256,), "route_rows": 8_192, "sweep_n": 256,
         "sweep_rows": 16_384, "gpu": (256,), "gpu_rows": 32_768, "repeats": 2}
SECTIONS = ("streams", "route", "busy", "sweep", "gpu")


@dataclass
class Stream:
    """``count`` loader blocks (LOADER_ROWS × n), cycled from a pool of distinct blocks."""

    pool: list[Tensor]
    count: int

    def __iter__(self) -> Iterator[Tensor]:
        return (self.pool[i % len(self.pool)] for i in range(self.count))

    @property
    def n(self) -> int:
        return self.pool[0].shape[1]

    @property
    def rows(self) -> int:
        return self.count * LOADER_ROWS


def make_stream(n: int, rows: int, seed: int = 0, device: str = "cpu") -> Stream:
    """About ``rows`` rows of width ``n``: 8 random blocks with log-spaced column scales, cycled."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n)
    return Stream([(torch.randn(LOADER_ROWS, n, generator=g) * scales).to(device) for _ in range(8)],
                  max(1, rows // LOADER_ROWS))


def gram_stream(s: Stream) -> Tensor:
    acc = GramAccumulator(s.n, device=s.pool[0].device)
    for block in s:
        acc.add_rows(block)
    return acc.G


def r_stream(s: Stream, **kw) -> Tensor:
    f = RFactor(s.n, device=s.pool[0].device, **kw)
    for block in s:
        f.add_rows(block)
    return f.R


CLOCK: list[Callable[[], float]] = [time.perf_counter]  # --clock cpu: time.process_time


def race(tasks: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
         ) -> dict[str, float]:
    """Median time of each task over ``repeats`` rounds (wall, or this process's CPU time with --clock cpu); the
    tasks alternate within a round."""
    clock = CLOCK[0]
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for fn in tasks.values():  # warm-up: allocations, thread pools, LAPACK self-check
        fn()
    for _ in range(repeats):
        for name, fn in tasks.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def with_threads(count: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        old = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)
    return run


# ---------------------------------------------------------------------------------------------- the sections
def bench_streams(cfg: dict, threads: list[int]) -> list[dict]:
    out = []
    for n, rows in cfg["streams"].items():
        s = make_stream(n, rows, seed=n)
        for t in threads:
            torch.set_num_threads(t)
            r = race({"gram": lambda s=s: gram_stream(s), "r": lambda s=s: r_stream(s)}, cfg["repeats"])
            out.append({"n": n, "threads": t, "rows": s.rows, "block_rows": default_block_rows(n),
                        "lanes": default_lanes(n), **r, "ratio": r["r"] / r["gram"]})
    return out


def bench_route(cfg: dict, threads: list[int]) -> list[dict]:
    """Statistics + factors: coala (R, SVD of W Rᵀ) against SVD-LLM (Gram, Cholesky, inverse, SVD of W L)."""
    out = []
    for n in cfg["route"]:
        s = make_stream(n, cfg["route_rows"], seed=2 * n)
        W = torch.randn(n, n, generator=torch.Generator().manual_seed(3)) / n**0.5
        rank = n // 4

        def route(method: str, kind: str, s=s, W=W, rank=rank, n=n) -> None:
            stats = ActivationStats(n, (kind,))
            for block in s:
                stats.update(block)
            decompose(W, stats, method=method).factors(rank)

        for t in threads:
            torch.set_num_threads(t)
            r = race({"coala": lambda route=route: route("coala", "r"),
                      "svd-llm": lambda route=route: route("svd-llm", "gram")}, cfg["repeats"])
            out.append({"n": n, "threads": t, "rows": s.rows, **r, "ratio": r["coala"] / r["svd-llm"]})
    return out


def bench_busy(cfg: dict) -> list[dict]:
    """R / Gram streams and a small SVD at 1 and 2 threads while another process spins on one core."""
    n = cfg["sweep_n"][-1] if isinstance(cfg["sweep_n"], (tuple, list)) else cfg["sweep_n"]
    s = make_stream(n, 16_384, seed=5)
    M = torch.randn(1536, 576, generator=torch.Generator().manual_seed(6))
    tasks: dict[str, Callable[[], object]] = {}
    for t in (1, 2):
        tasks[f"gram@{t}"] = with_threads(t, lambda: gram_stream(s))
        tasks[f"r@{t}"] = with_threads(t, lambda: r_stream(s))
        tasks[f"svd@{t}"] = with_threads(t, lambda: svd(M))
        tasks[f"svd-mkl-threads@{t}"] = with_threads(t, lambda: torch.linalg.svd(M, full_matrices=False))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        r = race(tasks, cfg["repeats"])
    finally:
        spinner.kill()
        spinner.wait()
    return [{"task": k.split("@")[0], "threads": int(k.split("@")[1]), "s": v} for k, v in r.items()]


def bench_sweep(cfg: dict, threads: list[int]) -> list[dict]:
    """Rows per update (per lane), panel and leaf width, for each sweep width and thread count."""
    out = []
    widths = cfg["sweep_n"] if isinstance(cfg["sweep_n"], (tuple, list)) else (cfg["sweep_n"],)
    for n in widths:
        s = make_stream(n, cfg["sweep_rows"], seed=1)
        for t in threads:
            torch.set_num_threads(t)
            tasks: dict[str, Callable[[], object]] = {"gram": lambda s=s: gram_stream(s)}
            for b in (2048, 4096, 8192, 16384):
                tasks[f"block_rows={b}"] = lambda b=b, s=s: r_stream(s, block_rows=b)
            for panel, leaf in ((64, 16), (64, 32), (128, 16), (128, 32), (128, 64), (128, 128), (256, 32)):
                def tuned(panel=panel, leaf=leaf, s=s) -> Tensor:
                    old = qr.PANEL, qr.LEAF
                    qr.PANEL, qr.LEAF = panel, leaf
                    try:
                        return r_stream(s)
                    finally:
                        qr.PANEL, qr.LEAF = old
                tasks[f"panel={panel} leaf={leaf}"] = tuned
            r = race(tasks, cfg["repeats"])
            out += [{"n": n, "threads": t, "setting": k, "s": v, "x_gram": v / r["gram"]}
                    for k, v in r.items() if k != "gram"]
    return out


def bench_gpu(cfg: dict, device: str = "cuda") -> list[dict]:
    """Gram; RFactor's GPU route (one stacked geqrf per update) at its default rows per update and at 4n rows
    (the default before 65,536); the blocked kernel; one QR of all rows at once (memory N·n) on ``device``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = []
    for n in cfg["gpu"]:
        s = make_stream(n, cfg["gpu_rows"], seed=7, device=device)

        def blocked(s=s, n=n) -> Tensor:
            kind = torch.device(device).type
            added = kind not in qr.BLOCKED_DEVICES
            qr.BLOCKED_DEVICES.add(kind)
            try:
                return r_stream(s, block_rows=max(4 * n, 8192))
            finally:
                if added:
                    qr.BLOCKED_DEVICES.discard(kind)

        r = race({"gram": lambda s=s: gram_stream(s), "stacked": lambda s=s: r_stream(s),
                  "stacked 4n": lambda s=s, n=n: r_stream(s, block_rows=4 * n), "blocked": blocked,
                  "one QR": lambda s=s: torch.linalg.qr(torch.cat(list(s)), mode="r")[1]}, cfg["repeats"], sync)
        out.append({"n": n, "rows": s.rows, **r, **{f"{k}/gram": r[k] / r["gram"] for k in r if k != "gram"}})
    return out


# ---------------------------------------------------------------------------------------------- reporting
def report(res: dict, cfg: dict, wall: float) -> str:
    parts = []
    if "streams" in res:
        parts.append("## Streaming statistics: R / Gram (float32, loader blocks of 2048 rows)\n\n" + markdown_table(
            ["n", "threads", "rows", "block rows", "lanes", "Gram s", "stream R s", "R / Gram"],
            [[r["n"], r["threads"], r["rows"], r["block_rows"], r["lanes"], r["gram"], r["r"], r["ratio"]]
             for r in res["streams"]]))
    if "route" in res:
        parts.append("## Per-layer route: statistics + factors, W (n × n), rank n/4\n\n" + markdown_table(
            ["n", "threads", "tokens", "coala s", "SVD-LLM s", "coala / SVD-LLM"],
            [[r["n"], r["threads"], r["rows"], r["coala"], r["svd-llm"], r["ratio"]] for r in res["route"]]))
    if "busy" in res:
        parts.append("## One other process spinning on a core\n\n" + markdown_table(
            ["task", "threads", "s"], [[r["task"], r["threads"], r["s"]] for r in res["busy"]]))
    if "sweep" in res:
        parts.append(f"## Kernel settings (shipped: panel {qr.PANEL}, leaf {qr.LEAF}, block rows per lane "
                     "default_block_rows(n, lanes))\n\n" + markdown_table(
                         ["n", "threads", "setting", "s", "× Gram"],
                         [[r["n"], r["threads"], r["setting"], r["s"], r["x_gram"]] for r in res["sweep"]]))
    if "gpu" in res:
        parts.append("## GPU: streaming R (× Gram)\n\n" + markdown_table(
            ["n", "rows", "Gram s", "stacked geqrf (default rows)", "stacked, 4n rows", "blocked kernel",
             "one QR of all rows"],
            [[r["n"], r["rows"], r["gram"], r["stacked/gram"], r["stacked 4n/gram"], r["blocked/gram"],
              r["one QR/gram"]] for r in res["gpu"]]))
    ratios = [f"- stream R / Gram, n = {r['n']}, {r['threads']} thread(s): {r['ratio']:.2f}"
              for r in res.get("streams", [])]
    ratios += [f"- route coala / SVD-LLM, n = {r['n']}, {r['threads']} thread(s): {r['ratio']:.2f}"
               for r in res.get("route", [])]
    ratios += [f"- GPU n = {r['n']}: stacked / Gram {r['stacked/gram']:.2f}, blocked / Gram {r['blocked/gram']:.2f}"
               for r in res.get("gpu", [])]
    return "\n\n".join(parts) + "\n\n## Ratios\n\n" + "\n".join(ratios) + (
        f"\n\nMedian of {cfg['repeats']} interleaved runs ({'CPU' if CLOCK[0] is time.process_time else 'wall'} "
        f"time). Load average at the end: {load()}. "
        f"Wall time of the whole benchmark: {wall:.0f} s.\n")


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def plot(path: Path, res: dict) -> None:
    keys = [k for k in ("streams", "route") if k in res]
    if not keys:
        return
    fig, axes = new_figure(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for t in sorted({r["threads"] for r in res[key]}):
            pts = [(r["n"], r["ratio"]) for r in res[key] if r["threads"] == t]
            ax.plot(*zip(*pts, strict=True), "o-", label=f"{t} thread(s)")
        ax.axhline(1.3 if key == "streams" else 1.0, color="k", ls="--", lw=1, label="target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (in_features)")
        ax.set_title("stream R / Gram" if key == "streams" else "per-layer route: coala / SVD-LLM")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/runtime)")
    ap.add_argument("--quick", action="store_true", help="small widths and streams (≈ 1 min)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure, the median is kept (default 3)")
    ap.add_argument("--threads", default=None, help="thread counts, e.g. 1,2 (default: 1, 2 and torch's default)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine; meaningful for one "
                         "thread only: with more it adds the threads' times up)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        cfg["repeats"] = args.repeats
    default = torch.get_num_threads()
    threads = sorted({int(t) for t in args.threads.split(",")} if args.threads else {1, 2, default})
    if any(t < 1 for t in threads):
        raise ValueError(f"--threads must be positive, got {args.threads}")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    d = out_dir(args.out, "runtime")
    print(machine(), f"(default threads {default}); load average {load()}")
    t0 = time.perf_counter()
    res: dict = {}
    with torch.inference_mode():
        if "streams" in sections:
            res["streams"] = bench_streams(cfg, threads)
        if "route" in sections:
            res["route"] = bench_route(cfg, threads)
        if "busy" in sections:
            res["busy"] = bench_busy(cfg)
        if "sweep" in sections:
            res["sweep"] = bench_sweep(cfg, threads)
        if "gpu" in sections and torch.cuda.is_available():
            res["gpu"] = bench_gpu(cfg)
    torch.set_num_threads(default)
    text = report(res, cfg, time.perf_counter() - t0)
    write_markdown(d / "runtime.md", "Runtime: streaming R factor vs Gram, per-layer route, threads", text)
    plot(d / "runtime.png", res)
    print(text)
    print(f"wrote {d / 'runtime.md'} and {d / 'runtime.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
