"""``torchrun --nproc-per-node 2 -m coala compress``: the real launcher, the real command, gloo on the CPU
(docs/design.md §12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coala
from _distributed import free_port
from coala.cli import main
from coala.lowrank import low_rank_layers

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--nsamples", "8", "--seqlen", "64", "--dtype", "float64", "--stats-dtype", "float64", "--threads", "1"]


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "coala", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_torchrun_compress_saves_the_one_process_model_and_rank_0_alone_reports(tmp_path, capsys):
    proc = torchrun("compress", *SMALL, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("targeted layers:") == 1 and proc.stdout.count("saved to") == 1  # rank 0 only
    assert main(["compress", *SMALL, "--quiet", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    one, two = low_rank_layers(coala.load(tmp_path / "one")), low_rank_layers(coala.load(tmp_path / "two"))
    assert one.keys() == two.keys() and len(one) == 36
    with torch.no_grad():  # MiniLM in float64: the two summation orders agree to ~1e-13
        for name in one:
            a = one[name].up.weight @ one[name].down.weight
            b = two[name].up.weight @ two[name].down.weight
            assert float((a - b).norm() / a.norm()) < 1e-5, name
    assert not (tmp_path / "two.partial").exists()


@pytest.mark.slow
def test_torchrun_bad_input_is_one_line_per_rank(tmp_path):
    proc = torchrun("compress", "--nsamples", "1", "--seqlen", "32", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"coala compress [rank {rank}]: error: fewer calibration samples (1) than ranks (2)"
                in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "x").exists()
