"""The allocation registry: built-ins by hand, and a NEW allocation added by one registered function only
(registered in this file, nothing else touched) runs through ``compress`` and the command line."""

from __future__ import annotations

import pytest
import torch

from _compress_models import batches, build, settings
from coala.allocate import ALLOCATIONS, LayerEvidence, get_allocation, register_allocation, uniform_ranks
from coala.cli import build_parser
from coala.compress import compress
from coala.config import CompressConfig
from coala.lowrank import low_rank_params


def _equal_error(evidence, ratio):
    """Every matrix gets the smallest rank whose relative truncation loss is ≤ τ, τ bisected to the budget."""
    budget = (1 - ratio) * sum(m * n for m, n in (e.shape for e in evidence.values()))

    def plan(tau: float) -> dict:
        out = {}
        for name, e in evidence.items():
            m, n = e.shape
            rel = e.tail_loss / e.tail_loss[0]
            r = int(torch.nonzero(rel <= tau)[0])
            out[name] = max(r, 1) if low_rank_params(m, n, max(r, 1)) < m * n else None
        return out

    def cost(p: dict) -> float:
        return sum(m * n if p[k] is None else low_rank_params(m, n, p[k])
                   for k, (m, n) in ((k, e.shape) for k, e in evidence.items()))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(plan(mid)) > budget else (lo, mid)
    return plan(hi)


@pytest.fixture
def equal_error():
    register_allocation("equal-error", needs=("tail_loss",))(_equal_error)
    yield "equal-error"
    del ALLOCATIONS["equal-error"]


def test_a_registered_allocation_runs_through_compress_and_the_cli(equal_error):
    model = build("llama", layers=2)
    report = compress(model, batches(n=2), **settings(ratio=0.4, allocation=equal_error))
    assert report.allocation == equal_error and report.removed_fraction >= 0.4
    assert len({r.rank for r in report.layers}) > 2  # not the uniform plan
    args = build_parser().parse_args(["compress", "--allocation", equal_error])
    assert args.allocation == equal_error  # the CLI's choices come from the registry


def test_registry_refuses_duplicates_and_unknown_evidence():
    with pytest.raises(ValueError, match="already registered"):
        register_allocation("uniform")(lambda evidence, ratio: {})
    with pytest.raises(ValueError, match="unknown evidence"):
        register_allocation("x", needs=("gradients",))
    with pytest.raises(ValueError, match="unknown allocation"):
        get_allocation("nope")
    with pytest.raises(ValueError, match="allocation"):
        CompressConfig(allocation="nope")


def test_builtins_by_hand():
    shapes = {"a.0.q": (64, 64), "a.1.q": (64, 64)}
    evidence = {n: LayerEvidence(n, "q", s, torch.linspace(1e4, 0, 65, dtype=torch.float64)) for n, s in shapes.items()}
    assert get_allocation("uniform").allocate(evidence, 0.5) == uniform_ranks(shapes, 0.5) == {n: 16 for n in shapes}
    evidence["a.1.q"].tail_loss = evidence["a.1.q"].tail_loss * 100  # lossier: V2 cuts it less
    v2 = get_allocation("svd-llm-v2").allocate(evidence, 0.5)
    assert v2["a.1.q"] > 16 > v2["a.0.q"]
    assert CompressConfig(method="svd-llm-v2").resolved_allocation == "svd-llm-v2"
    assert CompressConfig(method="coala").resolved_allocation == "fisher"
    assert CompressConfig(method="svd-llm").resolved_allocation == "uniform"
    assert CompressConfig(method="svd-llm-v2", rank=4).resolved_allocation == "uniform"  # forced ranks
