"""``coala bench``: a thin launcher for the repository's benchmarks/NAME.py scripts (not part of the package)."""

from __future__ import annotations

import os
import subprocess
import sys

from _benchmarks import BENCHMARKS
from coala.cli import bench as launcher
from coala.cli import main

TINY = ["--no-minilm", "--tokens", "256", "--width", "32"]  # synthetic inputs only: about a second


def test_lists_the_scripts_of_the_checkout(capsys):
    assert launcher.benchmarks_dir() == BENCHMARKS
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    for name in ("compare", "compress", "fidelity", "lora", "memory", "runtime", "stability"):
        assert name in out
    assert "_report" not in out and "_activations" not in out


def test_finds_the_checkout_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./benchmarks here
    assert launcher.benchmarks_dir() == BENCHMARKS


def test_unknown_name_is_a_clear_error_listing_the_names(capsys):
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err
    assert "stability" in err and "runtime" in err and "_report" not in err


def test_without_a_source_checkout_says_where_benchmarks_live(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "candidate_dirs", lambda: [tmp_path / "site-packages" / "benchmarks"])
    assert main(["bench", "stability"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks live in the source repository" in err and "python benchmarks/NAME.py" in err


def test_runs_a_script_and_returns_its_exit_status(tmp_path, capsys):
    argv_before = list(sys.argv)
    assert main(["bench", "stability", *TINY, "--out", str(tmp_path)]) == 0
    assert sys.argv == argv_before
    assert (tmp_path / "stability.png").stat().st_size > 10_000
    assert "| synthetic-1e-8 | coala |" in (tmp_path / "stability.md").read_text()
    assert main(["bench", "stability", "--no-such-option"]) == 2  # the script's argparse error comes back
    assert "--no-such-option" in capsys.readouterr().err


def test_script_runs_on_its_own_from_the_repository_root(tmp_path):
    root = BENCHMARKS.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "benchmarks/stability.py", *TINY, "--out", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "stability.png").is_file() and (tmp_path / "stability.md").is_file()
