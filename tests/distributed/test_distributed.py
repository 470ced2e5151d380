"""Distributed calibration on real torch.distributed (gloo, CPU), processes started as torchrun would
(tests/_distributed.py): the reduced statistics against float64 references, and every compressed W' against the
one-process result (docs/design.md §11)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import coala
from _compress_models import batches
from _distributed import build_case, compress_worker, rows_of_rank, spawn, stats_worker
from coala.compress import compress
from coala.config import CompressConfig, RuntimeConfig
from coala.lowrank import low_rank_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_all_reduce_gives_the_statistics_of_every_rows_rows(ref, tmp_path):
    n, world = 12, 3  # three ranks: the TSQR tree's odd branch (rank 2 joins rank 0 in the second round)
    spawn(stats_worker, world, str(tmp_path), n)
    X = torch.cat([rows_of_rank(r, n) for r in range(world)]).double()
    R_ref, G_ref = ref.r_factor(X), X.T @ X
    got = [safetensors.torch.load_file(str(tmp_path / f"stats-{r}.safetensors")) for r in range(world)]
    for key, tol in (("float32", 2e-6), ("float64", 1e-13)):
        for r in range(world):  # rank 0's merged factor is broadcast: every rank holds the same bits
            assert torch.equal(got[r][f"{key}.R"], got[0][f"{key}.R"])
        for name in ("R", "alone"):
            R = got[0][f"{key}.{name}"].double()
            assert float((R - R_ref).norm() / R_ref.norm()) < tol, (key, name)
        assert float((got[0][f"{key}.G"].double() - G_ref).norm() / G_ref.norm()) < tol
        torch.testing.assert_close(got[0][f"{key}.absmean"], X.abs().mean(0), rtol=1e-12, atol=0)
        assert got[0][f"{key}.rows"].tolist() == [X.shape[0]] * 5
    transport = [json.loads((tmp_path / f"transport-{r}.json").read_text()) for r in range(world)]
    for t in transport:
        assert t["tensors"] and t["json"] == {"x": [1, 2.5, None]} and t["gather"] == [0, 10, 20]
        assert t["same_ok"] == {}
        assert t["differs"]["type"] == "DistributedError" and t["differs"]["ranks"] == [1, 2]
        assert "rank 1 differs from rank 0 in b" in t["differs"]["message"]


def _assert_same_products(a: torch.nn.Module, b: torch.nn.Module, tol: float) -> None:
    la, lb = low_rank_layers(a), low_rank_layers(b)
    assert la.keys() == lb.keys() and la
    with torch.no_grad():
        for name in la:
            Wa = la[name].up.weight.double() @ la[name].down.weight.double()
            Wb = lb[name].up.weight.double() @ lb[name].down.weight.double()
            assert float((Wa - Wb).norm() / Wa.norm()) <= tol, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_two_ranks_save_the_one_process_model(kind, tmp_path):
    # float64 statistics: the two summation orders agree to ~1e-15, so W' must agree to float32 rounding; the
    # float32 default (llama, coala) agrees to the rounding of the statistics (≈ a batch reordering in one process)
    cases = [(kind, "coala", "float64", True), (kind, "svd-llm", "float64", False)]
    if kind == "llama":
        cases.append((kind, "coala", "float32", False))
    spawn(compress_worker, 2, str(tmp_path), cases)
    for _, method, dtype, pad in cases:
        name = f"{kind}-{method}-{dtype}"
        one = build_case(kind)
        report = compress(one, batches(n=3, pad=pad), CompressConfig(ratio=0.4, method=method, stats_dtype=dtype),
                          runtime=RuntimeConfig(progress=False))
        _assert_same_products(one, coala.load(tmp_path / name), 1e-5)
        ranks = [json.loads((tmp_path / f"{name}-report-{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1]  # every rank returns the same report ...
        for row, mine in zip(report.to_dict()["layers"], ranks[0], strict=True):  # ... that of one process
            assert row["name"] == mine["name"] and row["rank"] == mine["rank"]
            assert mine["rel_error"] == pytest.approx(row["rel_error"], rel=1e-4)
