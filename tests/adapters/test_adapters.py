"""LoRA initialisation maths (coala IPM/KPM, CorDA's inverse route, PiSSA/MiLoRA factors) against float64
references, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from torch import nn

from coala.adapters import balanced_factors, coala_lora_factors, corda_decompose, init_lora, plain_svd_factors
from coala.adapters.ipm_kpm import context_svd, numerical_rank
from coala.linalg import RFactor
from coala.linalg.qr_update import r_of_rows
from coala.linalg.solve import CoalaDecomposition


def _problem(m=24, n=16, N=80, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=dtype)
    X = torch.randn(N, n, generator=g, dtype=dtype) @ torch.diag(torch.logspace(0, -2, n, dtype=dtype))
    return W, X


def _projector_product(W, X, cols):
    U, _, _ = torch.linalg.svd(W @ X.T, full_matrices=False)
    Ur = U[:, cols]
    return Ur @ (Ur.T @ W)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 16 / 8**0.5])
def test_ipm_product_is_the_weighted_best_rank_r(scaling):
    W, X = _problem()
    R = r_of_rows(X)
    B, A = coala_lora_factors(W, R, 5, mode="ipm", scaling=scaling)
    product = scaling * B @ A
    torch.testing.assert_close(product, _projector_product(W, X, slice(0, 5)), atol=1e-10, rtol=0)
    # optimal weighted loss: Σ_{i>r} σ_i²(W Xᵀ)
    S = torch.linalg.svdvals(W @ X.T)
    loss = torch.linalg.matrix_norm((W - product) @ X.T) ** 2
    torch.testing.assert_close(loss, S[5:].square().sum(), rtol=1e-10, atol=0)
    # the same subspace as the compression solve of the core
    a, b = CoalaDecomposition(W, R).factors(5)
    torch.testing.assert_close(product, a @ b, atol=1e-10, rtol=0)


def test_balanced_factors_share_singular_values():
    W, X = _problem(seed=1)
    U, _ = context_svd(W, r_of_rows(X))
    s = 2.0
    B, A = balanced_factors(W, U[:, :4], s)
    sigma = torch.linalg.svdvals(U[:, :4].T @ W)
    torch.testing.assert_close(s * B.T @ B, torch.diag(sigma), atol=1e-10, rtol=0)
    torch.testing.assert_close(s * A @ A.T, torch.diag(sigma), atol=1e-10, rtol=0)


def test_kpm_takes_the_smallest_supported_directions():
    W, X = _problem(m=20, n=16, N=10, seed=2)  # rank(X) = 10 < n: W Xᵀ has only 10 non-zero directions
    R = r_of_rows(X)
    _, S = context_svd(W, R)
    assert numerical_rank(S, tuple(W.shape)) == 10
    B, A = coala_lora_factors(W, R, 3, mode="kpm")
    torch.testing.assert_close(B @ A, _projector_product(W, X, slice(7, 10)), atol=1e-10, rtol=0)
    # with mu > 0 every direction is supported: the last three of W [R; √μ I]ᵀ
    B, A = coala_lora_factors(W, R, 3, mode="kpm", mu=1e-3)
    Xmu = torch.cat([X, 1e-3**0.5 * torch.eye(16, dtype=X.dtype)])
    torch.testing.assert_close(B @ A, _projector_product(W, Xmu, slice(13, 16)), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="supports only 10 directions"):
        coala_lora_factors(W, R, 11, mode="kpm")


def test_kpm_ignores_the_noise_of_float32_statistics():
    """An fp32 R of rank-deficient X has ~1e-8-relative noise where X has no support: KPM must not pick it."""
    W, X = _problem(m=20, n=16, N=10, seed=2)
    rf = RFactor(16, dtype=torch.float32)
    rf.update(X.float())
    B, A = coala_lora_factors(W.float(), rf.R, 3, mode="kpm")
    ref = _projector_product(W.float().double(), X.float().double(), slice(7, 10))
    assert float((B @ A - ref).norm() / ref.norm()) < 1e-4


def test_float32_factors_match_float64_reference():
    W, X = _problem(m=64, n=48, N=400, seed=3)
    ref = _projector_product(W, X, slice(0, 8))
    for solve_dtype in (torch.float32, torch.float64):
        B, A = coala_lora_factors(W.float(), r_of_rows(X.float()), 8, mode="ipm", solve_dtype=solve_dtype)
        assert B.dtype == solve_dtype
        assert float(torch.linalg.matrix_norm(B.double() @ A.double() - ref) / torch.linalg.matrix_norm(ref)) < 1e-5


def test_corda_decompose_matches_peft_and_the_identity():
    from peft.tuners.lora.corda import collect_eigens_for_layer

    W, X = _problem(m=12, n=10, N=60, seed=4, dtype=torch.float32)
    C = X.T @ X / X.shape[0]
    ours = corda_decompose(W, C)
    lin = nn.Linear(10, 12, bias=False)
    lin.weight.data.copy_(W)
    lin.covariance_matrix = C
    peft_eig = collect_eigens_for_layer(lin, LoraConfig(r=4))
    torch.testing.assert_close(ours.S, peft_eig.S_WC)
    torch.testing.assert_close(ours.product(4), (peft_eig.U_WC[:, :4] * peft_eig.S_WC[:4]) @ peft_eig.V_WC[:, :4].T)
    # identity: U_rΣ_rV_rᵀC_d⁻¹ = U_rU_rᵀW (U from W C_d)
    Ur = ours.U[:, :4]
    torch.testing.assert_close(ours.product(4), Ur @ (Ur.T @ W), atol=1e-4, rtol=0)


def test_pissa_and_milora_factors():
    W, _ = _problem(seed=5)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B, A = plain_svd_factors(W, 3, minor=False, scaling=2.0)
    torch.testing.assert_close(2.0 * B @ A, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-10, rtol=0)
    B, A = plain_svd_factors(W, 3, minor=True, scaling=2.0)
    torch.testing.assert_close(2.0 * B @ A, (U[:, -3:] * S[-3:]) @ Vh[-3:], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- bad input
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 12)
        self.out = nn.Linear(12, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.relu(self.proj(self.emb(input_ids))))


_CALIB = [torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))]


def _cfg(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["proj", "out"], **kw})


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "xpm"}, ValueError, "mode must be one of"),
        ({"method": "fancy"}, ValueError, "method must be one of"),
        ({"method": "pissa", "mode": "ipm"}, ValueError, "mode applies to"),
        ({"mu": -1.0}, ValueError, "mu"),
        ({"lora_config": _cfg(r=13)}, ValueError, r"rank in proj must be in \[1, min\(out, in\)\] = \[1, 12\], got 13"),
        ({"lora_config": _cfg(target_modules=["nothing_here"])}, ValueError, "nothing_here"),
        ({"lora_config": _cfg(use_dora=True)}, ValueError, "use_dora"),
        ({"lora_config": _cfg(target_modules=["emb"])}, TypeError, "nn.Linear"),
        ({"calibration": None}, ValueError, "needs calibration"),
        ({"calibration": _CALIB[0]}, TypeError, "iterable of batches"),
        ({"calibration": []}, ValueError, "empty"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"calibration": _CALIB, "lora_config": _cfg(), **kwargs}
    calibration, config = args.pop("calibration"), args.pop("lora_config")
    with pytest.raises(exc, match=match):
        init_lora(_Tiny(), calibration, config, progress=False, **args)


@pytest.mark.parametrize(("method", "config"), [("coala", _cfg()), ("milora", _cfg(target_modules=["lm_head"]))])
def test_failure_gives_the_model_back_unchanged(method, config):
    model = _Tiny()
    if method == "milora":  # a tied target: refused after peft wrapped the model
        model.lm_head = nn.Linear(16, 50, bias=False)
        model.lm_head.weight = model.emb.weight
    before = copy.deepcopy(model.state_dict())
    one_token = [torch.tensor([[3, 3]])]  # a single distinct row: W Rᵀ has rank 1 < r
    with pytest.raises(ValueError, match="KPM for proj" if method == "coala" else "tied"):
        if method == "coala":
            init_lora(model, one_token, config, mode="kpm", progress=False)
        else:
            init_lora(model, None, config, method=method, progress=False)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)
    assert type(model.proj) is nn.Linear
