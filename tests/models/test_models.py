"""coala.models.load_model (the one loader) and coala.linalg.dtypes.parse_dtype, on tiny local folders."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from _tiny_models import factorise
from coala.io import save_compressed
from coala.linalg.dtypes import ACCUMULATION_DTYPES, DTYPES, parse_dtype
from coala.lowrank import LowRankLinear
from coala.models import LoadedModel, load_model


def test_parse_dtype():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is None
    assert parse_dtype(torch.float16) is torch.float16 and set(DTYPES) >= set(ACCUMULATION_DTYPES)
    assert parse_dtype("float64", allowed=ACCUMULATION_DTYPES) is torch.float64
    with pytest.raises(ValueError, match=r"stats_dtype must be one of \['float32', 'float64'\], got 'bfloat16'"):
        parse_dtype("bfloat16", allowed=ACCUMULATION_DTYPES, arg="stats_dtype")
    with pytest.raises(ValueError, match=r"--dtype must be one of .* got torch\.int8"):
        parse_dtype(torch.int8, arg="--dtype")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_tokenizer):
    """A tiny BertForMaskedLM folder, and a compressed copy of its encoder recording it as base model."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=64,
                                  architectures=["BertForMaskedLM"])
    transformers.BertForMaskedLM(cfg).save_pretrained(root / "mlm")
    minilm_tokenizer.save_pretrained(root / "mlm")
    encoder = transformers.BertModel(cfg).eval()
    factorise(encoder, rank=4)
    save_compressed(encoder, root / "c", meta={"base_model": str(root / "mlm")}, tokenizer=minilm_tokenizer)
    return root


def test_model_classes_and_dtype(folders):
    loaded = load_model(folders / "mlm", dtype="float64")
    assert isinstance(loaded, LoadedModel) and type(loaded.model) is transformers.BertModel  # "auto": AutoModel
    assert next(loaded.model.parameters()).dtype == torch.float64 and not loaded.model.training
    assert loaded.info == {"compressed": False, "causal": False, "base_model": None}
    model, tokenizer, source = loaded  # unpacks like the tuple older callers used
    assert source == str(folders / "mlm") and tokenizer.vocab_size == model.config.vocab_size
    assert type(load_model(folders / "mlm", model_class="architecture").model) is transformers.BertForMaskedLM
    assert type(load_model(folders / "mlm", model_class="BertForMaskedLM").model) is transformers.BertForMaskedLM


def test_compressed_folder(folders):
    loaded = load_model(str(folders / "c"), dtype=torch.bfloat16)
    assert loaded.compressed and not loaded.causal and loaded.base_model == str(folders / "mlm")
    lowrank = [m for m in loaded.model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and lowrank[0].rank == 4 and next(loaded.model.parameters()).dtype == torch.bfloat16


def test_load_errors(folders, tmp_path):
    for missing in ("./nope", str(tmp_path / "nope"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model(missing)
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_model(tmp_path / "f.bin")
    named = re.escape(f"could not load model '{folders / 'mlm'}'")
    with pytest.raises(ValueError, match=named + ".*no class 'NoSuchModel'"):
        load_model(folders / "mlm", model_class="NoSuchModel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load model .*empty' as a local folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        load_model(folders / "mlm", dtype="int8")
