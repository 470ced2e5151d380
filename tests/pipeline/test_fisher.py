"""The Fisher allocation (docs/design.md §6): output-gradient scales from one backward pass, ranks from them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coala
from _compress_models import batches, build, settings
from coala.allocate import LayerEvidence, achieved
from coala.blocks import block_layers, find_blocks
from coala.fisher import fisher_allocation, gradient_scales
from coala.lowrank import linear_shape


def _layers(model):
    prefix, blocks = find_blocks(model)
    return {name: m for layers in block_layers(model, blocks, prefix, None) for name, m in layers.items()}


def _reference_scales(model, layers, data):
    """The same quantity through retain_grad on every layer output (float64 model, parameters trainable)."""
    model = model.double()
    outs: dict[str, list] = {name: [] for name in layers}
    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outs[name].append(output)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    sums = dict.fromkeys(layers, 0.0)
    tokens = 0
    for b in data:
        logits = model(**b).logits
        labels = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
        F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum").backward()
        tokens += int(b["attention_mask"].sum())
        for name in layers:
            sums[name] += float(outs[name].pop().grad.square().sum())
    for h in handles:
        h.remove()
    return {name: sums[name] / (linear_shape(layers[name])[0] * tokens) for name in layers}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_scales_match_autograd_reference(kind):
    model = build(kind)
    data = batches(n=2, pad=True)
    layers = _layers(model)
    assert layers
    got = gradient_scales(model.double(), layers, data, progress=False)
    ref_model = build(kind)
    want = _reference_scales(ref_model, _layers(ref_model), data)
    for name in layers:
        assert got[name] == pytest.approx(want[name], rel=1e-6), name  # its loss is summed in float32
        assert got[name] > 0
    assert all(p.grad is None for p in model.parameters())  # weights got no gradients
    assert all(p.requires_grad for p in model.parameters())  # and are trainable again


def test_encoder_scales_are_seeded_and_positive():
    model = build("bert")
    layers = _layers(model)
    data = batches(n=2)
    a = gradient_scales(model, layers, data, seed=3, progress=False)
    b = gradient_scales(model, layers, data, seed=3, progress=False)
    c = gradient_scales(model, layers, data, seed=4, progress=False)
    assert a == b and a != c
    assert all(v > 0 for v in a.values())


def test_fisher_allocation_spends_the_budget_where_the_loss_cares_least():
    tail = torch.linspace(1.0, 0.0, 33, dtype=torch.float64) ** 2  # loss[r], r = 0..32
    evidence = {
        "careless": LayerEvidence("careless", "a", (32, 32), heldout_loss=tail, fisher=1e-6),
        "sensitive": LayerEvidence("sensitive", "b", (32, 32), heldout_loss=tail, fisher=1e6),
        "middle": LayerEvidence("middle", "c", (32, 32), heldout_loss=tail, fisher=1.0),
    }
    plan = fisher_allocation(evidence, 0.3)
    assert plan["sensitive"] is None  # kept dense
    assert plan["careless"] is not None and plan["careless"] < (plan["middle"] or 99)
    got = achieved({n: e.shape for n, e in evidence.items()}, plan)["removed_fraction"]
    assert 0.3 <= got < 0.35


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_compress_with_fisher_allocation_meets_the_budget(kind):
    model = build(kind, layers=2)
    report = coala.compress(model, batches(n=3), **settings(ratio=0.4, allocation="fisher"))
    assert report.allocation == "fisher"
    assert report.totals()["targeted_removed_fraction"] >= 0.4
    ranks = {row.rank for row in report.layers}
    assert len(ranks) > 1  # not uniform


def test_fisher_samples_is_its_own_setting_and_is_recorded():
    with pytest.raises(coala.CoalaError, match="fisher_samples"):
        coala.CompressConfig(fisher_samples=0)
    from coala.compress import allocation_meta

    meta = allocation_meta(coala.CompressConfig(fisher_samples=8))
    assert meta == {"kind": "fisher", "samples": 8, "curves": "held-out (2 folds)"}
