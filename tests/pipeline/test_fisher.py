"""The Fisher allocation (docs/design.md §6): truncation curves from per-sample gradients of one backward pass."""

from __future__ import annotations

import json

import pytest
import torch

import coala
from _compress_models import batches, build, settings
from coala.allocate import LayerEvidence, achieved
from coala.blocks import block_layers, find_blocks
from coala.fisher import OWN_FOLD_WEIGHT, fisher_allocation, fisher_batches, sample_losses, truncation_curves
from coala.lowrank import dense_weight, is_conv1d, linear_shape
from coala.walker import sample_folds


def _layers(model):
    prefix, blocks = find_blocks(model)
    return {name: m for layers in block_layers(model, blocks, prefix, None) for name, m in layers.items()}


def _bases(layers, seed=0, dtype=torch.float64):
    """Two random orthonormal bases (out × k) per layer, k the largest rank that saves parameters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in layers.items():
        m, n = linear_shape(module)
        k = (m * n - 1) // (m + n)
        out[name] = tuple(torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))[0] for _ in range(2))
    return out


def _reference_curves(model, layers, bases, data, seed=0):
    """The same curves from per-sample weight gradients (autograd, float64 model, weights trainable):
    Σ_s Σ_f w_{s,f} ⟨∇_W ℓ_s, W − U_r U_rᵀ W⟩², r = 0..k."""
    gen = torch.Generator().manual_seed(seed)
    curves = {name: 0.0 for name in layers}
    first = 0
    for b in data:
        folds = sample_folds(b, first, 2)
        first += len(folds)
        losses = sample_losses(model, b, gen)
        for s in range(len(losses)):
            model.zero_grad()
            losses[s].backward(retain_graph=True)
            for name, module in layers.items():
                W = dense_weight(module).detach()
                G = module.weight.grad.T if is_conv1d(module) else module.weight.grad
                for f, U in enumerate(bases[name]):
                    w = OWN_FOLD_WEIGHT if int(folds[s]) == f else 1 - OWN_FOLD_WEIGHT
                    k = U.shape[1]
                    inner = torch.stack([((W - U[:, :r] @ (U[:, :r].T @ W)) * G).sum() for r in range(k + 1)])
                    curves[name] = curves[name] + w * inner.square()
    model.zero_grad()
    return curves


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_truncation_curves_match_per_sample_gradients_in_float64(kind):
    model = build(kind).double()
    data = batches(n=2, batch=3, pad=True)
    layers = _layers(model)
    bases = _bases(layers)
    got = truncation_curves(model, layers, bases, data, seed=5, progress=False)
    assert all(p.grad is None for p in model.parameters())  # weights got no gradients
    assert all(p.requires_grad for p in model.parameters())  # and are trainable again
    want = _reference_curves(model, layers, bases, data, seed=5)
    for name in layers:
        assert got[name].dtype == torch.float64 and got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12 * float(want[name].max()))
        assert float(got[name][0]) > 0 and float(got[name][-1]) >= 0


def test_sample_losses_are_the_summed_next_token_nll_of_each_row():
    """Per row: Σ over real next tokens of −log softmax(logits_t)[token_{t+1}] (padding counts nothing;
    the last position predicts nothing)."""
    model = build("llama").double()
    batch = batches(n=1, batch=3, pad=True)[0]
    with torch.no_grad():
        out = model(**batch)
        got = sample_losses(model, batch, torch.Generator())
    logp = torch.log_softmax(out.logits, -1)
    for row in range(3):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row]
        want = -sum(float(logp[row, t, ids[t + 1]]) for t in range(n - 1))
        assert float(got[row]) == pytest.approx(want, rel=1e-6)  # the losses are float32


def test_tokens_add_inside_the_square():
    """A layer whose per-token errors point the same way for all tokens of a sample costs (Σ_t)², not Σ_t(·)²: the
    curves differ from the per-token sum on the same model, so the cross-token terms are really there."""
    model = build("bert").double()
    data = batches(n=1, batch=2)
    layers = _layers(model)
    name = next(iter(layers))
    bases = {name: _bases({name: layers[name]})[name]}
    got = truncation_curves(model, layers, bases, data, progress=False)[name]
    per_token = torch.zeros_like(got)
    keep = {}

    def hook(module, inputs, output):
        output.retain_grad()
        keep.update(x=inputs[0].detach(), y=output)

    handle = layers[name].register_forward_hook(hook)
    gen = torch.Generator().manual_seed(0)
    folds = sample_folds(data[0], 0, 2)
    sample_losses(model, data[0], gen).sum().backward()
    handle.remove()
    W = layers[name].weight.detach()
    for f, U in enumerate(bases[name]):
        w = torch.where(folds == f, OWN_FOLD_WEIGHT, 1 - OWN_FOLD_WEIGHT).double()
        for r in range(U.shape[1] + 1):
            E = (keep["x"] @ (W - U[:, :r] @ (U[:, :r].T @ W)).T) * keep["y"].grad  # (B, S, out)
            per_token[r] += float((w[:, None] * E.sum(-1).square()).sum())
    model.zero_grad()
    assert not torch.allclose(got, per_token, rtol=1e-3, atol=0.0)


def test_encoder_curves_are_seeded():
    model = build("bert")
    layers = _layers(model)
    bases = _bases(layers, dtype=torch.float32)
    data = batches(n=2)
    a = truncation_curves(model, layers, bases, data, seed=3, progress=False)
    b = truncation_curves(model, layers, bases, data, seed=3, progress=False)
    c = truncation_curves(model, layers, bases, data, seed=4, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


def test_fisher_allocation_spends_the_budget_where_the_loss_cares_least():
    tail = torch.linspace(1.0, 0.0, 33, dtype=torch.float64) ** 2  # curve[r], r = 0..32
    evidence = {
        "careless": LayerEvidence("careless", "a", (32, 32), fisher=tail * 1e-6),
        "sensitive": LayerEvidence("sensitive", "b", (32, 32), fisher=tail * 1e6),
        "middle": LayerEvidence("middle", "c", (32, 32), fisher=tail),
    }
    plan = fisher_allocation(evidence, 0.3)
    assert plan["sensitive"] is None  # kept dense
    assert plan["careless"] is not None and plan["careless"] < (plan["middle"] or 99)
    got = achieved({n: e.shape for n, e in evidence.items()}, plan)["removed_fraction"]
    assert 0.3 <= got < 0.35
    with pytest.raises(ValueError, match="careless"):
        fisher_allocation({"careless": LayerEvidence("careless", "a", (32, 32), fisher=tail[:5])}, 0.3)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_compress_with_fisher_allocation_meets_the_budget(kind):
    model = build(kind, layers=2)
    report = coala.compress(model, batches(n=3), **settings(ratio=0.4, allocation="fisher"))
    assert report.allocation == "fisher"
    assert report.totals()["targeted_removed_fraction"] >= 0.4
    ranks = {row.rank for row in report.layers}
    assert len(ranks) > 1  # not uniform


def test_fisher_samples_and_seqlen_are_settings_and_are_recorded(tmp_path):
    with pytest.raises(coala.CoalaError, match="fisher_samples"):
        coala.CompressConfig(fisher_samples=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(coala.CoalaError, match="fisher_seqlen") as e:
            coala.CompressConfig(fisher_seqlen=bad)
        assert e.value.argument == "fisher_seqlen"
    from coala.compress import allocation_meta

    meta = allocation_meta(coala.CompressConfig(fisher_samples=8, fisher_seqlen=0), causal_lm=True)
    assert meta == {"kind": "fisher", "samples": 8, "seqlen": 0, "bases": "2 folds, ¼ own + ¾ other"}
    # default: the first half of each sample on a causal LM (its losses there do not see later tokens), whole
    # samples on an encoder (cutting a sentence changes its embedding); compress records what ran
    default = coala.CompressConfig()
    assert default.fisher_seqlen is None
    assert (default.fisher_seqlen_for(True), default.fisher_seqlen_for(False)) == (None, 0)
    assert coala.CompressConfig(fisher_seqlen=32).fisher_seqlen_for(False) == 32
    coala.compress(build("llama", layers=2), batches(n=2), **settings(ratio=0.4, out_dir=str(tmp_path / "out")))
    assert json.loads((tmp_path / "out" / "coala.json").read_text())["allocation"]["seqlen"] == "first half"


def test_fisher_batches_take_the_first_samples_and_positions():
    data = batches(n=3, batch=4, seq=16, pad=True)  # 12 samples, right-padded
    cut = fisher_batches(data, 6, 5)
    assert [b["input_ids"].shape for b in cut] == [(4, 5), (2, 5)]
    for got, full in zip(cut, data, strict=False):
        for key, v in got.items():
            assert torch.equal(v, full[key][: v.shape[0], :5]), key
    assert [b["input_ids"].shape for b in fisher_batches(data, 12, 0)] == [(4, 16)] * 3  # 0: whole samples
    assert [b["input_ids"].shape for b in fisher_batches(data, 12, 99)] == [(4, 16)] * 3
    assert [b["input_ids"].shape for b in fisher_batches(data, 5, None)] == [(4, 8), (1, 8)]  # None: first half
    odd = [{"input_ids": torch.ones(1, 7, dtype=torch.long)}]
    assert fisher_batches(odd, 1, None)[0]["input_ids"].shape == (1, 4)  # ⌈7/2⌉
    left = [{"input_ids": torch.ones(2, 8, dtype=torch.long),
             "attention_mask": torch.tensor([[0] * 6 + [1] * 2, [1] * 8])}]
    with pytest.raises(coala.CoalaError, match="no real token in its first 4 positions") as e:
        fisher_batches(left, 2, 4)
    assert e.value.argument == "fisher_seqlen"


def test_the_plan_scores_the_cut_samples():
    """``add_fisher`` runs ``config.fisher_seqlen`` positions of ``config.fisher_samples`` samples: its curves are
    ``truncation_curves`` of exactly those."""
    from coala.layer_solve import new_evidence
    from coala.planning import add_fisher

    model = build("llama").double()
    data = batches(n=2, batch=3, seq=16)
    layers = _layers(model)
    bases = _bases(layers)
    evidence = new_evidence({name: linear_shape(m) for name, m in layers.items()})
    add_fisher(evidence, model, layers, bases, data, coala.CompressConfig(fisher_samples=4, fisher_seqlen=7))
    want = truncation_curves(model, layers, bases, fisher_batches(data, 4, 7), progress=False)
    whole = truncation_curves(model, layers, bases, fisher_batches(data, 4, 0), progress=False)
    for name in layers:
        assert torch.equal(evidence[name].fisher, want[name])
        assert not torch.allclose(want[name], whole[name])
    add_fisher(evidence, model, layers, bases, data, coala.CompressConfig(fisher_samples=4))  # causal: first half
    half = truncation_curves(model, layers, bases, fisher_batches(data, 4, 8), progress=False)
    assert all(torch.equal(evidence[name].fisher, half[name]) for name in layers)
    encoder = build("bert").double()
    layers = _layers(encoder)
    bases = _bases(layers)
    evidence = new_evidence({name: linear_shape(m) for name, m in layers.items()})
    add_fisher(evidence, encoder, layers, bases, data, coala.CompressConfig(fisher_samples=4))  # encoder: whole
    whole = truncation_curves(encoder, layers, bases, fisher_batches(data, 4, 0), progress=False)
    assert all(torch.equal(evidence[name].fisher, whole[name]) for name in layers)


def test_a_fold_with_few_rows_credits_no_rank_past_its_fit():
    """Fitted on 6 rows, a 48 × 32 layer's COALA basis has 6 known directions: the others are arbitrary and left
    out, and the curve keeps its rank-6 value up to k (not a value that depends on the SVD's choice of a null basis)."""
    from coala.config import CompressConfig
    from coala.layer_solve import fold_bases
    from coala.linalg.stats import stats_from_rows

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48).double()
    parts = [stats_from_rows(torch.randn(6, 32, dtype=torch.float64), ("r",), torch.float64) for _ in range(2)]
    stats = type(parts[0]).of_folds(parts)
    U0, U1 = fold_bases(layer, stats, CompressConfig(), "probe")
    assert U0.shape == U1.shape == (48, 6)
    model = build("llama").double()
    layers = _layers(model)
    name = next(iter(layers))
    m, n = linear_shape(layers[name])
    k = (m * n - 1) // (m + n)
    narrow = tuple(U[:, :3] for U in _bases({name: layers[name]})[name])
    curve = truncation_curves(model, layers, {name: narrow}, batches(n=1), progress=False)[name]
    assert curve.shape == (k + 1,)
    assert torch.all(curve[3:] == curve[3]) and curve[0] != curve[3]
