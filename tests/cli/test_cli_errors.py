"""Issue #14 on the command line: every bad argument and every fault ends in ONE line ``coala CMD: error: ...``
naming the culprit and exit status 2 (never a traceback by default); anything unexpected in one line with exit
status 1 and a pointer to ``--debug``; Ctrl-C in one line with exit status 130 saying how to resume."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers

import coala.walker
from _faults import read_only_folder
from coala.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMPRESS_MODULE = importlib.import_module("coala.compress")  # the package's `coala.compress` is the function


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random BERT folder with MiniLM's tokenizer, and a calibration text file."""
    folder = tmp_path_factory.mktemp("cli") / "bert"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    calib = folder.parent / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                 for i in range(12)))
    return folder, calib


def _compress(model_dir, out, *extra, calib=None):
    folder, text = model_dir
    return ["compress", str(folder), "--calib", str(calib or text), "--nsamples", "8", "--seqlen", "32",
            "--out", str(out), "--quiet", *extra]


def _one_error_line(capsys, status_line: str = "coala compress: error: ") -> str:
    """The one error line (the last of stderr; progress lines of a model load may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(status_line), err
    assert sum(line.startswith("coala ") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


BOUNDS = [  # extra flags → what the one line must name
    (["--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["--ratio", "1"], "ratio must be strictly between 0 and 1"),
    (["--ratio", "nan"], "ratio must be strictly between 0 and 1"),
    (["--rank", "0"], "rank must be a positive int or 'full'"),
    (["--mu", "-1"], "mu must be a finite number >= 0"),
    (["--mu", "inf"], "mu must be a finite number >= 0"),
    (["--nsamples", "0"], "nsamples must be a positive int"),
    (["--seqlen", "-5"], "seqlen must be a positive int"),
    (["--batch-size", "0"], "batch_size must be a positive int"),
    (["--sensitivity-samples", "0"], "sensitivity_samples must be a positive int"),
    (["--probe-ratios", "0.2,1.5"], "probe_ratios must be numbers in (0, 1)"),
    (["--allocation", "sensitivity", "--ratio", "0.9"], "exceeds the deepest probe ratio"),
    (["--max-shard-size", "12XB"], "max_shard_size must be a positive number of bytes"),
    (["--max-shard-size", "0"], "max_shard_size must be a positive number of bytes"),
    (["--device", "gpu0"], "device 'gpu0' is not a torch device"),
    (["--targets", "query,nope"], "target 'nope' matches no linear layer"),
    (["--method", "svd", "--mu", "1"], "mu / adaptive_mu apply to method 'coala' only"),
]


@pytest.mark.parametrize(("extra", "message"), BOUNDS, ids=[" ".join(e) for e, _ in BOUNDS])
def test_argument_bounds(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_compress(model_dir, out, *extra)) == 2
    assert message in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--nsamples", "many"], "argument --nsamples: invalid int value: 'many'"),
    (["--batch-size", "x"], "argument --batch-size: expected an int, 'auto' or 'none', got 'x'"),
    (["--method", "nope"], "argument --method: invalid choice: 'nope'"),
])
def test_unparsable_arguments_are_argparse_errors(model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(_compress(model_dir, tmp_path / "out", *extra))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _no_tokenizer(tmp_path, model_dir):
    folder = tmp_path / "bare"
    transformers.BertModel.from_pretrained(model_dir[0]).save_pretrained(folder)
    return {"model": folder}, r"model folder '.*bare' has no tokenizer files"


def _latin1_calib(tmp_path, model_dir):
    calib = tmp_path / "latin1.txt"
    calib.write_bytes("na\xefve caf\xe9\n\nd\xe9j\xe0 vu".encode("latin-1"))
    return {"calib": calib}, r"latin1\.txt' is not UTF-8 text: byte 0xef at offset 2 \(line 1\)"


def _missing_calib(tmp_path, model_dir):
    return {"calib": tmp_path / "absent.txt"}, r"calibration file '.*absent\.txt' does not exist"


def _out_below_a_file(tmp_path, model_dir):
    (tmp_path / "file").write_text("x")
    return {"out": tmp_path / "file" / "out"}, r"cannot write the output folder .*file/out: .*file is a file"


def _json_is_a_folder(tmp_path, model_dir):
    (tmp_path / "report").mkdir()
    return {"extra": ["--json", str(tmp_path / "report")]}, r"--json .*report is a folder"


FAULTS = {"model folder without tokenizer": _no_tokenizer, "latin-1 calibration": _latin1_calib,
          "missing calibration": _missing_calib, "--out below a file": _out_below_a_file,
          "--json is a folder": _json_is_a_folder}


@pytest.mark.parametrize("case", list(FAULTS))
def test_faults_are_one_line_naming_the_culprit(model_dir, tmp_path, capsys, case):
    import re

    where, pattern = FAULTS[case](tmp_path, model_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = _compress((where.get("model", model_dir[0]), model_dir[1]), where.get("out", tmp_path / "out"),
                     *where.get("extra", []), calib=where.get("calib"))
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert re.search(pattern, line), line
    assert "sentencepiece" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_read_only_output_folder(model_dir, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        assert main(_compress(model_dir, ro / "out")) == 2
    assert "ro/out: " in _one_error_line(capsys) and not (tmp_path / "ro.partial").exists()


def test_damaged_compressed_folder_from_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_compress(model_dir, out)) == 0
    capsys.readouterr()
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut inside the header
    assert main(["eval", str(out), "--ppl", "builtin"]) == 2
    assert "model.safetensors is damaged (truncated" in _one_error_line(capsys, "coala eval: error: ")


def test_unexpected_error_points_to_debug(model_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug\nover two lines")

    monkeypatch.setattr(COMPRESS_MODULE, "compress", broken)  # stands in for a bug: there is no real one to hit
    assert main(_compress(model_dir, tmp_path / "out")) == 1
    line = _one_error_line(capsys, "coala compress: unexpected error: ")
    assert "RuntimeError: an internal bug over two lines" in line and "rerun with --debug" in line
    for args in (["--debug", *_compress(model_dir, tmp_path / "out")], [*_compress(model_dir, tmp_path / "out"),
                                                                        "--debug"]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "an internal bug" in err


def test_ctrl_c_says_how_to_resume(model_dir, tmp_path, capsys, monkeypatch):
    def ctrl_c_after(i: int) -> None:  # Ctrl-C pressed right after block 0's checkpoint was written
        if i == 0:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(coala.walker, "maybe_interrupt", ctrl_c_after)
    assert main(_compress(model_dir, out)) == 130
    line = _one_error_line(capsys, "coala compress: interrupted; ")
    assert f"finished blocks are kept in {out}.partial" in line and "--resume" in line
    monkeypatch.undo()
    assert main(_compress(model_dir, out, "--resume")) == 0 and (out / "coala.json").is_file()
    capsys.readouterr()

    def ctrl_c_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(COMPRESS_MODULE, "compress", ctrl_c_at_once)
    assert main(_compress(model_dir, tmp_path / "other")) == 130
    assert "nothing was written" in _one_error_line(capsys, "coala compress: interrupted; ")
