"""propagate="auto": each method's published profiling (docs/design.md §5) — original-model activations for
asvd, svd-llm and svd-llm-v2, sequential (compressed) for svd and for coala on encoders — and for coala on causal LMs
the error-correcting solve (corrected, docs/design.md §4)."""

from __future__ import annotations

import json

import pytest

from _compress_models import batches, build, settings
from coala.compress import compress
from coala.config import CompressConfig
from coala.errors import CoalaError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("method", "expected"), [
    ("coala", "compressed"), ("svd", "compressed"), ("asvd", "original"), ("svd-llm", "original"),
    ("svd-llm-v2", "original"),
])
def test_auto_resolves_to_the_methods_own(method, expected):
    assert CompressConfig(method=method).propagate == "auto"
    assert CompressConfig(method=method).resolved_propagate == expected
    for explicit in ("compressed", "original"):
        assert CompressConfig(method=method, propagate=explicit).resolved_propagate == explicit


@pytest.mark.parametrize(("method", "adaptive_mu", "causal", "expected"), [
    ("coala", False, True, "corrected"), ("coala", False, False, "compressed"), ("coala", True, True, "compressed"),
    ("svd", False, True, "compressed"), ("svd-llm", False, True, "original"), ("asvd", False, False, "original"),
])
def test_auto_on_a_model(method, adaptive_mu, causal, expected):
    config = CompressConfig(method=method, adaptive_mu=adaptive_mu)
    assert config.for_model(causal).propagate == expected
    explicit = CompressConfig(method=method, adaptive_mu=adaptive_mu, propagate="original")
    assert explicit.for_model(causal) is explicit


@pytest.mark.parametrize(("kind", "expected"), [("llama", "corrected"), ("bert", "compressed")])
def test_coala_corrects_on_causal_lms_and_not_on_encoders_by_default(kind, expected, tmp_path):
    data = batches(n=2)
    auto = compress(build(kind), data, **settings(ratio=0.5, out_dir=tmp_path / "out"))
    explicit = compress(build(kind), data, **settings(ratio=0.5, propagate=expected))
    assert auto.propagate == expected
    assert [r.rel_error for r in auto.layers] == [r.rel_error for r in explicit.layers]
    meta = json.loads((tmp_path / "out" / "coala.json").read_text())
    assert meta["propagate"] == expected and ("correction" in meta) == (expected == "corrected")
    assert ("fitted partly to the original model's (propagate: corrected)" in auto.table()) == (expected == "corrected")


def test_unknown_propagation_is_refused():
    with pytest.raises(CoalaError, match=r"propagate must be 'auto' or one of "
                                         r"\('compressed', 'original', 'corrected'\)"):
        CompressConfig(propagate="sequential")


def test_svd_llm_compresses_on_the_original_models_activations_by_default():
    data = batches(n=2)
    a, b, c = build("llama"), build("llama"), build("llama")
    auto = compress(a, data, **settings(ratio=0.5, method="svd-llm"))
    original = compress(b, data, **settings(ratio=0.5, method="svd-llm", propagate="original"))
    sequential = compress(c, data, **settings(ratio=0.5, method="svd-llm", propagate="compressed"))
    assert auto.propagate == "original"
    assert [r.rel_error for r in auto.layers] == [r.rel_error for r in original.layers]
    assert [r.rel_error for r in auto.layers] != [r.rel_error for r in sequential.layers]
    assert "next block calibrated on the original block's outputs" in auto.table()
