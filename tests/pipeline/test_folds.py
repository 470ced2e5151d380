"""Statistics kept in folds of the calibration samples (capture / walker), as the Fisher allocation's held-out
curves need them (docs/design.md §6)."""

from __future__ import annotations

import pytest
import torch

import coala
from _compress_models import batches, build, settings
from coala.walker import BlockWalker, sample_folds


def _walk_stats(model, data, folds):
    walker = BlockWalker(model, data, progress=False)
    seen = {}

    def keep(step):
        seen.update({name: step.capture.stats_for(name) for name in step.layers})

    walker.walk(keep, kinds={"r"}, dtype=torch.float64, folds=folds)
    return seen


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("pad", [False, True])
def test_folds_hold_their_samples_and_merge_to_the_whole(kind, pad):
    model = build(kind, layers=2).double()
    data = batches(n=2, batch=4, pad=pad)
    folded = _walk_stats(model, data, folds=2)
    whole = _walk_stats(model, data, folds=1)
    picks = [sample_folds(b, 0, 2) == 0 for b in data]
    assert 0 < sum(int(p.sum()) for p in picks) < 8  # both folds hold samples here
    first = [{k: v[p] for k, v in b.items()} for b, p in zip(data, picks, strict=True) if p.any()]
    alone = _walk_stats(model, first, folds=1)
    for name, stats in folded.items():
        assert stats.folds is not None and len(stats.folds) == 2
        assert stats.num_rows == whole[name].num_rows == sum(p.num_rows for p in stats.folds)
        torch.testing.assert_close(stats.r.R, whole[name].r.R, rtol=1e-9, atol=1e-9)
        assert stats.folds[0].num_rows == alone[name].num_rows
        torch.testing.assert_close(stats.folds[0].r.R, alone[name].r.R, rtol=1e-9, atol=1e-9)


def test_a_sample_keeps_its_fold_however_it_is_batched():
    data = batches(n=2, batch=4, pad=True)
    together = torch.cat([sample_folds(b, 0, 2) for b in data])
    rows = [{k: v[i : i + 1] for k, v in b.items()} for b in data for i in range(4)]
    alone = torch.cat([sample_folds(r, 0, 2) for r in rows])
    assert torch.equal(together, alone)
    assert 0 < int(together.sum()) < 8
    no_ids = {"inputs_embeds": torch.zeros(3, 5, 8)}
    assert sample_folds(no_ids, 5, 2).tolist() == [1, 0, 1]


def test_collect_statistics_keeps_folds_for_the_default_allocation_only():
    model = build("llama", layers=1)
    default = coala.collect_statistics(model, batches(n=2), coala.CompressConfig(),
                                       runtime=coala.RuntimeConfig(progress=False))
    assert all(s.folds is not None and len(s.folds) == 2 for s in default.values())
    uniform = coala.collect_statistics(model, batches(n=2), coala.CompressConfig(allocation="uniform"),
                                       runtime=coala.RuntimeConfig(progress=False))
    assert all(s.folds is None for s in uniform.values())


def test_apply_low_rank_with_the_default_allocation_uses_the_folds():
    model = build("llama", layers=2)
    data = batches(n=3)
    config = coala.CompressConfig(ratio=0.4)
    stats = coala.collect_statistics(model, data, config, runtime=coala.RuntimeConfig(progress=False))
    report = coala.apply_low_rank(model, stats, config, batches=data, progress=False)
    assert report.totals()["targeted_removed_fraction"] >= 0.4
    for s in stats.values():
        s.folds = None
    with pytest.raises(ValueError, match="folds"):
        coala.apply_low_rank(build("llama", layers=2), stats, config, batches=data, progress=False)


def test_compress_default_records_the_fisher_allocation():
    report = coala.compress(build("gpt2", layers=2), batches(n=2), **settings(ratio=0.3))
    assert report.allocation == "fisher"
    assert report.totals()["targeted_removed_fraction"] >= 0.3
