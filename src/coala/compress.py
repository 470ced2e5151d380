"""The one verb: ``compress(model, calibration, config) -> CompressionReport``, and its two halves for sweeps.

``compress`` runs the block walker (``coala.walker``) once — twice when the rank allocation needs evidence from
the original model first (``coala.planning``): for each block, statistics of the targeted layers' inputs, then
``solve_layers`` swaps in the ``LowRankLinear`` layers, then the block's outputs feed the next block — of the
compressed block (``propagate="compressed"``, sequential calibration: later blocks see the activations they will
really receive) or of the original one (``"original"``, SVD-LLM's profiling); ``"auto"`` is the method's own. With
an output folder each block is checkpointed, and ``resume`` continues an interrupted run to the identical result.

``collect_statistics`` (one pass over the ORIGINAL model) + ``decompose_layers`` + ``apply_low_rank`` solve many
methods / ratios from one pass (``coala.compare`` uses them).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .blocks import normalize_batches
from .compress_report import CompressionReport, LayerReport, peak_memory
from .config import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig
from .distributed import ensure_joined, failure_guard, sync
from .distributed_run import distribute, on_main, prepare_run, share_plan, solve_layers_split
from .errors import CoalaTypeError
from .layer_solve import decompose_layer, restore_layers, solve_layers
from .linalg.decomposition import Decomposition
from .linalg.parallel import parallel_map
from .linalg.stats import ActivationStats
from .lowrank import linear_shape, model_device
from .models import is_causal_lm, origin_meta
from .planning import plan_from_decompositions, plan_in_pass
from .preflight import check_model
from .resume import INTERRUPT_ENV, SimulatedInterruption, fingerprint, offload_dir
from .walker import BlockStep, BlockWalker


@dataclass
class BlockResult:
    """A finished block as its checkpoint stores it: the new layers' tensors and the JSON meta."""

    state: dict[str, Tensor]
    meta: dict


def _check(value, cls: type, arg: str):
    value = cls() if value is None else value
    if not isinstance(value, cls):
        raise CoalaTypeError(f"{arg} must be a coala.{cls.__name__}, got {type(value).__name__}", argument=arg)
    return value


def calibration_set(model: nn.Module, calibration, data: CalibrationConfig, tokenizer) -> tuple[list, dict]:
    """Batches + a JSON description, from a source name / path (tokenized here) or ready batches."""
    if isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None:
            raise CoalaTypeError("a tokenizer is needed to tokenize the calibration source "
                             f"{str(calibration)!r} (pass tokenizer=)", argument="tokenizer")
        from .data import calibration_batches

        mode = data.mode
        if mode == "auto":
            mode = "windows" if is_causal_lm(model) else "sentences"
        cfg = getattr(model, "config", None)
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        cal = calibration_batches(calibration, tokenizer, nsamples=data.nsamples, seqlen=data.seqlen, seed=data.seed,
                                  mode=mode, batch_size=data.batch_size, max_positions=max_pos)
        return cal.batches, cal.description
    if hasattr(calibration, "batches") and hasattr(calibration, "description"):
        return normalize_batches(calibration.batches), dict(calibration.description)
    batches = normalize_batches(calibration)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return batches, {"source": "batches", "batches": len(batches), "tokens": tokens}


@failure_guard()  # in a distributed run, the other ranks learn of an error here instead of waiting for this rank
def compress(model: nn.Module, calibration="builtin", config: CompressConfig | None = None, *,
             data: CalibrationConfig | None = None, runtime: RuntimeConfig | None = None,
             output: OutputConfig | None = None, tokenizer=None) -> CompressionReport:
    """Compress ``model`` in place, block by block; with ``output.out_dir``, write it there.

    Args:
        model: a transformers model (any architecture whose blocks are an nn.ModuleList), on the CPU or a
            device; it is put in eval mode. Each block visits ``runtime.device`` in turn.
        calibration: "builtin", "wikitext2", "c4", a .txt / .jsonl path (needs ``tokenizer``; sampled as ``data``
            says), a ``coala.data.CalibrationSet``, or an iterable of batches (dicts with "input_ids" and
            optionally "attention_mask", or bare input-id tensors).
        config: what to compute (default: 20 % removed with COALA). data / runtime / output: see ``coala.config``.
        tokenizer: to tokenize a named calibration source, and saved with the model.

    Returns a ``CompressionReport``. Bad settings, missing targets, a NaN / Inf weight (named), an output or
    checkpoint folder that cannot be written and an unreadable calibration file raise a ``coala.CoalaError``
    (a ValueError; ``CoalaFileError`` / ``CoalaFileNotFoundError`` are also OSErrors) before any calibration
    and before anything is written; NaN activations raise a ValueError naming the block. The output is written
    atomically and durably; after a failure the in-memory ``model`` may hold the blocks finished so far, and
    their checkpoint lets ``output.resume`` go on (a damaged checkpoint block is recomputed).

    Distributed (docs/design.md §12): started by torchrun (the process group is joined here unless
    ``coala.distributed.init_from_env`` did it), every rank calls ``compress`` with the same model and arguments;
    each calibrates on its share of the batches, the statistics are reduced exactly, the solves are shared out,
    rank 0 writes the output and the checkpoints, and every rank returns the same report and holds the same
    compressed model.
    """
    config, data = _check(config, CompressConfig, "config"), _check(data, CalibrationConfig, "data")
    runtime, output = _check(runtime, RuntimeConfig, "runtime"), _check(output, OutputConfig, "output")
    config = config.for_model(is_causal_lm(model))  # propagate="auto": corrected on causal LMs for coala
    t_start = time.perf_counter()
    ensure_joined(runtime.device or model_device(model))  # started by torchrun: join its process group
    check_model(model, config.targets)
    ckpt = prepare_run(output)
    batches, description = calibration_set(model, calibration, data, tokenizer)
    shard, runtime = distribute(model, batches, description, (config, data), runtime)  # this rank's batches
    model.eval()
    walker = BlockWalker(model, shard, targets=config.targets, device=runtime.device, progress=runtime.progress,
                         offload_dir=offload_dir(runtime.offload_hidden, ckpt))
    params_before = sum(p.numel() for p in model.parameters())
    done, started, plan = 0, False, None
    try:
        if ckpt is not None:
            done, started = ckpt.start(fingerprint(model, batches, description, (config, data), walker.device)), True
            if done:
                plan = ckpt.load_block(0)[1]["plan"]
        t0 = time.perf_counter()
        forward0 = walker.times["forward"]
        if plan is None:
            plan = share_plan(plan_in_pass(walker, config, batches))
        allocation_s = time.perf_counter() - t0  # the whole plan, its own walk over the original model included
        allocation_forward = walker.times["forward"] - forward0
        solve0 = walker.times["solve"]

        def solve(step: BlockStep) -> BlockResult:
            rows, state = solve_layers_split(model, step.layers, step.capture, plan, config, progress=runtime.progress)
            return BlockResult(state, {"layers": [asdict(r) for r in rows], "plan": plan})

        def restore(state: dict[str, Tensor], meta: dict) -> BlockResult:
            restore_layers(model, state, meta["layers"])
            return BlockResult(state, meta)

        results = walker.walk(solve, kinds=config.kinds(), dtype=config.accumulation_dtype,
                              propagate=config.resolved_propagate, correction=float(config.correction),
                              checkpoint=ckpt, done=done, restore=restore,
                              desc="compress blocks")
        report = CompressionReport(
            method=config.method, ratio=None if config.rank is not None else float(config.ratio),
            mu=float(config.mu), adaptive_mu=config.adaptive_mu, propagate=config.resolved_propagate,
            allocation=config.resolved_allocation,
            layers=[LayerReport(**row) for res in results for row in res.meta["layers"]],
            model_params_before=params_before, model_params_after=sum(p.numel() for p in model.parameters()),
            calibration=description, resumed_blocks=done,
        )
        if output.out_dir:
            sync("every block finished")
            on_main(lambda: (_save(model, config, description, report, output, tokenizer), ckpt.clear()),
                    "write the output")
            report.output = str(output.out_dir)
    except BaseException:
        walker.close()
        if started and ckpt.finished() == 0:
            ckpt.clear()
        raise
    report.times = {"calibration_s": walker.times["forward"] - allocation_forward,
                    "solve_s": walker.times["solve"] - solve0,
                    "total_s": time.perf_counter() - t_start}
    if allocation_s > 1e-3:
        report.times["allocation_s"] = allocation_s
    report.peak_memory = peak_memory(walker.device)
    return report


def allocation_meta(config: CompressConfig, causal_lm: bool) -> dict:
    """How the ranks were chosen, as ``coala.json`` records it."""
    out: dict = {"kind": config.resolved_allocation}
    if out["kind"] == "sensitivity":
        out.update(samples=config.sensitivity_samples, probe_ratios=list(config.probe_ratios))
    if out["kind"] == "fisher":
        seqlen = config.fisher_seqlen_for(causal_lm)
        out.update(samples=config.fisher_samples, seqlen="first half" if seqlen is None else seqlen,
                   bases="2 folds, ¼ own + ¾ other")
    return out


def _save(model: nn.Module, config: CompressConfig, description: dict, report: CompressionReport,
          output: OutputConfig, tokenizer) -> None:
    from .io import save_compressed

    meta = {"method": config.method, "ratio": config.ratio, "rank_override": config.rank, "mu": config.mu,
            "adaptive_mu": config.adaptive_mu, "propagate": config.resolved_propagate,
            **({"correction": float(config.correction)} if config.resolved_propagate == "corrected" else {}),
            "allocation": allocation_meta(config, is_causal_lm(model)),
            "targets": config.targets, "stats_dtype": config.stats_dtype, "calibration": description,
            "totals": report.totals(), **origin_meta(model)}
    save_compressed(model, output.out_dir, meta=json.loads(json.dumps(meta)), tokenizer=tokenizer,
                    max_shard_size=output.max_shard_size, overwrite=output.overwrite)


@failure_guard()
def collect_statistics(model: nn.Module, calibration="builtin", config: CompressConfig | None = None, *,
                       methods: list[str] | None = None, data: CalibrationConfig | None = None,
                       runtime: RuntimeConfig | None = None, tokenizer=None) -> dict[str, ActivationStats]:
    """One calibration pass over the ORIGINAL model (propagate="original"): full layer name → statistics.

    Statistics kinds: the union of the needs of ``methods`` (default ``[config.method]``) plus R when
    ``config.error_stats``. Layers fed the same input map to the very same ``ActivationStats`` object. When the
    allocation of one of the methods fits each fold (COALA's default, "fisher"), each also keeps its rows
    in two folds of the calibration samples (``ActivationStats.folds``; ``config.folds``).
    Statistics are moved to the CPU after each block. The model is not modified. In a distributed run each rank
    streams its shard of the batches and every rank returns the statistics of all of them (docs/design.md §12).
    """
    config, data = _check(config, CompressConfig, "config"), _check(data, CalibrationConfig, "data")
    runtime = _check(runtime, RuntimeConfig, "runtime")
    ensure_joined(runtime.device or model_device(model))
    check_model(model, config.targets)
    batches, description = calibration_set(model, calibration, data, tokenizer)
    batches, runtime = distribute(model, batches, description, (config, data), runtime)  # this rank's batches
    model.eval()
    walker = BlockWalker(model, batches, targets=config.targets, device=runtime.device, progress=runtime.progress,
                         offload_dir=offload_dir(runtime.offload_hidden, None))
    out: dict[str, ActivationStats] = {}

    def keep(step: BlockStep) -> None:
        if step.capture is None:  # nothing to collect (e.g. plain SVD without error statistics)
            out.update({name: ActivationStats(linear_shape(m)[1], ()) for name, m in step.layers.items()})
            return
        moved = {key: s.to("cpu") for key, s in step.capture.stats.items()}
        out.update({name: moved[step.capture.group_of[name]] for name in step.layers})

    walker.walk(keep, kinds=config.kinds(methods), dtype=config.accumulation_dtype, propagate="original",
                desc="calibrate blocks", folds=config.folds(methods))
    return out


def decompose_layers(model: nn.Module, stats: dict[str, ActivationStats], config: CompressConfig | None = None, *,
                     device: str | None = None, progress: bool = True) -> dict[str, Decomposition]:
    """One ``Decomposition`` per layer named in ``stats`` (``config``'s method and μ; on ``device``): factors of
    every rank from one SVD each, for ``apply_low_rank(..., decompositions=)`` at several ratios. Held in
    memory: ≈ 3 × the weights."""
    config = _check(config, CompressConfig, "config")
    dev = torch.device(device) if device is not None else None
    bar = tqdm(total=len(stats), desc=f"decompose ({config.method})", disable=not progress, leave=False)

    def one(name: str) -> Decomposition:
        dec = decompose_layer(model.get_submodule(name), stats[name], config, name, dev)
        bar.update(1)
        return dec

    with torch.no_grad(), bar:  # the matrices side by side, one thread each (docs/design.md §11)
        return dict(zip(stats, parallel_map(one, list(stats)), strict=True))


def apply_low_rank(model: nn.Module, stats: dict[str, ActivationStats], config: CompressConfig | None = None, *,
                   device: str | None = None, progress: bool = True,
                   decompositions: dict[str, Decomposition] | None = None,
                   batches: list[dict[str, Tensor]] | None = None) -> CompressionReport:
    """Replace every layer named in ``stats`` (from ``collect_statistics``) by its low-rank version, in place.

    Ranks: ``config``'s allocation (evidence measured on these statistics; "sensitivity" needs ``compress``) or
    its forced rank. Each weight is solved on ``device`` (default: where the layer is). Deep-copy the model first
    to try several methods / ratios on the same statistics; pass ``decompositions`` (from ``decompose_layers``
    with the same method and μ, on the uncompressed weights) to reuse one SVD per layer. ``batches``: calibration
    batches for an allocation that runs the model ("fisher", COALA's default; a ValueError says so without them).
    """
    config = _check(config, CompressConfig, "config")
    t0 = time.perf_counter()
    layers = {name: model.get_submodule(name) for name in stats}
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        plan = plan_from_decompositions(model, layers, config, decompositions, stats,
                                        batches=normalize_batches(batches) if batches is not None else None)
        rows, _ = solve_layers(model, layers, stats, plan, config, device=device, decompositions=decompositions,
                               progress=progress)
    return CompressionReport(
        method=config.method, ratio=None if config.rank is not None else float(config.ratio), mu=float(config.mu),
        adaptive_mu=config.adaptive_mu, propagate="original", allocation=config.resolved_allocation, layers=rows,
        model_params_before=params_before, model_params_after=sum(p.numel() for p in model.parameters()),
        times={"solve_s": time.perf_counter() - t0}, peak_memory=peak_memory(model_device(model)),
    )


__all__ = ["INTERRUPT_ENV", "CompressConfig", "SimulatedInterruption", "apply_low_rank", "calibration_set",
           "collect_statistics", "compress", "decompose_layers"]
