"""coala.plotting (machine line, headless figures) and compare's results files with and without matplotlib."""

from __future__ import annotations

import sys

import pytest
import torch

from coala.compare import CompareResult, write_results
from coala.plotting import machine, new_figure


def _result() -> CompareResult:
    rows = [{"method": "original", "ratio": 0.0, "removed": 0.0, "weighted_err": 0.0, "cos_mean": 1.0}]
    rows += [{"method": m, "ratio": r, "removed": r, "weighted_err": e * r, "cos_mean": 1.0 - e * r}
             for m, e in (("coala", 0.1), ("svd", 0.3)) for r in (0.2, 0.4)]
    return CompareResult(rows, ["cos_mean"], {"total_s": 1.0})


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable (None in sys.modules makes ``import`` raise ImportError)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def test_machine_is_one_line():
    line = machine()
    assert "\n" not in line and f"torch {torch.__version__}" in line and "CPU cores" in line


def test_new_figure_is_headless_and_saves_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    fig, axes = new_figure(1, 2, figsize=(4, 2), squeeze=False)
    assert axes.shape == (1, 2)
    axes[0][0].plot([1, 2], [3, 4])
    fig.tight_layout()
    fig.savefig(tmp_path / "f.png", dpi=40)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_figure_without_matplotlib_says_how_to_install(no_matplotlib):
    with pytest.raises(ImportError, match=r"coala\[plot\]"):
        new_figure()


def test_write_results_draws_the_png_and_leaves_grad_mode_alone(tmp_path):
    pytest.importorskip("matplotlib")
    with torch.no_grad():
        files = write_results(_result(), tmp_path)
        assert not torch.is_grad_enabled()
    assert set(files) == {"csv", "md", "png"} and files["png"].stat().st_size > 1000


def test_write_results_without_matplotlib_skips_only_the_png(tmp_path, no_matplotlib, capsys):
    files = write_results(_result(), tmp_path)
    assert set(files) == {"csv", "md"}
    assert files["csv"].read_text().splitlines()[0].startswith("method,allocation,ratio")
    assert "**0.98**" in files["md"].read_text()  # best cos_mean at 0.2 in bold
    assert not (tmp_path / "results.png").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.png skipped" in err and "coala[plot]" in err
