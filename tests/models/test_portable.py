"""What save_compressed writes for loaders other than coala (config.json, modeling_coala.py, carried files),
folder modes, folders written before that step, and the dense export's library function."""

from __future__ import annotations

import ast
import json
import os
import stat

import pytest
import torch

from _tiny_models import factorise, inputs, output, tiny
from coala.export import export_dense
from coala.files import umask
from coala.io import OutputExistsError, load, read_meta, save_compressed
from coala.portable import CODE_FILE, carry_source_files, read_base_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny("llama", tie=False)
    factorise(model, rank=6)
    return model, save_compressed(model, tmp_path_factory.mktemp("portable") / "m", meta={"method": "svd"})


def test_config_names_the_remote_class_and_records_the_base(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "coala_llama" and config["architectures"] == ["CoalaLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_coala.CoalaLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_coala.CoalaLlamaForCausalLM"}
    assert config["coala_base"]["model_type"] == "llama" and config["coala_base"]["model_class"] == "LlamaForCausalLM"
    assert config["coala_low_rank"] == read_meta(folder)["low_rank"]
    base = read_base_config(folder)
    assert type(base) is type(model.config) and base.model_type == "llama"
    assert not hasattr(base, "coala_low_rank") and not hasattr(base, "auto_map")


def test_the_modelling_file_is_self_contained(saved):
    _, folder = saved
    tree = ast.parse((folder / CODE_FILE).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported == {"__future__", "torch", "transformers"}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"CoalaLowRank", "CoalaLlamaConfig", "CoalaLlamaForCausalLM"} <= classes


def test_folder_and_files_get_normal_modes(saved):
    _, folder = saved
    mask = umask()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask
    for path in folder.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path.name


def test_a_folder_written_before_the_modelling_file_still_loads(saved, tmp_path):
    """Old folders: config.json is the plain base config, no modeling_coala.py."""
    model, folder = saved
    old = tmp_path / "old"
    old.mkdir()
    for path in folder.iterdir():
        if path.name != CODE_FILE:
            (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text())
    base = config.pop("coala_base")
    for key in ("auto_map", "coala_low_rank"):
        config.pop(key)
    config.update(model_type=base["model_type"])
    config.pop("architectures")
    (old / "config.json").write_text(json.dumps(config))
    ids = inputs()
    assert torch.equal(output(load(old), ids), output(model, ids))
    assert torch.equal(output(load(folder), ids), output(model, ids))


def test_carry_copies_sentence_transformers_files_and_never_replaces(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "1_Pooling").mkdir(parents=True)
    dst.mkdir()
    (src / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "T"},
                                                  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "P"},
                                                  {"idx": 2, "name": "2", "path": "2_Normalize", "type": "N"}]))
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "sentence_bert_config.json").write_text("{}")
    (src / "vocab.txt").write_text("a\nb\n")
    (src / "config.json").write_text('{"source": true}')
    (dst / "config.json").write_text('{"compressed": true}')
    (dst / "vocab.txt").write_text("mine\n")
    copied = carry_source_files(src, dst)
    assert sorted(copied) == ["1_Pooling", "modules.json", "sentence_bert_config.json"]
    assert (dst / "1_Pooling" / "config.json").is_file() and not (dst / "2_Normalize").exists()
    assert (dst / "vocab.txt").read_text() == "mine\n" and "compressed" in (dst / "config.json").read_text()
    assert carry_source_files(None, dst) == [] and carry_source_files(tmp_path / "missing", dst) == []


def test_plain_model_carries_tokenizer_files_only_without_a_saved_tokenizer(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    assert carry_source_files(src, dst) == ["tokenizer.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text("{}")
    assert carry_source_files(src, other) == []


def test_export_dense_refuses_a_non_empty_output_and_replaces_it_on_request(saved, tmp_path):
    _, folder = saved
    out = tmp_path / "dense"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        export_dense(folder, out)
    assert (out / "keep.txt").is_file()
    export_dense(folder, out, overwrite=True, dtype=torch.float64)
    assert not (out / "keep.txt").exists() and not (out / "coala.json").exists()
    with pytest.raises(ValueError, match="compressed folder itself"):
        export_dense(folder, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
