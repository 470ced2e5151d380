"""The Fisher allocation: how much the model's loss grows when each layer is truncated to each rank.

Truncating a layer to rank r replaces W (out × in) by W'_r = U_r U_rᵀ W (every method here truncates by a left
projection, ``Decomposition.basis()``). To first order a sample s changes its loss by ⟨∇_W ℓ_s, W'_r − W⟩, and to
second order (the empirical Fisher / Gauss–Newton approximation, as in FWSVD, Hsu et al. 2022) the expected loss
moves by ½ E_s[⟨∇_W ℓ_s, W − W'_r⟩²]. With ∇_W ℓ_s = Σ_t g_t x_tᵀ (g_t = ∂ℓ_s/∂y_t at the layer's output, x_t its
input) and u_i the columns of U,

    ⟨∇_W ℓ_s, W − W'_r⟩ = Σ_{i>r} a_{s,i},        a_{s,i} = Σ_t (u_iᵀ g_t)(u_iᵀ W x_t),

so ONE forward and backward pass of the original model gives every layer's whole curve

    curve[r] = Σ_s (Σ_{i>r} a_{s,i})²,   r = 0..k        (``truncation_curves``; docs/design.md §6).

The sum over tokens sits inside the square: errors that a sentence's tokens make in the same direction add up
(a mean-pooled embedding, a next-token loss that attends to earlier tokens) and per-token or per-channel
simplifications miss that. U comes from fits on the two folds of the calibration samples
(``layer_solve.fold_bases``): each sample is scored ¼ with the basis fitted on its own fold and ¾ with the basis
fitted on the other one — the first-order estimate, for a fit on all samples, of its error on new samples (a fit on
m rows errs on its own rows by about ε(1 − c/m) and on new ones by ε(1 + c/m); for N = 2m rows ε(1 + c/N) =
¼·ε(1 − c/m) + ¾·ε(1 + c/m)). In-sample curves say that cutting a wide layer fitted on few tokens is cheap when
it is not.

The loss: models with logits — the next-token NLL of each sample; encoders (no loss of their own) —
⟨z_s, e_s⟩ with e_s the unit mean-pooled sentence embedding and z_s ~ N(0, I) a fixed random direction per
sample, so that E_z[⟨∇ℓ_s, ΔW⟩²] = ‖Δe_s‖² to first order (Hutchinson's estimator; 1 − cos ≈ ½‖Δe‖²).

Cost: the pass runs the first ``fisher_samples`` calibration samples, on a causal LM only the first half of each
by default (``fisher_batches``; docs/design.md §6 says why that costs no quality there, and not on encoders).
Per layer, one GEMM projects onto both folds' bases the outputs W x_t — or, where the layer widens (in < out:
fewer flops), the inputs x_t against (Uᵀ W)ᵀ, x_t then being kept next to W x_t until the backward pass — and one
projects the output gradients g_t; both run in the gradient hook. Finiteness is checked on sums (one read) and
located only when a sum is not finite.

Precision: the pass runs in the model's dtype; the projections, their per-token products and the per-token inner
products g_tᵀ W x_t in float32 (float64 for a float64 model); the sums over tokens, the tails and the squares in
float64. Weights get no gradients (parameters are frozen during the pass); only activation gradients are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .allocate import LayerEvidence, RankOptions, lagrangian_ranks, largest_saving_rank, register_allocation
from .blocks import no_kv_cache
from .errors import CoalaError
from .evaluate import last_hidden_states, mean_pool
from .lowrank import dense_bias, dense_weight, linear_shape, model_device
from .models import is_causal_lm
from .sensitivity import first_samples
from .walker import sample_folds

__all__ = ["OWN_FOLD_WEIGHT", "fisher_allocation", "fisher_batches", "truncation_curves"]

OWN_FOLD_WEIGHT = 0.25  # weight of the basis fitted on a sample's own fold; the other fold's basis gets the rest


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters without gradients for the duration (restored after); the input embeddings' output is made to
    require grad so that activation gradients still flow."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings: the Fisher pass cannot start a graph")
    handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def fisher_batches(batches: Sequence[dict[str, Tensor]], nsamples: int,
                   seqlen: int | None) -> list[dict[str, Tensor]]:
    """What the Fisher pass runs: the first ``nsamples`` calibration samples, each cut to its first ``seqlen``
    positions (every (B × S) entry of a batch; 0: whole samples; None: the first half, ⌈S/2⌉, of each batch's S).
    Raises CoalaError (argument "fisher_seqlen") when the cut leaves a sample without a real token (left-padded
    batches)."""
    out = []
    for b in first_samples(batches, nsamples):
        width = int(b["input_ids"].shape[1])
        keep = (width + 1) // 2 if seqlen is None else seqlen
        cut = keep if 0 < keep < width else width
        b = {key: v[:, :cut] if v.ndim >= 2 and v.shape[1] == width else v for key, v in b.items()}
        mask = b.get("attention_mask")
        if mask is not None and not bool(mask.any(1).all()):
            raise CoalaError(f"a calibration sample has no real token in its first {cut} positions (left-padded "
                             "batches?): set fisher_seqlen=0 to run whole samples", argument="fisher_seqlen")
        out.append(b)
    return out


def sample_losses(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """Per-sample losses (B,) float32 of one forward of ``model`` on ``batch``: the summed next-token NLL (causal
    LMs, ``models.is_causal_lm``) or ⟨z_s, unit embedding_s⟩ with z_s drawn from ``generator`` (encoders, with or
    without a head such as BertForMaskedLM's: mean-pooled last hidden states)."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    if is_causal_lm(model):  # position t predicts token t + 1; the last position predicts nothing (label -100)
        logits = model(**batch).logits
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        return nll.view(labels.shape).sum(1)  # (B·S, V) rows: a softmax over contiguous memory
    emb = F.normalize(mean_pool(last_hidden_states(model, batch), mask).float(), dim=-1)
    z = torch.randn(emb.shape, generator=generator, dtype=torch.float32).to(emb.device)
    return (z * emb).sum(1)


def _sample_tails(a: Tensor, total: Tensor) -> Tensor:
    """t[s, r] = Σ_{i>r} a_{s,i} + (total_s − Σ_i a_{s,i}) = ⟨Σ_t g_t x_tᵀ, W − U_r U_rᵀ W⟩ for r = 0..k, float64
    (B × (k + 1)). a: (B × k) float64, a_{s,i} = Σ_t (u_iᵀ W x_t)(u_iᵀ g_t); total: (B,) float64 Σ_t g_tᵀ W x_t (=
    t[s, 0]); the part outside span(U) is total − Σ_i a_{s,i}."""
    tails = torch.zeros(a.shape[0], a.shape[1] + 1, dtype=torch.float64, device=a.device)
    tails[:, :-1] = a.flip(1).cumsum(1).flip(1)
    return tails + (total - a.sum(1))[:, None]


def _finite(x: Tensor) -> bool:
    """Whether every entry of x is finite: one sum, and the full check only when the sum is not (an overflowing sum
    of finite entries)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _padded(tails: Tensor, k: int) -> Tensor:
    """(B × (k_f + 1)) tails → (B × (k + 1)): ranks past a basis of k_f < k columns keep its last value (a fit on
    few rows knows no further direction, so no further rank is credited)."""
    if tails.shape[1] == k + 1:
        return tails
    return torch.cat([tails, tails[:, -1:].expand(-1, k + 1 - tails.shape[1])], 1)


def truncation_curves(model: nn.Module, layers: Mapping[str, nn.Module], bases: Mapping[str, Sequence[Tensor]],
                      batches: Sequence[dict[str, Tensor]], *, seed: int = 0, progress: bool = True
                      ) -> dict[str, Tensor]:
    """curve[r] = Σ_s Σ_f w_{s,f} ⟨∇_W ℓ_s, W − U_{f,r} U_{f,r}ᵀ W⟩² for r = 0..k (this module's docstring) for every
    layer of ``bases``, from one forward + backward of the whole ``model`` (where it lives) over ``batches``.

    Args:
        layers: full name → nn.Linear / Conv1D of ``model`` (at least the names of ``bases``).
        bases: name → (U_0, U_1), the method's left bases (out × k_f, k_f ≤ k the largest rank that saves
            parameters) fitted on fold 0 and fold 1 of the calibration samples (``layer_solve.fold_bases``); a
            sample's fold is ``walker.sample_folds``. Ranks past k_f keep the value at k_f. w = ¼ for the basis
            of the sample's own fold, ¾ for the other.
        batches: dicts with "input_ids" (B × S int64) and optionally "attention_mask" (B × S).
        seed: the random directions z_s of encoders.

    Returns: name → float64 (k + 1,) on the CPU. Raises ValueError naming the layer whose outputs or gradients are
    not finite.
    """
    device = model_device(model)
    sums: dict[str, Tensor] = {}
    folds = torch.zeros(0, dtype=torch.int64)
    handles = []

    def watch(name: str, module: nn.Module):
        out_features, in_features = linear_shape(module)
        k = largest_saving_rank(out_features, in_features)
        bias = dense_bias(module)
        work = torch.float64 if dense_weight(module).dtype == torch.float64 else torch.float32
        U = torch.cat([u.to(device=device, dtype=work) for u in bases[name]], 1)  # out × (k_0 + k_1): both folds
        widths = [int(u.shape[1]) for u in bases[name]]
        # u_iᵀ W x_t from the inputs where that is the smaller GEMM: (Uᵀ W)ᵀ is in × (k_0 + k_1)
        UW = (dense_weight(module).detach().to(device, work).T @ U) if in_features < out_features else None

        def forward_hook(mod, inputs, output):
            if not _finite(output):
                raise ValueError(f"layer {name}: non-finite outputs in the Fisher pass over the original model (its "
                                 "activations overflow on the calibration samples)")
            rows = int(folds.shape[0])  # (B, S, out), or (B·S, out) for models that flatten the tokens (OPT's MLP)
            y = output.detach().to(work).reshape(rows, -1, out_features)
            y = y - bias.detach().to(work) if bias is not None else y  # W x_t
            x = None if UW is None else inputs[0].detach().to(work).reshape(rows, -1, in_features)

            def add(grad: Tensor) -> None:  # returns None: the gradient flows on unchanged
                g = grad.detach().to(work).reshape(y.shape)
                if not _finite(g):
                    raise ValueError(f"layer {name}: non-finite output gradients in the Fisher pass")
                own = (folds.to(g.device)[:, None] == torch.arange(len(widths), device=g.device)).to(torch.float64)
                weight = OWN_FOLD_WEIGHT * own + (1.0 - OWN_FOLD_WEIGHT) / max(len(widths) - 1, 1) * (1.0 - own)
                total = (y * g).sum(2).to(torch.float64).sum(1)  # (B,): ⟨∇_W ℓ_s, W⟩
                P = y @ U if x is None else x @ UW  # (B, S, k_0 + k_1): u_iᵀ W x_t
                a = (P * (g @ U)).to(torch.float64).sum(1).split(widths, 1)  # per fold (B, k_f): Σ_t products
                curve = sum((weight[:, f, None] * _padded(_sample_tails(a_f, total), k).square()).sum(0)
                            for f, a_f in enumerate(a))
                sums[name] = curve.cpu() if name not in sums else sums[name] + curve.cpu()

            if output.requires_grad:
                output.register_hook(add)
        return forward_hook

    for name in bases:
        handles.append(layers[name].register_forward_hook(watch(name, layers[name])))
    generator = torch.Generator().manual_seed(seed)
    first = 0
    try:
        with _frozen(model), no_kv_cache(model), torch.enable_grad():
            for batch in tqdm(batches, desc="fisher pass", disable=not progress, leave=False):
                folds = sample_folds(batch, first, 2)
                first += int(folds.shape[0])
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = sample_losses(model, batch, generator).sum()
                if not torch.isfinite(loss):
                    raise ValueError("non-finite loss in the Fisher pass of the original model")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in bases if name not in sums]
    if missing:
        raise ValueError(f"layers {missing[:3]} got no output gradients in the Fisher pass (not on the path from "
                         "the inputs to the loss?)")
    return sums


@register_allocation("fisher", needs=("fisher",))
def fisher_allocation(evidence: Mapping[str, LayerEvidence], ratio: float) -> dict[str, int | None]:
    """Ranks minimising Σ_ℓ curve_ℓ[r_ℓ] (the predicted loss increase, this module's docstring) under the parameter
    budget (``lagrangian_ranks``): any rank from 1 to the largest that saves parameters, or dense (cost 0).

    The measured curve is a sum over a few dozen samples and need not fall with r where the true one does (keeping a
    direction never costs on new data); each rank is charged the largest cost of any rank above it, so that a noisy
    dip cannot lure the budget (docs/design.md §6). The curves are first rounded to float32 (7 significant digits,
    far below their sampling error): the plan then does not depend on the summation order of the statistics, e.g.
    across the ranks of a distributed run."""
    options = {}
    for name, e in evidence.items():
        top = largest_saving_rank(*e.shape)
        if top < 1:
            continue
        if e.fisher is None or e.fisher.shape[0] < top + 1:
            raise ValueError(f"layer {name}: the Fisher allocation needs a truncation curve up to rank {top}, got "
                             f"{None if e.fisher is None else tuple(e.fisher.shape)}")
        curve = e.fisher.to(torch.float32).to(torch.float64)  # 7 digits: summation order cannot move the plan
        curve = curve.flip(0).cummax(0).values.flip(0)  # non-increasing: the max over r' ≥ r
        options[name] = RankOptions(e.shape, [*range(1, top + 1), None],
                                    torch.cat([curve[1 : top + 1], torch.zeros(1, dtype=torch.float64)]))
    return lagrangian_ranks(options, {name: e.shape for name, e in evidence.items()}, ratio)
