"""The one verb: ``compress(model, calibration, config) -> CompressionReport``.

Block by block (``coala.calibrate.BlockWalker``): catch block 0's inputs; then for each block: stream every
calibration batch through it while hooks feed one ``ActivationStats`` per distinct input (q/k/v share one,
gate/up share one; padding rows excluded), solve each targeted linear layer with the chosen method, swap in
``LowRankLinear`` layers, and compute the block's outputs as the next block's inputs.

``propagate="compressed"`` (default, sequential): the next block sees the outputs of the block after its
layers were replaced, so later blocks are calibrated on the activations they will really receive.
``propagate="original"``: the next block sees the outputs of the unchanged block (SVD-LLM's profiling);
then every layer's statistics are those of the original model, which is what ``collect_statistics`` +
``apply_low_rank`` use to solve many methods / ratios from one pass.

Ranks: ``rank_for_ratio`` (uniform ratio) for every method except svd-llm-v2, which first runs a probe pass
(original propagation) to measure each matrix's truncation loss at the uniform ratio and then uses SVD-LLM
V2's per-group allocation. ``CompressConfig.rank`` forces one rank everywhere ("full" = min(out, in)).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ._resume import (
    INTERRUPT_ENV,
    SimulatedInterruption,
    fingerprint,
    maybe_interrupt,
    offload_dir,
    prepare_output,
)
from .calibrate import BlockWalker, _model_device, normalize_batches, stats_to
from .compress_report import CompressionReport, LayerReport, peak_memory
from .layer_solve import layer_kind, plan_ranks, restore_block, sensitivity_plan, solve_layers, v2_plan
from .linalg.decomposition import Decomposition
from .linalg.methods import decompose, get_method
from .linalg.stats import ActivationStats
from .lowrank import dense_weight
from .sensitivity import PROBE_RATIOS

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
ALLOCATIONS = ("auto", "uniform", "sensitivity")


@dataclass
class CompressConfig:
    """Settings of ``compress`` (defaults are the README's: 20 % removed with COALA, μ = 0).

    Attributes:
        ratio: fraction of the targeted matrices' parameters removed, in (0, 1) (design.md §6).
        method: "coala", "svd", "asvd", "svd-llm" or "svd-llm-v2".
        mu, adaptive_mu: COALA's regularisation (μ ≥ 0; the paper's adaptive rule).
        targets: names of linear layers inside the blocks ("q_proj", "mlp.down_proj", …); None = all.
        rank: force one rank for every targeted matrix (an int, or "full" = min(out, in)); ``ratio`` is
            then ignored and every targeted matrix is replaced, saving parameters or not.
        propagate: "compressed" (sequential) or "original" (see the module docstring).
        allocation: how ranks follow from ``ratio``: "auto" (svd-llm-v2: its published per-group allocation;
            every other method: "uniform"), "uniform" (the same ratio for every matrix, design.md §6), or
            "sensitivity" (``coala.sensitivity``: each matrix truncated alone at ``probe_ratios`` while the
            whole model runs ``sensitivity_samples`` calibration samples where it lives; ranks then minimise
            the summed output change under the budget). Ignored when ``rank`` is set.
        device: where each block is computed ("cuda", "cpu"; default: where the model is).
        offload_hidden: keep the calibration samples' hidden states in files (in ``work_dir``, else a temporary
            folder) instead of host memory, which then no longer grows with ``nsamples``; same results.
        stats_dtype: accumulation dtype of R factors / Gram matrices: "float32" or "float64".
        error_stats: also collect R for methods that do not need it, to report the weighted error.
        nsamples, seqlen, seed, calib_mode, batch_size: used when ``calibration`` is a source name or path
            ("auto" mode = "windows" for generative models, "sentences" for encoders).
        out_dir: write the compressed model there (atomically) at the end; None = leave it in memory.
        work_dir: checkpoint folder (default ``out_dir + ".partial"``); used only with ``out_dir``.
        resume: continue an interrupted run from ``work_dir`` (identical result to an uninterrupted run).
        overwrite: replace an existing ``out_dir`` and discard a stale ``work_dir``.
        progress: tqdm progress bars.
    """

    ratio: float | None = 0.2
    method: str = "coala"
    mu: float = 0.0
    adaptive_mu: bool = False
    targets: list[str] | None = None
    rank: int | str | None = None
    propagate: str = "compressed"
    allocation: str = "auto"
    sensitivity_samples: int = 64
    probe_ratios: tuple[float, ...] = PROBE_RATIOS
    device: str | None = None
    offload_hidden: bool = False
    stats_dtype: str = "float32"
    error_stats: bool = True
    nsamples: int = 256
    seqlen: int = 2048
    seed: int = 0
    calib_mode: str = "auto"
    batch_size: int | None = None
    out_dir: str | None = None
    work_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    max_shard_size: int | str = "2GB"
    progress: bool = True

    def validate(self) -> CompressConfig:
        """Check every setting; ValueError / TypeError naming the argument. Returns self."""
        m = get_method(self.method)
        if self.rank is None:
            r = self.ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) < 1.0:
                raise ValueError(f"ratio must be strictly between 0 and 1 (the fraction of the targeted "
                                 f"parameters removed), got {r!r}")
        elif self.rank != "full" and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive int or 'full', got {self.rank!r}")
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not 0.0 <= self.mu < float("inf"):
            raise ValueError(f"mu must be a finite number >= 0, got {self.mu!r}")
        if (self.mu or self.adaptive_mu) and not m.uses_mu:
            raise ValueError(f"mu / adaptive_mu apply to method 'coala' only, not {self.method!r}")
        if self.propagate not in ("compressed", "original"):
            raise ValueError(f"propagate must be 'compressed' or 'original', got {self.propagate!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if isinstance(self.sensitivity_samples, bool) or not isinstance(self.sensitivity_samples, int) \
                or self.sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be a positive int, got {self.sensitivity_samples!r}")
        if not self.probe_ratios or not all(isinstance(p, (int, float)) and 0.0 < p < 1.0 for p in self.probe_ratios):
            raise ValueError(f"probe_ratios must be numbers in (0, 1), got {self.probe_ratios!r}")
        if self.allocation == "sensitivity" and self.rank is None and self.ratio > max(self.probe_ratios):
            raise ValueError(f"ratio {self.ratio} exceeds the deepest probe ratio {max(self.probe_ratios)}: the "
                             "sensitivity allocation does not extrapolate; add a deeper probe_ratios entry")
        if self.stats_dtype not in _DTYPES:
            raise ValueError(f"stats_dtype must be 'float32' or 'float64', got {self.stats_dtype!r}")
        if self.calib_mode not in ("auto", "windows", "sentences"):
            raise ValueError(f"calib_mode must be 'auto', 'windows' or 'sentences', got {self.calib_mode!r}")
        if isinstance(self.targets, str):
            raise TypeError(f"targets must be a list of names, not the string {self.targets!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device {self.device!r} is not a torch device: {err}") from err
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        if self.resume and not self.out_dir:
            raise ValueError("resume needs out_dir (the checkpoint lives beside it)")
        return self

    def kinds(self, methods: list[str] | None = None) -> set[str]:
        """Statistics to collect: the union of the methods' needs, plus R when ``error_stats``."""
        kinds: set[str] = set()
        for name in methods or [self.method]:
            kinds |= set(get_method(name).needs)
        return kinds | ({"r"} if self.error_stats else set())


def _calibration_set(model: nn.Module, calibration, config: CompressConfig, tokenizer) -> tuple[list, dict]:
    """Batches + a JSON description, from a source name / path (tokenized here) or ready batches."""
    if isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None:
            raise TypeError("a tokenizer is needed to tokenize the calibration source "
                            f"{str(calibration)!r} (pass tokenizer=)")
        from .data import calibration_batches

        mode = config.calib_mode
        if mode == "auto":
            can_generate = getattr(model, "can_generate", None)
            mode = "windows" if callable(can_generate) and can_generate() else "sentences"
        cfg = getattr(model, "config", None)
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        cal = calibration_batches(calibration, tokenizer, nsamples=config.nsamples, seqlen=config.seqlen,
                                  seed=config.seed, mode=mode, batch_size=config.batch_size, max_positions=max_pos)
        return cal.batches, cal.description
    if hasattr(calibration, "batches") and hasattr(calibration, "description"):
        return normalize_batches(calibration.batches), dict(calibration.description)
    batches = normalize_batches(calibration)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return batches, {"source": "batches", "batches": len(batches), "tokens": tokens}


def compress(model: nn.Module, calibration="builtin", config: CompressConfig | None = None, *,
             tokenizer=None) -> CompressionReport:
    """Compress ``model`` in place, block by block; optionally write it to ``config.out_dir``.

    Args:
        model: a transformers model (any architecture whose blocks are an nn.ModuleList), on the CPU or a
            device; it is put in eval mode. Each block visits ``config.device`` in turn.
        calibration: "builtin", "wikitext2", "c4", a .txt / .jsonl path (needs ``tokenizer``), a
            ``coala.data.CalibrationSet``, or an iterable of batches (dicts with "input_ids" and optionally
            "attention_mask", or bare input-id tensors).
        config: ``CompressConfig`` (default: 20 % removed with COALA).
        tokenizer: to tokenize a named calibration source, and saved with the model.

    Returns a ``CompressionReport``. Errors (ValueError / TypeError / FileNotFoundError / FileExistsError) are
    raised before anything is written when the inputs are bad; NaN activations raise a ValueError naming the
    layer. With ``out_dir``, the model is written atomically, so a failure leaves no half-written folder; the
    in-memory ``model`` may then hold the blocks finished so far (their checkpoint lets ``resume`` go on).
    """
    config = (config or CompressConfig()).validate()
    t_start = time.perf_counter()
    ckpt = prepare_output(config)
    batches, description = _calibration_set(model, calibration, config, tokenizer)
    model.eval()
    walker = BlockWalker(model, batches, targets=config.targets, device=config.device, progress=config.progress,
                         offload_dir=offload_dir(config, ckpt))
    shapes = {name: _shape(m) for layers in walker.layers for name, m in layers.items()}
    kinds = config.kinds()
    dtype = _DTYPES[config.stats_dtype]
    params_before = sum(p.numel() for p in model.parameters())
    done, started, solve_s, allocation_s = 0, False, 0.0, 0.0
    allocation = _allocation(config)
    plan = plan_ranks(shapes, config) if allocation == "uniform" else None
    rows: list[LayerReport] = []
    try:
        if ckpt is not None:
            fp = fingerprint(model, batches, description, config, walker.device)
            done, started = ckpt.start(fp), True
            if done:
                plan = ckpt.load_block(0)[1]["plan"]
        with torch.no_grad():
            if plan is None and allocation == "svd-llm-v2":
                plan, probe_s = v2_plan(walker, shapes, config, dtype)
                solve_s += probe_s
            elif plan is None:
                plan, allocation_s = sensitivity_plan(walker, shapes, config, dtype)
            if kinds or done:
                walker.catch()
            last = len(walker) - 1
            for i in tqdm(range(len(walker)), desc="compress blocks", disable=not config.progress):
                if i < done:  # resume: rebuild block i and its outputs exactly as the first run did
                    state, meta = ckpt.load_block(i)
                    rows += [LayerReport(**r) for r in meta["layers"]]
                    if config.propagate == "compressed":
                        restore_block(model, state, meta)
                    with walker.on_device(i):
                        walker.run(i, desc=f"replay {walker.block_name(i)}")
                    if config.propagate == "original":
                        restore_block(model, state, meta)
                    continue
                with walker.on_device(i):
                    write = config.propagate == "original" and i < last
                    cap = walker.statistics(i, kinds, dtype=dtype, write=write) if kinds else None
                    t0 = time.perf_counter()
                    new_rows, state = solve_layers(model, walker.layers[i], cap, plan, config)
                    solve_s += time.perf_counter() - t0
                    del cap
                    if config.propagate == "compressed" and i < last and kinds:
                        walker.run(i, desc=f"propagate {walker.block_name(i)}")
                rows += new_rows
                # point at the new layers: the replaced dense weights must not stay alive (memory)
                walker.layers[i] = {name: model.get_submodule(name) for name in walker.layers[i]}
                if ckpt is not None:
                    ckpt.save_block(i, state, {"layers": [asdict(r) for r in new_rows], "plan": plan})
                maybe_interrupt(i)
        walker.close()
        report = CompressionReport(
            method=config.method, ratio=None if config.rank is not None else float(config.ratio),
            mu=float(config.mu), adaptive_mu=config.adaptive_mu, propagate=config.propagate, allocation=allocation,
            layers=rows,
            model_params_before=params_before, model_params_after=sum(p.numel() for p in model.parameters()),
            calibration=description, resumed_blocks=done,
        )
        if config.out_dir:
            from .io import save_compressed

            meta = {"method": config.method, "ratio": config.ratio, "rank_override": config.rank,
                    "mu": config.mu, "adaptive_mu": config.adaptive_mu, "propagate": config.propagate,
                    "allocation": _allocation_meta(config), "targets": config.targets,
                    "stats_dtype": config.stats_dtype, "calibration": description,
                    "totals": report.totals(),
                    "base_model": getattr(getattr(model, "config", None), "_name_or_path", None)}
            save_compressed(model, config.out_dir, meta=json.loads(json.dumps(meta)), tokenizer=tokenizer,
                            max_shard_size=config.max_shard_size, overwrite=config.overwrite)
            ckpt.clear()
            report.output = str(config.out_dir)
    except BaseException:
        walker.close()
        if started and ckpt.finished() == 0:
            ckpt.clear()
        raise
    total = time.perf_counter() - t_start
    report.times = {"calibration_s": walker.calib_seconds, "solve_s": solve_s, "total_s": total}
    if allocation_s:
        report.times["allocation_s"] = allocation_s
    report.peak_memory = peak_memory(walker.device)
    return report


def _allocation(config: CompressConfig) -> str:
    """The allocation actually used: "uniform", "svd-llm-v2" or "sensitivity" ("uniform" when ranks are forced)."""
    if config.rank is not None:
        return "uniform"
    if config.allocation == "auto":
        return "svd-llm-v2" if config.method == "svd-llm-v2" else "uniform"
    return config.allocation


def _allocation_meta(config: CompressConfig) -> dict:
    out: dict = {"kind": _allocation(config)}
    if out["kind"] == "sensitivity":
        out.update(samples=config.sensitivity_samples, probe_ratios=list(config.probe_ratios))
    return out


def _shape(module: nn.Module) -> tuple[int, int]:
    from .lowrank import linear_shape

    return linear_shape(module)


def collect_statistics(model: nn.Module, calibration="builtin", config: CompressConfig | None = None, *,
                       methods: list[str] | None = None, tokenizer=None) -> dict[str, ActivationStats]:
    """One calibration pass over the ORIGINAL model (propagate="original"): full layer name → statistics.

    Statistics kinds: the union of the needs of ``methods`` (default ``[config.method]``) plus R when
    ``config.error_stats``. Layers fed the same input map to the very same ``ActivationStats`` object.
    Statistics are moved to the CPU after each block. The model is not modified.
    """
    config = (config or CompressConfig()).validate()
    batches, _ = _calibration_set(model, calibration, config, tokenizer)
    model.eval()
    walker = BlockWalker(model, batches, targets=config.targets, device=config.device, progress=config.progress,
                         offload_dir=offload_dir(config, None))
    kinds = config.kinds(methods)
    out: dict[str, ActivationStats] = {}
    try:
        with torch.no_grad():
            walker.catch()
            for i in tqdm(range(len(walker)), desc="calibrate blocks", disable=not config.progress):
                with walker.on_device(i):
                    cap = walker.statistics(i, kinds, dtype=_DTYPES[config.stats_dtype], write=i < len(walker) - 1)
                moved = {key: stats_to(s, "cpu") for key, s in cap.stats.items()}
                out.update({name: moved[cap.group_of[name]] for name in walker.layers[i]})
    finally:
        walker.close()
    return out


def decompose_layers(model: nn.Module, stats: dict[str, ActivationStats], method: str = "coala", mu: float = 0.0,
                     adaptive_mu: bool = False, *, device: str | None = None,
                     progress: bool = True) -> dict[str, Decomposition]:
    """One ``Decomposition`` per layer named in ``stats``: factors of every rank from one SVD each, to be
    passed to ``apply_low_rank(..., decompositions=)`` for several ratios. Held in memory: ≈ 3 × the weights."""
    CompressConfig(method=method, mu=mu, adaptive_mu=adaptive_mu, device=device).validate()
    out: dict[str, Decomposition] = {}
    with torch.no_grad():
        for name in tqdm(stats, desc=f"decompose ({method})", disable=not progress, leave=False):
            W = dense_weight(model.get_submodule(name)).detach()
            s = stats[name]
            if device is not None and W.device != torch.device(device):
                W, s = W.to(device), stats_to(s, device)
            out[name] = decompose(W, s, method=method, mu=mu, adaptive_mu=adaptive_mu, name=name)
    return out


def apply_low_rank(model: nn.Module, stats: dict[str, ActivationStats], method: str = "coala",
                   ratio: float | None = 0.2, mu: float = 0.0, adaptive_mu: bool = False, *,
                   rank: int | str | None = None, device: str | None = None, progress: bool = True,
                   decompositions: dict[str, Decomposition] | None = None) -> CompressionReport:
    """Replace every layer named in ``stats`` (from ``collect_statistics``) by its low-rank version, in place.

    Ranks: uniform ``ratio`` (svd-llm-v2: its per-group allocation, losses measured on these statistics),
    or ``rank`` for all. Each weight is solved on ``device`` (default: where the layer is). Deep-copy the
    model first to try several methods / ratios on the same statistics; pass ``decompositions`` (from
    ``decompose_layers`` with the same method and μ, on the uncompressed weights) to reuse one SVD per layer.
    """
    config = CompressConfig(ratio=ratio, method=method, mu=mu, adaptive_mu=adaptive_mu, rank=rank,
                            device=device, progress=progress).validate()
    t0 = time.perf_counter()
    layers = {name: model.get_submodule(name) for name in stats}
    shapes = {name: _shape(m) for name, m in layers.items()}
    if method == "svd-llm-v2" and rank is None:
        from .layer_solve import v2_plan_from_stats

        plan = v2_plan_from_stats(layers, stats, config, decompositions)
    else:
        plan = plan_ranks(shapes, config)
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        rows, _ = solve_layers(model, layers, stats, plan, config, decompositions)
    return CompressionReport(
        method=method, ratio=None if rank is not None else float(ratio), mu=float(mu), adaptive_mu=adaptive_mu,
        propagate="original", layers=rows, model_params_before=params_before,
        model_params_after=sum(p.numel() for p in model.parameters()),
        times={"solve_s": time.perf_counter() - t0}, peak_memory=peak_memory(_model_device(model)),
    )


__all__ = ["INTERRUPT_ENV", "CompressConfig", "SimulatedInterruption", "apply_low_rank", "collect_statistics",
           "compress", "decompose_layers", "layer_kind"]
