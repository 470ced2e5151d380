"""Sensitivity-based rank allocation: curves, the Lagrangian allocation, probing, and compress end to end."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from _compress_models import batches, build, settings
from coala.compress import compress
from coala.config import CompressConfig
from coala.linalg import decompose
from coala.lowrank import LowRankLinear, dense_weight
from coala.sensitivity import SensitivityCurve, allocate, first_samples, measure, output_change, outputs, truncated

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _curve(name: str, d1: float, d2: float) -> SensitivityCurve:
    """A 6 × 4 matrix (ranks 1 and 2 save parameters) probed at ranks 1 and 2."""
    return SensitivityCurve(name, (6, 4), [1.0, 0.5, 0.2, 0.05, 0.0], [(1, d1), (2, d2)])


def test_curve_interpolates_in_loss_fraction_and_refuses_to_extrapolate():
    c = SensitivityCurve("l", (8, 8), [1.0, 0.6, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0], [(1, 0.9), (3, 0.2)])
    assert c.change(None) == 0.0 and c.change(1) == pytest.approx(0.9) and c.change(3) == pytest.approx(0.2)
    assert c.change(2) == pytest.approx(0.2 + (0.9 - 0.2) * (0.3 - 0.1) / (0.6 - 0.1))
    assert c.change(4) == pytest.approx(0.0)  # between (0, 0) and the rank-3 probe: e(4) = 0
    with pytest.raises(ValueError, match="layer l"):
        c.change(0)


def test_allocation_is_optimal_for_the_parameters_it_uses():
    curves = {"a": _curve("a", 0.9, 0.1), "b": _curve("b", 0.02, 0.01), "c": _curve("c", 0.3, 0.05)}
    shapes = {name: (6, 4) for name in curves}
    options = [None, 1, 2]

    def cost(plan):
        return sum(24 if r is None else 10 * r for r in plan.values())

    def change(plan):
        return sum(curves[n].change(r) for n, r in plan.items())

    for ratio in (0.1, 0.3, 0.5):
        plan = allocate(curves, ratio, shapes)
        assert cost(plan) <= (1 - ratio) * 72
        # brute force: no plan using at most as many parameters changes the output less
        best = min(change(dict(zip(curves, combo, strict=True))) for combo in itertools.product(options, repeat=3)
                   if cost(dict(zip(curves, combo, strict=True))) <= cost(plan))
        assert change(plan) == pytest.approx(best)
    plan = allocate(curves, 0.3, shapes)
    assert plan["b"] is not None and plan["b"] <= (plan["a"] or 3)  # the insensitive layer gives up more
    with pytest.raises(ValueError, match="ratio"):
        allocate(curves, 0.6, shapes)  # 1 − 30/72 = 0.58 is the most the probed ranks can remove


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_truncated_weight_is_a_low_rank_layer_and_is_restored(kind):
    model = build(kind)
    module = next(m for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn")))
    before = module.weight.detach().clone()
    W = dense_weight(module).detach()
    A, B = decompose(W, torch.randn(64, W.shape[1])).factors(3)
    x = torch.randn(5, W.shape[1])
    bias = None if module.bias is None else module.bias.detach()
    with truncated(module, A, B):
        torch.testing.assert_close(module(x), LowRankLinear.from_factors(A, B, bias)(x))
    assert torch.equal(module.weight, before)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_probes_measure_nothing_at_full_rank_and_something_below(kind):
    model = build(kind)
    data = first_samples(batches(n=2), 6)
    assert [b["input_ids"].shape[0] for b in data] == [4, 2]
    ref = outputs(model, data)
    assert ref.ndim == (1 if kind == "llama" else 2)  # token NLLs vs sentence embeddings
    assert output_change(model, data, ref) == pytest.approx(0.0, abs=1e-6)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("up_proj", "intermediate.dense"))}
    decs = {n: decompose(dense_weight(m).detach(), torch.randn(256, dense_weight(m).shape[1]))
            for n, m in layers.items()}
    curves = measure(model, layers, decs, data, ref, probe_ratios=(0.2, 0.8))
    assert set(curves) == set(layers)
    for c in curves.values():
        assert [r for r, _ in c.probes] == [3, 15]  # 48 × 32 at 80 % and 20 % removed
        assert all(abs(d) > 1e-7 for _, d in c.probes)
        assert c.loss_fraction[0] == pytest.approx(1.0) and c.loss_fraction[-1] == pytest.approx(0.0, abs=1e-6)
    name = next(iter(layers))
    A, B = decs[name].factors(3)
    with pytest.raises(ValueError, match=f"{name} at rank 3"):
        measure(model, {name: layers[name]}, {name: _Poisoned(A, B)}, data, ref, probe_ratios=(0.8,))


class _Poisoned:
    """Factors whose product holds a NaN (a broken decomposition): the probe must name the layer."""

    def __init__(self, A, B):
        self.A, self.B = A.clone(), B.clone()
        self.A[0, 0] = float("nan")
        self.max_rank = min(A.shape[0], B.shape[1])

    def factors(self, rank):
        return self.A, self.B

    def truncation_loss(self):
        return torch.linspace(1.0, 0.0, self.max_rank + 1, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_compress_with_sensitivity_allocation(kind, tmp_path):
    model = build(kind, layers=2, init=0.2)
    report = compress(model, batches(n=2), **settings(ratio=0.3, allocation="sensitivity", sensitivity_samples=4,
                                                      out_dir=str(tmp_path / "out")))
    assert report.allocation == "sensitivity" and report.times["allocation_s"] > 0
    assert report.removed_fraction >= 0.3
    ranks = [r.rank for r in report.layers]
    assert len(set(ranks)) > 2  # not the uniform plan
    meta = json.loads((tmp_path / "out" / "coala.json").read_text())
    assert meta["allocation"] == {"kind": "sensitivity", "samples": 4, "probe_ratios": [0.2, 0.4, 0.6, 0.8]}
    assert "ranks: sensitivity allocation" in report.table()


def test_bad_allocation_settings():
    for kwargs, match in (({"allocation": "greedy"}, "allocation"), ({"sensitivity_samples": 0}, "sensitivity_samples"),
                          ({"probe_ratios": (0.2, 1.0)}, "probe_ratios"),
                          ({"allocation": "sensitivity", "ratio": 0.85}, "deepest probe")):
        with pytest.raises(ValueError, match=match):
            CompressConfig(**kwargs)
