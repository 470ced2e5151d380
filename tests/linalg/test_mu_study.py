"""benchmarks/mu.py's maths on small float64 problems: the perturbation derivative of the regularised solution
and the paper's bound (docs/design.md §2) against coala's own regularised solves."""

from __future__ import annotations

import pytest
import torch

from _benchmarks import load_benchmark

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("m", "n", "N"), [(24, 16, 200), (16, 24, 300), (20, 20, 12)])  # last: rank-deficient X
def test_first_order_slope_and_bound(ref, m, n, N):
    mu_bench = load_benchmark("mu")
    W = ref.randn(m, n, seed=40)
    X = ref.matrix(N, n, torch.logspace(0, -2, min(N, n), dtype=F64), seed=41)
    grid = torch.logspace(-9, 1, 11, dtype=F64)
    curves = mu_bench.layer_curves("toy", W, X, grid)
    assert len(curves) == len(mu_bench.RATIOS)
    for c in curves:
        assert c.gap > 0
        # small μ: the measurement is the first-order line (the derivative is exact)
        assert mu_bench.measured_slope(c, grid) == pytest.approx(c.first_order, rel=1e-4)
        assert float(c.measured[0]) == pytest.approx(c.first_order * float(grid[0]), rel=1e-4)
        # the bound holds at every μ of the grid, and is not trivially tight
        assert bool((c.measured <= c.bound).all())
        assert float(c.bound[0] / c.measured[0]) > 2
    # the slope falls as the gap at the cut grows (smaller ranks of these spectra have larger gaps)
    slopes = sorted((c.gap, c.first_order) for c in curves)
    assert slopes[0][1] > slopes[-1][1]


def test_first_order_slope_is_the_derivative(ref):
    """The perturbation formula against a central finite difference of coala's W_μ (float64)."""
    from coala.linalg import RFactor, decompose

    mu_bench = load_benchmark("mu")
    m, n, r = 12, 10, 4
    W = ref.randn(m, n, seed=42)
    X = ref.matrix(80, n, torch.logspace(0, -1, n, dtype=F64), seed=43)
    stats = RFactor(n, dtype=F64).update(X)
    U, s, _ = torch.linalg.svd(W @ stats.R.T, full_matrices=True)
    lam = torch.zeros(m, dtype=F64)
    lam[: s.shape[0]] = s.square()
    h = 1e-5
    Wp = torch.matmul(*decompose(W, stats, mu=h).factors(r))
    W0 = torch.matmul(*decompose(W, stats).factors(r))
    assert float((Wp - W0).norm() / h) == pytest.approx(mu_bench.first_order_slope(W, U, lam, r), rel=1e-3)


@pytest.mark.slow
def test_mu_benchmark_end_to_end(tmp_path, capsys):
    """benchmarks/mu.py on the real MiniLM, small: both parts, the table, the figure, the out-of-domain file."""
    mu_bench = load_benchmark("mu")
    ood = tmp_path / "ood.txt"
    ood.write_text("\n\n".join(f"Paragraph {i} of a text from elsewhere, about lighthouses and the sea at night."
                               for i in range(5)) + "\n\nshort\n")
    argv = ["--quick", "--tokens", "256", "--layers", "encoder.layer.0.attention.self.query", "--samples", "4",
            "--adaptive-mus", "1", "--fixed-mus", "", "--ood", str(ood), "--out", str(tmp_path)]
    assert mu_bench.main(argv) == 0
    md = (tmp_path / "mu.md").read_text()
    assert "| layer.0.attention.self.query | 384 × 384 | 153 |" in md
    assert "| 4 (" in md and "| adaptive 1 |" in md and "out of domain: mean cos" in md
    assert "out of domain: 5 texts" in md  # the 'short' paragraph is not a sentence
    assert "slope ∝ gap^" in md
    assert (tmp_path / "mu.png").stat().st_size > 20_000
    assert mu_bench.ood_texts(str(tmp_path / "missing.txt")) is None  # part B then says "not measured"
    assert len(mu_bench.ood_texts("english")) > 100  # the default: the built-in evaluation text
