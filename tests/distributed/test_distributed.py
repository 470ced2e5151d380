"""Distributed calibration on real torch.distributed (gloo, CPU), processes started as torchrun would
(tests/_distributed.py): the reduced statistics against float64 references, and every compressed W' against the
one-process result (docs/design.md §12)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import coala
from _compress_models import batches
from _distributed import (
    build_case,
    compare_lora_worker,
    compress_worker,
    errors_worker,
    failure_worker,
    lora_config,
    lora_products,
    resume_worker,
    rows_of_rank,
    run_compare,
    spawn,
    stats_worker,
)
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
    X02 = torch.cat([rows_of_rank(0, n), rows_of_rank(2, n)]).double()
    for r in (0, 2):  # all_reduce_(stats, group=...) over a sub-group
        sub = safetensors.torch.load_file(str(tmp_path / f"sub-{r}.safetensors"))
        assert float((sub["R"] - ref.r_factor(X02)).norm() / ref.r_factor(X02).norm()) < 1e-13
        torch.testing.assert_close(sub["G"], X02.T @ X02)
        assert int(sub["rows"]) == X02.shape[0]
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
    if kind == "llama":  # and the error-correcting propagation: two streams, paired statistics, padding
        cases += [(kind, "coala", "float32", False), (kind, "coala+corrected", "float64", True)]
    spawn(compress_worker, 2, str(tmp_path), cases)
    for _, method, dtype, pad in cases:
        name = f"{kind}-{method}-{dtype}"
        one = build_case(kind)
        config = CompressConfig(ratio=0.4, method=method.partition("+")[0], stats_dtype=dtype,
                                propagate=method.partition("+")[2] or "auto")
        report = compress(one, batches(n=3, pad=pad), config, runtime=RuntimeConfig(progress=False))
        assert report.propagate == (method.partition("+")[2] or report.propagate)
        _assert_same_products(one, coala.load(tmp_path / name), 1e-5)
        ranks = [json.loads((tmp_path / f"{name}-report-{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1]  # every rank returns the same report ...
        for row, mine in zip(report.to_dict()["layers"], ranks[0], strict=True):  # ... that of one process
            assert row["name"] == mine["name"] and row["rank"] == mine["rank"]
            assert mine["rel_error"] == pytest.approx(row["rel_error"], rel=1e-4)


def test_bad_input_is_named_and_a_rank_that_leaves_is_named_after_the_timeout(tmp_path):
    spawn(errors_worker, 2, str(tmp_path), timeout_s=3.0)
    res = [json.loads((tmp_path / f"errors-{r}.json").read_text()) for r in range(2)]
    for r in res:  # both ranks raise the same error, naming rank 1 and what differs
        assert r["settings"]["type"] == "DistributedError" and r["settings"]["ranks"] == [1]
        assert "rank 1 differs from rank 0 in settings" in r["settings"]["message"]
        assert r["model"]["ranks"] == [1] and "differs from rank 0 in weights" in r["model"]["message"]
        assert r["samples"]["argument"] == "nsamples"
        assert "fewer calibration samples (1) than ranks (2)" in r["samples"]["message"]
    exit_ = res[0]["exit"]
    assert exit_["type"] == "DistributedError" and exit_["ranks"] == [1]
    assert "timed out after 3 s" in exit_["message"] and "rank 1 (last at:" in exit_["message"]
    assert 2.5 < res[0]["exit_s"] < 30


def test_a_failing_rank_is_named_at_once(tmp_path):
    spawn(failure_worker, 2, str(tmp_path), timeout_s=None)  # compress joins the group by itself
    zero, one = (json.loads((tmp_path / f"failure-{r}.json").read_text()) for r in range(2))
    assert zero["joined"] == one["joined"] == 2
    assert one["type"] == "CoalaError" and "nan" in one["message"].lower()
    assert zero["type"] == "DistributedError" and zero["ranks"] == [1]
    assert zero["message"].startswith("rank 1 failed: CoalaError:") and zero["seconds"] < 60  # not 1800 s


@pytest.mark.slow
def test_a_distributed_run_resumes_to_the_one_process_model(tmp_path):
    spawn(resume_worker, 2, str(tmp_path), "interrupt")
    stopped = [json.loads((tmp_path / f"interrupt-{r}.json").read_text()) for r in range(2)]
    assert all(s["type"] == "SimulatedInterruption" for s in stopped)
    assert "block-00000.json" in stopped[0]["partial"] and not (tmp_path / "model").exists()
    spawn(resume_worker, 2, str(tmp_path), "resume")
    resumed = [json.loads((tmp_path / f"resume-{r}.json").read_text()) for r in range(2)]
    assert [r["resumed"] for r in resumed] == [1, 1]
    assert not (tmp_path / "model.partial").exists()  # rank 0 cleared the checkpoint (and the hidden folders)
    one = build_case("llama")
    compress(one, batches(n=3), CompressConfig(ratio=0.4, stats_dtype="float64"), runtime=RuntimeConfig(progress=False))
    _assert_same_products(one, coala.load(tmp_path / "model"), 1e-5)


@pytest.mark.slow
def test_compare_and_lora_init_share_their_work_and_equal_one_process(tmp_path):
    from peft import LoraConfig

    from coala.adapters import init_lora
    from coala.data import builtin_texts

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(builtin_texts("test")[:2])[:6000])
    spawn(compare_lora_worker, 2, str(tmp_path), str(text))
    rows = [json.loads((tmp_path / f"compare-{r}.json").read_text()) for r in range(2)]
    assert rows[0] == rows[1]
    for mine, one in zip(rows[0], run_compare(str(text)), strict=True):
        assert (mine["method"], mine["ratio"], mine["removed"]) == (one["method"], one["ratio"], one["removed"])
        for key in one:
            if key.startswith("ppl") or key == "weighted_err":
                assert mine[key] == pytest.approx(one[key], rel=1e-5), (mine["method"], key)
    got = [safetensors.torch.load_file(str(tmp_path / f"lora-{r}.safetensors")) for r in range(2)]
    ref = lora_products(init_lora(build_case("llama"), batches(n=3), lora_config(LoraConfig),
                                  stats_dtype=torch.float64, progress=False))
    assert got[0].keys() == got[1].keys() == ref.keys() and len(ref) == 6
    for name, product in ref.items():
        assert torch.equal(got[0][name], got[1][name])
        assert float((got[0][name] - product).norm() / product.norm()) < 1e-5, name
