"""benchmarks/minilm.py (the issue-10 MiniLM figure) runs end to end on the bundled model and writes its files."""

from __future__ import annotations

from _benchmarks import load_benchmark


def test_minilm_benchmark_writes_a_table_and_a_plot(tmp_path, capsys):
    bench = load_benchmark("minilm")
    assert bench.main(["--nsamples", "6", "--seeds", "0", "--allocations", "uniform", "--sentences", "24",
                       "--propagations", "auto,corrected", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "minilm.md").read_text()
    assert "uniform (uniform)" in text and "out of domain" in text
    assert "uniform, propagate corrected (uniform)" in text
    assert (tmp_path / "minilm.png").stat().st_size > 1000
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("uniform (uniform) seed 0"))
    cos = float(line.split("english (out of domain) ")[1].split(",")[0])
    assert 0.3 < cos < 1.0
