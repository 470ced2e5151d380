"""Issue #14 on the files: every damaged or mismatched file of a saved folder raises a ``CoalaError`` naming it
(never a SafetensorError / AttributeError from deep inside), a same-size bit flip is caught by the recorded
SHA-256, a folder without tokenizer files is named before anything loads, and a save killed at any write step
leaves the old folder or the complete new one — never a folder that loads wrong."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers

from _faults import every_step, full_disk, needs_fork, read_only_folder
from _tiny_models import factorise, inputs, output, tiny
from coala import CoalaError, CoalaFileError, CoalaFileNotFoundError
from coala.checkpoint import BlockCheckpoint
from coala.io import load, read_meta, save_compressed
from coala.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0, rank: int = 8):
    model = tiny("llama", seed=seed)
    factorise(model, rank=rank)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed tiny Llama saved whole, and the same sharded (several files + index)."""
    root = tmp_path_factory.mktemp("saved")
    model = _model()
    save_compressed(model, root / "whole", meta={"version": "old"})
    save_compressed(model, root / "sharded", meta={}, max_shard_size=40_000)
    return root, output(model, inputs())


def _copy(saved, tmp_path, name="whole"):
    return shutil.copytree(saved[0] / name, tmp_path / name)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: same size, header intact
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _set_meta(folder, **changes):
    meta = json.loads((folder / "coala.json").read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    (folder / "coala.json").write_text(json.dumps(meta))


def _bert_config(folder):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)


DAMAGE = {  # name: (damage(folder), exception type, regex the message must match (it names the file))
    "truncated weights": (lambda f: _truncate(f / "model.safetensors"), CoalaFileError,
                          r"model\.safetensors is damaged \(truncated"),
    "empty weights (power loss)": (lambda f: _truncate(f / "model.safetensors", 0), CoalaFileError,
                                   r"model\.safetensors is damaged \(0 bytes"),
    "weights not safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64), CoalaFileError,
                                r"model\.safetensors is damaged \(a header length of .* not plausible"),
    "same-size bit flip": (lambda f: _flip_a_byte(f / "model.safetensors"), CoalaFileError,
                           r"model\.safetensors is damaged or was changed after it was saved: its SHA-256"),
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), CoalaFileNotFoundError,
                        r"weights file .*model\.safetensors not found"),
    "class mismatch": (_bert_config, CoalaError,
                       r"coala\.json records model class LlamaForCausalLM \(a 'llama' model\), but .*config\.json "
                       r"describes a 'bert' model"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), CoalaFileError, r"config\.json cannot be read"),
    "coala.json not JSON": (lambda f: (f / "coala.json").write_text(""), CoalaFileError,
                            r"coala\.json is not valid JSON"),
    "checksums not a dict": (lambda f: _set_meta(f, checksums=["x"]), CoalaFileError,
                             r"coala\.json: 'checksums' must be a dict"),
    "wrong recorded checksum": (lambda f: _set_meta(f, checksums={"model.safetensors": "0" * 64}), CoalaFileError,
                                r"model\.safetensors is damaged or was changed"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_folder_raises_a_coala_error_naming_the_file(saved, tmp_path, case):
    damage, kind, pattern = DAMAGE[case]
    folder = _copy(saved, tmp_path)
    damage(folder)
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(kind, match=pattern) as info:
        load(folder)
    assert isinstance(info.value, ValueError) and info.value.path is not None
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before  # load wrote nothing


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_sharded_folder_names_the_damaged_shard(saved, tmp_path, damage):
    folder = _copy(saved, tmp_path, "sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    (_truncate if damage == "truncate" else _flip_a_byte)(shard)
    with pytest.raises(CoalaFileError, match=shard.name) as info:
        load(folder)
    assert info.value.path == str(shard)
    index = folder / "model.safetensors.index.json"
    shutil.copy(saved[0] / "sharded" / shard.name, shard)
    index.write_text(index.read_text().replace('"metadata"', '"metadata" '))
    with pytest.raises(CoalaFileError, match=r"index\.json is damaged or was changed"):
        load(folder)


def test_verify_false_skips_only_the_checksum(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _flip_a_byte(folder / "model.safetensors")
    load(folder, verify=False)  # the bit flip is not seen, the file is complete
    _truncate(folder / "model.safetensors")
    with pytest.raises(CoalaFileError, match="truncated"):
        load(folder, verify=False)


def test_old_folder_without_checksums_still_loads(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    assert set(read_meta(folder)["checksums"]) == {"model.safetensors"}
    _set_meta(folder, checksums=None)
    assert "checksums" not in read_meta(folder)
    assert torch.equal(output(load(folder), inputs()), saved[1])


@pytest.mark.parametrize("kind", ["llama", "bert", "compressed"])
def test_model_folder_without_tokenizer_files_is_named(tmp_path, kind):
    """transformers builds an *empty* BERT tokenizer from such a folder, and for Llama advises installing
    sentencepiece; coala names the folder before reading any weight."""
    folder = tmp_path / "model"
    if kind == "compressed":
        save_compressed(_model(), folder, meta={})
    else:
        tiny(kind).save_pretrained(folder)
    with pytest.raises(CoalaFileError, match=r"model folder '.*model' has no tokenizer files") as info:
        load_model(folder)
    assert "sentencepiece" not in str(info.value) and info.value.path == str(folder)


def test_save_into_a_path_that_cannot_be_written(tmp_path):
    model = _model()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CoalaFileError, match=r"cannot create the output folder .*file/out") as info:
        save_compressed(model, tmp_path / "file" / "out", meta={})
    assert isinstance(info.value, OSError) and info.value.path.endswith("out")
    with read_only_folder(tmp_path / "ro") as ro, pytest.raises(CoalaFileError, match=r"ro/out"):
        save_compressed(model, ro / "out", meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]


def test_disk_full_is_named_and_leaves_nothing(tmp_path):
    """A real ENOSPC (a 32 KiB tmpfs): the save and a checkpoint block fail naming their path, no temporary
    file or folder is left, the checkpoint's finished blocks are intact."""
    with full_disk(tmp_path / "disk") as disk:
        with pytest.raises(CoalaFileError, match=r"could not write the model to .*disk/out: .*No space left") as info:
            save_compressed(_model(), disk / "out", meta={})
        assert isinstance(info.value, OSError) and list(disk.iterdir()) == []
        ckpt = BlockCheckpoint(disk / "work")
        ckpt.start({"run": 1})
        ckpt.save_block(0, {"w": torch.zeros(4, 4)}, {})
        with pytest.raises(CoalaFileError, match=r"could not write .*block-00001\.safetensors: .*No space left"):
            ckpt.save_block(1, {"w": torch.zeros(64, 1024)}, {})
        assert sorted(p.name for p in ckpt.work_dir.iterdir()) == [
            "block-00000.json", "block-00000.safetensors", "fingerprint.json"]
        assert ckpt.validate() == 1


@needs_fork
@pytest.mark.parametrize("existing", [True, False])
def test_save_killed_at_every_write_step(tmp_path, existing):
    """SIGKILL at each write step of save_compressed (shards, coala.json, fsync, swap): afterwards ``out`` is
    the old folder, intact, or the complete new one (or absent, on a first save) — never a folder that loads
    wrong."""
    old, new = _model(seed=0), _model(seed=1, rank=6)
    probe = inputs()
    expected = {"old": output(old, probe), "new": output(new, probe)}
    out = tmp_path / "out"

    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        if existing:
            save_compressed(old, out, meta={"version": "old"}, max_shard_size=40_000)

    def save() -> None:
        save_compressed(new, out, meta={"version": "new"}, max_shard_size=40_000, overwrite=existing)

    seen = set()

    def check(step: int) -> None:
        if out.exists():
            version = read_meta(out)["version"]
            assert torch.equal(output(load(out), probe), expected[version]), f"step {step}: {version} loads wrong"
            seen.add(version)
        else:
            assert not existing, f"step {step}: the old folder is gone"
            seen.add(None)
        reset()

    reset()
    steps = every_step(save, check)
    assert steps >= 7 and seen == ({"old", "new"} if existing else {None, "new"})


def test_damaged_checkpoint_block_is_recomputed(tmp_path):
    ckpt = BlockCheckpoint(tmp_path / "w")
    fp = {"run": 1}
    assert ckpt.start(fp) == 0
    for i in range(3):
        ckpt.save_block(i, {"w": torch.full((2, 3), float(i))}, {"i": i})
    assert BlockCheckpoint(ckpt.work_dir).start(fp) == 3
    record = json.loads((ckpt.work_dir / "block-00001.json").read_text())
    assert record["tensors"] == {"w": {"dtype": "F32", "shape": [2, 3]}} and len(record["sha256"]) == 64
    _truncate(ckpt.work_dir / "block-00001.safetensors", 0)
    with pytest.warns(RuntimeWarning, match=r"checkpoint block 1 .* damaged .*block-00001\.safetensors"):
        assert ckpt.start(fp) == 1
    assert sorted(p.name for p in ckpt.work_dir.iterdir()) == [
        "block-00000.json", "block-00000.safetensors", "fingerprint.json"]  # block 1 and the blocks after it
    del record["tensors"], record["sha256"]  # a record written by an older coala: the list is added on resume
    (ckpt.work_dir / "block-00000.json").write_text(json.dumps({**record, "index": 0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.start(fp) == 1
    assert "tensors" in json.loads((ckpt.work_dir / "block-00000.json").read_text())
    _truncate(ckpt.work_dir / "block-00000.safetensors")
    with pytest.raises(CoalaFileError, match=r"block-00000\.safetensors is damaged"):
        ckpt.load_block(0)
    (ckpt.work_dir / "fingerprint.json").write_text("")  # power loss before the fingerprint reached the disk
    with pytest.warns(RuntimeWarning, match=r"fingerprint\.json is not valid JSON"):
        assert ckpt.start(fp) == 0
    assert sorted(p.name for p in ckpt.work_dir.iterdir()) == ["fingerprint.json"]
