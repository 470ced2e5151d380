"""CorDA baseline (Yang et al. 2024, peft ``init_lora_weights="corda"``), run through peft's own code.

peft's recipe (``peft.tuners.lora.corda``): for each targeted layer, C = mean over sequences of xᵀx, each
sequence rescaled by 1 / max(x); C_d = C + d · mean(diag C) · I with d = 0.01 doubled until
‖C_d C_d⁻¹ − I‖_F < 0.05; SVD(W C_d) = UΣVᵀ; W = UΣ(VᵀC_d⁻¹); IPM puts the top r triplets in the
adapter, KPM the bottom r. Its forward hook assumes batches of one sequence, so we feed each calibration row
alone with its padding removed.

``corda_decompose`` re-implements the inverse-based factorisation of one matrix (faithfully, to measure its
numerical drift in benchmarks; ``tests`` check it against peft's ``collect_eigens_for_layer``). By the identity
U_rΣ_rV_rᵀC_d⁻¹ = U_rU_rᵀW, its adapter needs no inverse at all — which is what coala computes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from ..lowrank import model_device
from .context import Batch, single_sequences
from .ipm_kpm import MODES, check_mode
from .peft_bridge import check_lora_config
from .registry import register_lora_init


@dataclass
class CordaFactors:
    """U (m × k), S (k,), V = (Vh C_d⁻¹)ᵀ (n × k), the damping d and the inverse check ‖C_d C_d⁻¹ − I‖_F."""

    U: Tensor
    S: Tensor
    V: Tensor
    damp: float
    inverse_error: float

    def product(self, rank: int, mode: str = "ipm") -> Tensor:
        """The adapter's product U_rΣ_rV_rᵀ (m × n) for IPM (top r) or KPM (bottom r)."""
        check_mode(mode)
        sl = slice(0, rank) if mode == "ipm" else slice(self.S.shape[0] - rank, self.S.shape[0])
        return (self.U[:, sl] * self.S[sl]) @ self.V[:, sl].T


def corda_decompose(W: Tensor, C: Tensor, *, damp: float = 0.01, tol: float = 0.05, max_doublings: int = 60):
    """peft's CorDA factorisation of W (m × n) given the covariance C (n × n), in W's dtype (peft: float32)."""
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    mean_diag = torch.mean(torch.diag(C))
    for _ in range(max_doublings):
        C_d = C + eye * mean_diag * damp
        inv = torch.linalg.inv(C_d)
        err = float(torch.dist(C_d @ inv, eye))
        if err < tol:
            break
        damp *= 2
    else:
        raise ValueError(f"CorDA damping did not reach ‖C_d C_d⁻¹ − I‖ < {tol} after {max_doublings} doublings")
    U, S, Vh = torch.linalg.svd(W @ C_d, full_matrices=False)
    return CordaFactors(U=U, S=S, V=(Vh @ inv).T, damp=damp, inverse_error=err)


@register_lora_init("corda", context=True, modes=MODES)
def corda_peft_model(
    model: nn.Module,
    calibration: Iterable[Batch],
    config: LoraConfig,
    *,
    mode: str = "ipm",
    **_unused,
) -> PeftModel:
    """CorDA through peft: ``preprocess_corda`` on the calibration data, then ``get_peft_model`` with
    ``init_lora_weights="corda"``. Mutates ``model`` like ``get_peft_model`` does."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    check_mode(mode)
    check_lora_config(config)
    cfg = copy.deepcopy(config)
    cfg.init_lora_weights = "corda"
    cfg.corda_config = CordaConfig(corda_method=mode)
    device = model_device(model)
    n_rows = 0

    def run_model() -> None:
        nonlocal n_rows
        for batch in single_sequences(calibration, device):
            model(**batch)
            n_rows += 1

    was_training = model.training
    model.eval()
    try:
        preprocess_corda(model, cfg, run_model=run_model)
    finally:
        model.train(was_training)
    if n_rows == 0:
        raise ValueError("calibration data is empty: no sequence was run")
    return get_peft_model(model, cfg)
