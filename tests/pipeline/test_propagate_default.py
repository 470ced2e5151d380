"""propagate="auto": each method's published profiling (docs/design.md §5) — original-model activations for
asvd, svd-llm and svd-llm-v2, sequential (compressed) for coala and svd."""

from __future__ import annotations

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
