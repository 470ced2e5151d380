"""coala.distributed outside torchrun: every step is the identity, so one process runs today's code path."""

from __future__ import annotations

import pytest
import torch

import coala
from coala import distributed
from coala.distributed_run import shard_batches, solve_layers_split, split_work


def test_nothing_happens_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.init_from_env() is None
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main()
    stats = coala.ActivationStats(4, ("r", "gram", "absmean"))
    stats.update(torch.arange(12.0).reshape(3, 4))
    before = stats.state_dict()
    assert distributed.all_reduce_(stats) is stats
    after = stats.state_dict()
    assert torch.equal(before["r"]["R"], after["r"]["R"]) and after["num_rows"] == 3
    distributed.check_same({"a": 1}, "x")  # nothing to compare with
    distributed.sync("nothing")
    assert distributed.gather_json({"x": 1}) == [{"x": 1}] and distributed.broadcast_json([1, None]) == [1, None]
    t = {"a": torch.ones(2)}
    assert distributed.broadcast_tensors(t)["a"] is t["a"]
    batches = [{"input_ids": torch.ones(2, 3, dtype=torch.long)}]
    assert shard_batches(batches) == batches
    assert split_work({"a": 1.0, "b": 2.0}, lambda n: {"x": torch.tensor([ord(n)])}) == {
        "a": {"x": torch.tensor([97])}, "b": {"x": torch.tensor([98])}}
    assert solve_layers_split.__doc__ and distributed.shutdown() is None


@pytest.mark.parametrize("costs, ranks, expected", [
    ([5, 1, 4, 2], 2, [0, 0, 1, 1]),  # 5 + 1 | 4 + 2: largest first, each to the least loaded rank
    ([1, 1, 1], 3, [0, 1, 2]),
    ([3, 3], 4, [0, 1]),
])
def test_balance_is_greedy_lpt(costs, ranks, expected):
    assert distributed.balance(costs, ranks) == expected


def test_a_bad_timeout_is_named(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(coala.CoalaError, match="COALA_DIST_TIMEOUT='soon' is not a number") as err:
        distributed.init_from_env()
    assert err.value.argument == distributed.TIMEOUT_ENV
    with pytest.raises(coala.CoalaError, match="must be > 0"):
        distributed.init_from_env(timeout=0)
    assert issubclass(distributed.DistributedError, coala.CoalaError)


def test_commands_that_do_not_run_distributed_refuse_torchrun(monkeypatch, capsys, tmp_path):
    from coala.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group is joined
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(tmp_path), "--dense", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "coala export [rank 1]: error: coala export does not run distributed (only compress, compare" in err
    assert not (tmp_path / "out").exists()
