"""Peak memory of the streaming R factor is flat in the number of rows.

Run: ``python benchmarks/memory.py [--quick]`` from the repository root (or ``coala bench memory``).

Each size runs in a fresh Python subprocess, which imports torch and coala, runs a tiny warm-up (n = 32, so that
lazily loaded library code is not counted), records its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), then feeds an ``RFactor(n)`` (float32, default buffering) with
loader blocks of 2048 rows generated on the fly (``torch.randn``; all rows are never materialised), reads R, and
records its peak RSS again. The figure is the increase of the peak: everything the stream needed (block, buffer,
R, QR workspace, BLAS buffers, allocator slack). RSS, unlike tracemalloc, sees torch's allocations. The
subprocesses run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072): blocks above 128 KB are
mapped and unmapped, so RSS follows live memory. With glibc's dynamic threshold, freed multi-MB blocks (loader
blocks, the isfinite mask of each block) are kept in the heap and the peak moves by one or two blocks between
runs, whatever the row count (``--malloc-default`` to see it).
Sizes: 3·10⁴, 10⁵, 10⁶ rows at n = 1024 (≈ 4 GB of float32 data streamed at 10⁶; ≈ 1–2 min on 2 cores): the
smallest is above lanes × block rows (2 × 8192 at n = 1024 with two threads), the rows the buffers hold before the
first update, after which memory no longer grows. ``--quick``: 3·10⁴ and 10⁵ rows at n = 256. Target: the largest
increase within 10 % of the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

LOADER_ROWS = 2048
TOLERANCE = 0.10
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, made fixed: blocks above it are mmapped and returned on free


def child(rows: int, n: int, seed: int) -> dict:
    """Run in the subprocess: stream ``rows`` random rows of width ``n`` through an RFactor; report peak RSS."""
    import resource

    import torch

    from coala.linalg import RFactor
    from coala.linalg.tsqr import default_block_rows

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    g = torch.Generator().manual_seed(seed)
    warm = RFactor(32, block_rows=64)  # loads the QR / BLAS code paths (library pages count in RSS) on tiny data
    for _ in range(3):
        warm.update(torch.randn(50, 32, generator=g))
    _ = warm.R
    del warm
    f = RFactor(n)
    before = peak_mb()
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        take = min(LOADER_ROWS, rows - done)
        f.update(torch.randn(take, n, generator=g))
        done += take
    R = f.R
    seconds = time.perf_counter() - t0
    assert f.num_rows == rows and bool(torch.isfinite(R).all())
    return {"rows": rows, "n": n, "before_mb": before, "peak_mb": peak_mb(), "seconds": seconds,
            "block_rows": default_block_rows(n), "lanes": f.lanes, "threads": torch.get_num_threads()}


def run_child(rows: int, n: int, seed: int, threads: int | None, fixed_mmap: bool = True) -> dict:
    """``child(rows, n, seed)`` in a fresh Python subprocess; returns its report."""
    code = ("import json, sys, torch\n"
            + (f"torch.set_num_threads({threads})\n" if threads else "")
            + f"sys.path.insert(0, {str(HERE)!r})\nfrom memory import child\n"
            + f"print(json.dumps(child({rows}, {n}, {seed})))\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)) if fixed_mmap else None
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {rows} rows failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status (1: --check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/memory)")
    ap.add_argument("--quick", action="store_true", help="3·10⁴ and 10⁵ rows at n = 256 (a few seconds)")
    ap.add_argument("--n", type=int, default=None, help="in_features (default 1024; quick 256)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the subprocesses (default: torch's)")
    ap.add_argument("--check", action="store_true", help="exit with status 1 if the peak is not flat within 10 %%")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc malloc's dynamic mmap threshold on (default: MALLOC_MMAP_THRESHOLD_=131072)")
    args = ap.parse_args(argv)
    n = args.n or (256 if args.quick else 1024)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    sizes = (30_000, 100_000) if args.quick else (30_000, 100_000, 1_000_000)

    from tqdm.auto import tqdm

    from _report import machine, markdown_table, new_figure, out_dir, write_markdown

    d = out_dir(args.out, "memory")
    print(machine())
    t0 = time.perf_counter()
    results = [run_child(rows, n, seed=i, threads=args.threads, fixed_mmap=not args.malloc_default)
               for i, rows in enumerate(tqdm(sizes, desc="memory", leave=False))]
    wall = time.perf_counter() - t0
    for r in results:
        r["increase_mb"] = r["peak_mb"] - r["before_mb"]
        r["data_mb"] = r["rows"] * n * 4 / 2**20
    inc = [r["increase_mb"] for r in results]
    spread = max(inc) / min(inc) - 1.0
    flat = spread <= TOLERANCE
    lanes = results[0]["lanes"]  # partial factors (one per thread): each has its R and its share of the buffer
    model_mb = (lanes * (n * n + results[0]["block_rows"] * n) + LOADER_ROWS * n) * 4 / 2**20

    table = markdown_table(
        ["rows", "n", "data streamed (MB)", "peak RSS before (MB)", "peak RSS after (MB)", "peak increase (MB)",
         "seconds"],
        [[r["rows"], r["n"], r["data_mb"], r["before_mb"], r["peak_mb"], r["increase_mb"], r["seconds"]]
         for r in results])
    malloc_note = ("glibc malloc with its default, dynamic mmap threshold." if args.malloc_default else
              f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}: blocks above 128 KB are mmapped and returned to the system "
              "when freed, so RSS follows live memory; with glibc's dynamic threshold, freed multi-MB blocks stay "
              "in the heap and the peak differs by one or two blocks (±8–16 MB at n = 1024) between runs of any "
              "size, up or down (--malloc-default).")
    verdict = (f"Peak increase spread (max / min − 1): {100 * spread:.1f} % — "
               f"{'flat' if flat else 'NOT flat'} within {100 * TOLERANCE:.0f} %.")
    notes = (f"{verdict}\n\nFloat32 RFactor, block_rows = {results[0]['block_rows']}, {lanes} lane(s), loader blocks "
             f"of {LOADER_ROWS} rows generated on the fly; each size in a fresh subprocess ({results[0]['threads']} "
             f"torch threads). Expected resident data: lanes × (R + block rows) + one loader block = {model_mb:.0f} "
             "MB; the rest is QR workspace (per lane), "
             f"BLAS buffers and allocator slack. {malloc_note} Wall time of the whole benchmark: {wall:.0f} s.")
    write_markdown(d / "memory.md", f"Memory: streaming R factor, n = {n}", table, notes)

    fig, ax = new_figure(figsize=(6, 4))
    ax.plot([r["rows"] for r in results], inc, "o-", label="RFactor peak RSS increase")
    ax.plot([r["rows"] for r in results], [r["data_mb"] for r in results], "s--", color="C3",
            label="size of all rows (if materialised)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows streamed")
    ax.set_ylabel("MB")
    ax.set_title(f"streaming R factor, n = {n}, float32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "memory.png", dpi=120)

    print(table)
    print(notes)
    print(f"wrote {d / 'memory.md'} and {d / 'memory.png'}")
    return 1 if (args.check and not flat) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
