"""The built-in texts: the calibration mix (docs + prose) and its splits, the evaluation text ``english`` sharing
nothing with any calibration source, sentence snippets, and the in-domain / out-of-domain labels."""

from __future__ import annotations

import re

import pytest

from coala.corpus import (
    BUILTIN_PARTS,
    CORPORA,
    builtin_parts,
    builtin_texts,
    corpus_texts,
    docs_texts,
    english_texts,
    prose_texts,
    snippets,
)
from coala.data import SOURCES, describe_source, domain_label, evaluation_sentences, load_texts
from coala.errors import CoalaError

RUN = 10  # words: no run this long of the evaluation text may appear in a calibration text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['’][a-z]+)?", text.lower())


def _runs(texts: list[str], n: int = RUN) -> set[tuple[str, ...]]:
    out = set()
    for text in texts:
        w = _words(text)
        out.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return out


def _calibration_sources() -> list[str]:
    return [t for part in BUILTIN_PARTS for split in ("train", "test") for t in corpus_texts(part, split)]


def test_the_mix_is_docs_and_prose_split_without_overlap():
    assert CORPORA == ("builtin", "docs", "prose", "english") and set(CORPORA) <= set(SOURCES)
    for split in ("train", "test"):
        docs, prose = builtin_parts(split)
        assert docs == docs_texts(split) and prose == prose_texts(split) and builtin_texts(split) == docs + prose
        assert load_texts("builtin", split) == docs + prose and load_texts("prose", split) == prose
    train, test = prose_texts("train"), prose_texts("test")
    assert len(train) >= 4 * len(test) - 4 and not set(train) & set(test)  # every fifth paragraph held out
    assert len(train) + len(test) >= 300, "the calibration prose should hold several hundred paragraphs"
    assert not set(docs_texts("train")) & set(docs_texts("test"))
    assert describe_source("builtin") == {"source": "builtin", "parts": ["docs", "prose"]}


def test_english_is_evaluation_text_only():
    english = english_texts()
    assert len(english) >= 150 and all(len(p) >= 200 for p in english) and len(set(english)) == len(english)
    assert load_texts("english", "test") == english
    with pytest.raises(CoalaError, match="evaluation text and has no calibration split"):
        load_texts("english")  # what calibration asks for


def test_english_shares_no_paragraph_sentence_or_ten_word_run_with_calibration_text():
    calibration = _calibration_sources()
    joined = "\n".join(" ".join(t.split()) for t in calibration)
    english = english_texts()
    assert not set(english) & set(calibration)
    shared = [s for s in snippets(english) if s in joined]
    assert not shared, shared[:3]
    overlap = _runs(english) & _runs(calibration)
    assert not overlap, sorted(" ".join(r) for r in overlap)[:5]


def test_snippets_keep_short_paragraphs_and_split_long_ones_into_sentences():
    long = ("Mr. Okafor opened the shop at seven, as he had done every morning for thirty years. "
            "\u201cNobody comes before eight,\u201d his daughter said. He shrugged and put the kettle on anyway. "
            "By nine the street was full, e.g. of tourists, and the first customer had asked for directions twice.")
    assert len(long) > 200
    got = snippets(["A short paragraph that is long enough to be kept.\n\n" + long + "\n\nToo short."], max_chars=200)
    assert got == ["A short paragraph that is long enough to be kept.",
                   "Mr. Okafor opened the shop at seven, as he had done every morning for thirty years.",
                   "\u201cNobody comes before eight,\u201d his daughter said.",  # 44 characters
                   "He shrugged and put the kettle on anyway.",
                   "By nine the street was full, e.g. of tourists, and the first customer had asked for directions "
                   "twice."]


def test_evaluation_sentences(tmp_path):
    english = evaluation_sentences("english")
    assert len(english) >= 500 and all(40 <= len(s) <= 400 for s in english)
    assert evaluation_sentences("builtin") == snippets(builtin_texts("test"))
    lines = tmp_path / "lines.txt"
    lines.write_text("First sentence of the file.\nSecond one.\n")
    assert evaluation_sentences(lines) == ["First sentence of the file.", "Second one."]  # a file: as it is


@pytest.mark.parametrize(("evaluation", "calibration", "label"), [
    ("english", "builtin", "out of domain"),
    ("english", None, "out of domain"),
    ("builtin", "builtin", "in domain, held out"),
    ("docs", "builtin", "in domain, held out"),
    ("builtin", "prose", "partly in domain, held out"),
    ("prose", "docs", "out of domain"),
    ("wikitext2", "wikitext2", "in domain, held out"),
    ("builtin", {"source": "builtin", "parts": ["docs", "prose"], "mode": "windows"}, "in domain, held out"),
    ("english", {"source": "texts", "documents": 3}, "relation to calibration unknown"),
])
def test_domain_labels(evaluation, calibration, label):
    assert domain_label(evaluation, calibration) == label


def test_domain_label_of_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("some calibration text\n")
    b.write_text("other text\n")
    assert domain_label(a, a) == domain_label(a, describe_source(a)) == "calibration text"
    assert domain_label(b, describe_source(a)) == domain_label("english", a) == domain_label(a) == "out of domain"
