"""Settings of ``coala.compress``, one dataclass per concern, each validated once when it is built.

- ``CompressConfig``   what is computed (method, ratio / rank, μ, targets, allocation, statistics): with the
  calibration data, it decides the result, so the resume fingerprint is derived from it and ``CalibrationConfig``.
- ``CalibrationConfig`` how samples are drawn from a named calibration source (count, length, seed, mode).
- ``RuntimeConfig``    where and how the work runs (device, hidden-state offload, progress bars): never
  changes the result.
- ``OutputConfig``     where the model is written, checkpointing and resume.

Every field carries its command-line help in ``metadata``; ``add_arguments`` / ``from_arguments`` derive the
CLI flags from the dataclasses, so a new field is a new flag without touching the CLI. Choices that come from a
registry (methods, allocations) are read from it when the parser is built.

The configs are frozen: make variants with ``dataclasses.replace`` (which validates again).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

from .allocate import allocation_names, get_allocation
from .errors import CoalaError, CoalaTypeError
from .linalg.dtypes import ACCUMULATION_DTYPES
from .linalg.methods import METHODS, get_method
from .sensitivity import PROBE_RATIOS

PROPAGATIONS = ("compressed", "original", "corrected")
CALIB_MODES = ("auto", "windows", "sentences")


def csv_names(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def csv_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _rank(text: str) -> int | str:
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an int or 'full', got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'auto' or 'none', got {text!r}") from None


def option(default, help: str, *, parse: Callable | None = None, choices: Callable[[], Iterable] | None = None,
           flag: str | None = None, cli: bool = True, factory: bool = False):
    """A dataclass field with its command-line description in ``metadata`` (read by ``add_arguments``): ``help``,
    ``parse`` (str → value), ``choices`` (a callable, so registries are read when the parser is built), ``flag``
    (default ``--field-name``), ``cli=False`` to keep the field off the command line."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "cli": cli}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CoalaError(f"{name} must be a positive int, got {value!r}", argument=name)


def _names(value, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise CoalaTypeError(f"{name} must be a list of names, not the string {value!r}", argument=name)
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise CoalaTypeError(f"every entry of {name} must be a non-empty string, got {value!r}", argument=name)
    return out


_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", re.IGNORECASE)


def _shard_size(value) -> int | str:
    """An int > 0 (bytes; digits-only strings too) or a size string such as "2GB" / "500MB" (KB, MB, GB, TB)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
        isinstance(value, str) and _SIZE.fullmatch(value) is not None and float(value.strip()[:-2]) > 0)
    if not ok:
        raise CoalaError(f"max_shard_size must be a positive number of bytes or a size like '2GB' / '500MB', got "
                         f"{value!r}", argument="max_shard_size")
    return value


@dataclass(frozen=True)
class CompressConfig:
    """What ``compress`` computes (defaults: 20 % of the targeted parameters removed with COALA, μ = 0).

    ``ratio`` is the fraction of the targeted matrices' parameters removed (docs/design.md §6); ``rank`` forces
    one rank everywhere instead ("full" = min(out, in); every targeted matrix is then replaced). ``allocation``
    names an entry of ``coala.allocate.ALLOCATIONS`` or "auto" (the method's own: SVD-LLM V2's per-group
    allocation for svd-llm-v2, uniform otherwise). ``propagate``: the next block is calibrated on the outputs of
    the compressed block ("compressed", sequential) or of the original one ("original", SVD-LLM's and ASVD's
    profiling); "auto" is the method's own (``Method.propagate``: original for the published profiling of asvd,
    svd-llm and svd-llm-v2, compressed for svd, and for coala compressed on encoders and corrected on causal LMs
    (``for_model``; corrected needs a fixed μ)). "corrected" (coala only) is compressed propagation whose
    layers are fitted to W(αX + (1 − α)X̃)ᵀ, α = ``correction``: part of the original model's output, so that each
    block also corrects the error of the blocks before it (``linalg.corrected``, docs/design.md §4).
    """

    ratio: float = option(0.2, "fraction of the targeted layers' parameters removed, in (0, 1)", parse=float)
    method: str = option("coala", "low-rank method", choices=lambda: sorted(METHODS))
    mu: float = option(0.0, "COALA regularisation weight mu >= 0", parse=float)
    adaptive_mu: bool = option(False, "the paper's adaptive mu rule (COALA)")
    targets: tuple[str, ...] | None = option(
        None, "comma-separated linear layer names inside the blocks, e.g. q_proj,k_proj (default: all)",
        parse=csv_names)
    rank: int | str | None = option(None, "force this rank (or 'full') for every targeted layer instead of --ratio",
                                     parse=_rank)
    propagate: str = option(
        "auto", "next block's inputs: outputs of the compressed block or of the original; auto: the method's own "
        "(original for asvd, svd-llm, svd-llm-v2 as published; compressed for svd, and for coala on encoders; "
        "corrected for coala on causal LMs); corrected (coala, fixed mu): compressed, each layer fitted partly to "
        "the original model's output (--correction)",
        choices=lambda: ["auto", *PROPAGATIONS])
    correction: float = option(
        0.25, "with corrected propagation (coala only): weight alpha of the ORIGINAL model's inputs X in each layer's "
        "target W(alpha X + (1 - alpha) X~)^T, X~ the compressed path's (docs/design.md §4; costs a second stream "
        "of hidden states and statistics of twice the width)", parse=float)
    allocation: str = option(
        "auto", "ranks from --ratio: auto (the method's own: fisher for coala, svd-llm-v2 per group, others "
        "uniform), fisher (each truncation's loss increase from per-sample gradients, one backward pass), "
        "uniform, svd-llm-v2, or sensitivity "
        "(each matrix probed alone on the whole model's output: 4 forward passes of the whole model per matrix, "
        "run where the model is loaded; slow)",
        choices=lambda: ["auto", *allocation_names()])
    sensitivity_samples: int = option(64, "calibration samples the sensitivity probes run", parse=int)
    fisher_samples: int = option(32, "calibration samples the Fisher allocation's backward pass runs", parse=int)
    fisher_seqlen: int | None = option(
        None, "tokens of each of those samples the Fisher pass runs: the first N (0: the whole sample; default: the "
        "first half on causal LMs, whose next-token losses there do not depend on later tokens; whole samples on "
        "encoders, whose sentence embedding does)", parse=int)
    probe_ratios: tuple[float, ...] = option(PROBE_RATIOS, "ratios at which the sensitivity probes truncate",
                                              parse=csv_floats)
    stats_dtype: str = option("float32", "accumulation dtype of the statistics", choices=lambda: ACCUMULATION_DTYPES)
    error_stats: bool = option(True, "do not collect R for methods that do not need it (error column reads n/a)",
                                flag="--no-error-stats")

    def __post_init__(self) -> None:
        m = get_method(self.method)
        if self.rank is None:
            if not _is_number(self.ratio) or not 0.0 < float(self.ratio) < 1.0:
                raise CoalaError(f"ratio must be strictly between 0 and 1 (the fraction of the targeted "
                                 f"parameters removed), got {self.ratio!r}", argument="ratio")
        elif self.rank != "full" and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise CoalaError(f"rank must be a positive int or 'full', got {self.rank!r}", argument="rank")
        if not _is_number(self.mu) or not 0.0 <= self.mu < math.inf:
            raise CoalaError(f"mu must be a finite number >= 0, got {self.mu!r}", argument="mu")
        if (self.mu or self.adaptive_mu) and not m.uses_mu:
            raise CoalaError(f"mu / adaptive_mu apply to method 'coala' only, not {self.method!r}", argument="mu")
        if self.propagate != "auto" and self.propagate not in PROPAGATIONS:
            raise CoalaError(f"propagate must be 'auto' or one of {PROPAGATIONS}, got {self.propagate!r}",
                             argument="propagate")
        if not _is_number(self.correction) or not 0.0 < float(self.correction) <= 1.0:
            raise CoalaError(f"correction must be in (0, 1], got {self.correction!r}", argument="correction")
        if self.propagate == "corrected" and (self.method != "coala" or self.adaptive_mu):
            raise CoalaError("propagate='corrected' is the error-correcting COALA solve: it needs method 'coala' "
                             f"and a fixed mu (got method {self.method!r}, adaptive_mu={self.adaptive_mu})",
                             argument="propagate")
        if self.allocation != "auto" and self.allocation not in allocation_names():
            raise CoalaError(f"allocation must be 'auto' or one of {allocation_names()}, got {self.allocation!r}",
                             argument="allocation")
        _positive_int(self.sensitivity_samples, "sensitivity_samples")
        _positive_int(self.fisher_samples, "fisher_samples")
        seqlen = self.fisher_seqlen
        if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 0):
            raise CoalaError(f"fisher_seqlen must be an int >= 0 (0: whole samples) or None (the model's default), "
                             f"got {seqlen!r}", argument="fisher_seqlen")
        probes = tuple(self.probe_ratios) if not isinstance(self.probe_ratios, str) else ()
        if not probes or not all(_is_number(p) and 0.0 < p < 1.0 for p in probes):
            raise CoalaError(f"probe_ratios must be numbers in (0, 1), got {self.probe_ratios!r}",
                             argument="probe_ratios")
        object.__setattr__(self, "probe_ratios", tuple(float(p) for p in probes))
        if self.resolved_allocation == "sensitivity" and self.ratio > max(probes):
            raise CoalaError(f"ratio {self.ratio} exceeds the deepest probe ratio {max(probes)}: the sensitivity "
                             "allocation does not extrapolate; add a deeper probe_ratios entry", argument="ratio")
        if self.stats_dtype not in ACCUMULATION_DTYPES:
            raise CoalaError(f"stats_dtype must be one of {sorted(ACCUMULATION_DTYPES)}, got {self.stats_dtype!r}",
                             argument="stats_dtype")
        object.__setattr__(self, "targets", _names(self.targets, "targets"))

    @property
    def resolved_allocation(self) -> str:
        """The allocation that runs: "uniform" when ranks are forced, the method's own for "auto"."""
        return self.allocation_for(self.method)

    def allocation_for(self, method: str) -> str:
        """The allocation these settings run with ``method``."""
        if self.rank is not None:
            return "uniform"
        return get_method(method).allocation if self.allocation == "auto" else self.allocation

    @property
    def resolved_propagate(self) -> str:
        """The propagation that runs on a model that is not a causal LM: the method's own (``Method.propagate``)
        for "auto". ``for_model`` resolves "auto" for a given model."""
        return get_method(self.method).propagate if self.propagate == "auto" else self.propagate

    def fisher_seqlen_for(self, causal_lm: bool) -> int | None:
        """The Fisher pass's positions per sample, as ``coala.fisher.fisher_batches`` takes them: ``fisher_seqlen``
        when set (0: whole samples); unset, None (the first half of each sample) on a causal LM and 0 on an encoder
        (docs/design.md §6)."""
        if self.fisher_seqlen is not None:
            return self.fisher_seqlen
        return None if causal_lm else 0

    def for_model(self, causal_lm: bool) -> CompressConfig:
        """This configuration with propagate="auto" resolved for a model: on a causal LM the method's
        ``Method.propagate_lm`` where it has one (coala: "corrected", which needs a fixed μ), else
        ``resolved_propagate``. Other settings are returned unchanged (``fisher_seqlen_for`` resolves the other
        model-dependent default)."""
        if self.propagate != "auto":
            return self
        chosen = get_method(self.method).propagate_lm if causal_lm else None
        if chosen is None or (chosen == "corrected" and self.adaptive_mu):
            chosen = self.resolved_propagate
        return replace(self, propagate=chosen)

    @property
    def accumulation_dtype(self) -> torch.dtype:
        return ACCUMULATION_DTYPES[self.stats_dtype]

    def kinds(self, methods: Iterable[str] | None = None) -> set[str]:
        """Statistics to collect: the union of the methods' needs, plus R when ``error_stats``."""
        kinds: set[str] = set()
        for name in methods or [self.method]:
            kinds |= set(get_method(name).needs)
        return kinds | ({"r"} if self.error_stats else set())

    def folds(self, methods: Iterable[str] | None = None) -> int:
        """Parts the calibration statistics keep (by sample): 2 when the allocation of any of ``methods``
        (default ``[self.method]``) fits the method on each fold ("fisher"), else 1."""
        needs = [get_allocation(self.allocation_for(name)).needs for name in methods or [self.method]]
        return 2 if any("fisher" in n for n in needs) else 1


@dataclass(frozen=True)
class CalibrationConfig:
    """How samples are drawn when the calibration is a source name or path ("builtin", "wikitext2", a file).

    ``mode``: "windows" (random windows of ``seqlen`` tokens, for generative models), "sentences" (one sample per
    sentence, for encoders) or "auto" (chosen from the model). ``batch_size`` None: batches of a token budget.
    """

    nsamples: int = option(256, "calibration samples", parse=int)
    seqlen: int = option(2048, "tokens per sample (clamped to the model's maximum positions)", parse=int)
    seed: int = option(0, "sampling seed", parse=int)
    mode: str = option("auto", "how samples are cut from the text", choices=lambda: CALIB_MODES, flag="--calib-mode")
    batch_size: int | None = option(None, "samples per forward (default: automatic)", parse=_optional_int)

    def __post_init__(self) -> None:
        _positive_int(self.nsamples, "nsamples")
        _positive_int(self.seqlen, "seqlen")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CoalaError(f"seed must be an int, got {self.seed!r}", argument="seed")
        if self.mode not in CALIB_MODES:
            raise CoalaError(f"calibration mode must be one of {CALIB_MODES}, got {self.mode!r}", argument="mode")
        if self.batch_size is not None:
            _positive_int(self.batch_size, "batch_size")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the work runs; none of it changes the result.

    ``device``: where each block is computed (default: where the model is). ``offload_hidden``: keep the
    calibration samples' hidden states in files instead of host memory (then memory does not grow with the
    sample count).
    """

    device: str | None = option(None, "where each block is computed, e.g. cuda (default: where the model is)",
                                parse=str)
    offload_hidden: bool = option(False, "keep the calibration hidden states on disk instead of in memory")
    progress: bool = option(True, "no progress bars", flag="--quiet")

    def __post_init__(self) -> None:
        if self.device is None:
            return
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise CoalaError(f"device {self.device!r} is not a torch device: {err}", argument="device") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CoalaError(f"device {self.device!r} asked for, but CUDA is not available", argument="device")


@dataclass(frozen=True)
class OutputConfig:
    """Where the compressed model goes. ``out_dir`` None: the model stays in memory only.

    ``work_dir``: checkpoint folder (default ``out_dir + ".partial"``); ``resume`` continues an interrupted run
    from it (the result is identical to an uninterrupted run); ``overwrite`` replaces an existing ``out_dir``
    and discards a stale ``work_dir``.
    """

    out_dir: str | None = option(None, "output folder", flag="--out")
    work_dir: str | None = option(None, "checkpoint folder (default OUT.partial)")
    resume: bool = option(False, "continue an interrupted run from the checkpoint folder")
    overwrite: bool = option(False, "replace an existing OUT (and a stale checkpoint folder)")
    max_shard_size: int | str = option("2GB", "largest weights file before the model is sharded")

    def __post_init__(self) -> None:
        for name in ("out_dir", "work_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        if self.resume and not self.out_dir:
            raise CoalaError("resume needs out_dir (the checkpoint lives beside it)", argument="resume")
        object.__setattr__(self, "max_shard_size", _shard_size(self.max_shard_size))


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
                  defaults: dict | None = None, helps: dict | None = None) -> None:
    """Add one flag per field of the config dataclass ``cls`` (``--field-name``, or the field's ``flag``).

    Booleans become switches (``store_true``; a field that defaults to True gets a negative flag such as
    ``--no-error-stats`` or ``--quiet``). ``defaults`` overrides a field's default on this command only, and
    ``helps`` its help text (say the command's own default there).
    """
    group = parser.add_argument_group(cls.__name__)
    skip, defaults, helps = set(skip), defaults or {}, helps or {}
    for f in fields(cls):
        meta = {**f.metadata, "help": helps.get(f.name, f.metadata["help"])}
        if f.name in skip or not meta.get("cli", True):
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            group.add_argument(flag, dest=f.name, action=action, default=default, help=meta["help"])
            continue
        kwargs: dict = {"dest": f.name, "default": default}
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"]())
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = "" if default is None or "default" in meta["help"] else f" (default: {shown})"
        group.add_argument(flag, help=meta["help"] + suffix, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the parsed flags that ``add_arguments`` added (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


__all__ = ["CALIB_MODES", "PROPAGATIONS", "CalibrationConfig", "CompressConfig", "OutputConfig",
           "RuntimeConfig", "add_arguments", "csv_floats", "csv_names", "from_arguments", "option"]
