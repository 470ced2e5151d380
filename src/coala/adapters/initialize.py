"""``init_lora``: one entry point for context-aware (coala IPM/KPM, CorDA) and context-free (PiSSA, MiLoRA,
plain LoRA) adapter initialisation, all returning a ``peft.PeftModel``. The methods are the entries of
``coala.adapters.registry.LORA_INITS``; "coala" and "lora" are registered here, the others in their modules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from ..distributed import publish_failure
from ..distributed_run import split_work
from ..linalg.checks import check_mu, check_rank
from . import corda, pissa  # noqa: F401  (their methods register themselves)
from .context import Batch, collect_input_factors
from .ipm_kpm import MODES, coala_lora_factors
from .peft_bridge import (
    adapter_rank_and_scaling,
    base_layer,
    check_lora_config,
    check_not_tied,
    create_peft_model,
    lora_layers,
    set_lora_factors,
    weight_out_in,
)
from .registry import LORA_INITS, get_lora_init, register_lora_init


def init_lora(
    model: nn.Module,
    calibration: Iterable[Batch] | None,
    lora_config: LoraConfig,
    *,
    mode: str | None = None,
    method: str = "coala",
    mu: float = 0.0,
    stats_dtype: torch.dtype | None = None,
    solve_dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (peft) initialised from the calibration context.

    Args:
        model: a transformers / torch model; like ``peft.get_peft_model`` it is modified in place
            (targeted layers are wrapped, their base weights become residuals).
        calibration: iterable of batches (token-id tensors, or dicts such as a tokenizer's output with
            ``attention_mask``; padding is excluded). Needed by "coala" and "corda"; must be None otherwise.
        lora_config: a ``peft.LoraConfig`` (targets, r, lora_alpha, rank_pattern, use_rslora, …). Its
            ``init_lora_weights`` is ignored: the method decides. ``use_dora`` is not supported.
        mode: "ipm" (default) or "kpm" for "coala" and "corda"; must be None for the other methods.
        method: "coala" (inversion-free, this package), "corda" (peft's inverse-based CorDA),
            "pissa" (peft), "milora" (minor singular components), "lora" (peft default: B = 0).
        mu: regularisation μ ≥ 0 of the coala solve (R of [X; √μ I]); coala only.
        stats_dtype: accumulation dtype of the R factors: float32 or float64; default float32 for IPM and
            float64 for KPM (KPM's bottom directions sit near the rounding floor of float32 statistics).
        solve_dtype: dtype of the per-layer SVDs (float64 default). Factors are then cast to the adapter's
            dtype; residual base weights are computed in float64 and rounded once to the base dtype.

    At initialisation the returned model computes what ``model`` computed (to the rounding of the residual
    base weights). The product of each coala adapter is U_rU_rᵀW (see ``coala.adapters.ipm_kpm``).
    """
    spec = get_lora_init(method)
    if spec.modes:
        mode = mode if mode is not None else spec.modes[0]
        if mode not in spec.modes:
            raise ValueError(f"mode must be one of {spec.modes}, got {mode!r}")
    elif mode is not None:
        raise ValueError(f"mode applies to {[n for n, s in sorted(LORA_INITS.items()) if s.modes]} only, not to "
                         f"{method!r}")
    if spec.context:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data")
    elif calibration is not None:
        raise ValueError(f"method {method!r} is context-free: pass calibration=None")
    mu = check_mu(mu, "init_lora")
    if mu != 0.0 and not spec.uses_mu:
        raise ValueError(f"mu applies to method 'coala' only, not to {method!r}")
    check_lora_config(lora_config)
    was_training = model.training
    peft_model = spec.build(model, calibration, lora_config, mode=mode, mu=mu, stats_dtype=stats_dtype,
                            solve_dtype=solve_dtype, progress=progress)
    peft_model.train(was_training)  # peft leaves the model in training mode; keep the caller's mode
    used = getattr(peft_model, "coala_init", {}).get("stats_dtype", stats_dtype)  # the builder's resolved dtype
    peft_model.coala_init = {"method": method, "mode": mode, "mu": mu,
                             "stats_dtype": str(used).removeprefix("torch.") if used else None}
    return peft_model


@register_lora_init("lora")
def plain_lora(model: nn.Module, calibration: None, lora_config: LoraConfig, **_unused) -> PeftModel:
    """peft's default LoRA initialisation (B = 0, A random): the model's outputs are unchanged at step 0."""
    return create_peft_model(model, lora_config, init_lora_weights=True)


@register_lora_init("coala", context=True, modes=MODES, uses_mu=True)
def coala_lora(model: nn.Module, calibration: Iterable[Batch], lora_config: LoraConfig, *, mode: str, mu: float,
               stats_dtype: torch.dtype, solve_dtype: torch.dtype, progress: bool) -> PeftModel:
    """coala's inversion-free IPM / KPM adapters (``coala.adapters.ipm_kpm``), every layer solved before any
    weight is touched. ``stats_dtype`` None: float32 for IPM, float64 for KPM (KPM's bottom directions sit near
    the rounding floor of float32 statistics)."""
    if stats_dtype is None:
        stats_dtype = torch.float64 if mode == "kpm" else torch.float32
    peft_model = create_peft_model(model, lora_config, init_lora_weights=True)  # B = 0: outputs unchanged
    try:
        layers = lora_layers(peft_model)
        check_not_tied(peft_model, layers)
        bases = {}
        for name, layer in layers.items():
            bases[name] = base_layer(layer)
            r, _ = adapter_rank_and_scaling(layer)
            W = weight_out_in(layer)
            check_rank(r, W.shape[0], W.shape[1], where=name)
        with peft_model.disable_adapter():
            Rs = collect_input_factors(peft_model, bases, calibration, dtype=stats_dtype, progress=progress)

        def solve(name: str) -> dict[str, torch.Tensor]:
            r, scaling = adapter_rank_and_scaling(layers[name])
            B, A = coala_lora_factors(weight_out_in(layers[name]).detach(), Rs[name], r, mode=mode, mu=mu,
                                      scaling=scaling, name=name, solve_dtype=solve_dtype)
            return {"B": B, "A": A}

        # every layer is solved before any weight is touched; in a distributed run each layer on one rank
        costs = {name: math.prod(weight_out_in(layer).shape) * min(weight_out_in(layer).shape)
                 for name, layer in layers.items()}
        device = weight_out_in(next(iter(layers.values()))).device if layers else None
        with torch.no_grad():
            factors = {name: (f["B"], f["A"]) for name, f in split_work(costs, solve, device=device,
                                                                         what="LoRA solves").items()}
    except BaseException as err:
        publish_failure(err)
        peft_model.unload()  # give the caller back the model as it was (peft wrapped it in place)
        raise
    with torch.no_grad():
        for name, (B, A) in factors.items():
            set_lora_factors(layers[name], B, A, name=name)
    peft_model.coala_init = {"stats_dtype": stats_dtype}
    return peft_model
