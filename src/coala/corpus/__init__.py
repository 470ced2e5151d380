"""The built-in offline text (docs/design.md §8): calibration text that generalises, and evaluation text from
another source.

- ``docs``: text that ships with Python itself, the pydoc topic pages (``pydoc_data.topics``) and the
  docstrings of a fixed list of standard-library modules. Split deterministically: every fifth pydoc topic
  (sorted by name) is held out ("test"); the other topics plus the docstrings form "train" (a topic page
  identical to a held-out one is left out of "train").
- ``prose``: general-English prose written for the project (narrative, dialogue, news-like reports,
  explanations, instructions), ``calibration_prose.txt`` beside this file, one paragraph per line; every fifth
  paragraph is held out ("test").
- ``builtin``: the calibration mix, docs and prose. Calibration draws half of its samples from each
  (``coala.data.calibration_batches``); its "test" split is both held-out parts (in-domain evaluation).
- ``english``: ``evaluation.txt`` beside this file, general-English prose written separately for evaluation, one
  paragraph per line, sharing no sentence with any calibration source (a test checks paragraphs and 10-word
  runs): out-of-domain evaluation. It has no "train" split: it is never calibration text.

``snippets`` cuts documents into the sentence-sized pieces encoders are evaluated on.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache
from importlib import resources

from ..errors import CoalaError

__all__ = ["BUILTIN_PARTS", "CORPORA", "builtin_parts", "builtin_sentences", "builtin_texts", "corpus_texts",
           "docs_texts", "english_texts", "prose_texts", "snippets"]

BUILTIN_PARTS = ("docs", "prose")
"""What the calibration mix ``builtin`` is made of, in this order."""
CORPORA = ("builtin", *BUILTIN_PARTS, "english")
"""The names of the built-in texts."""
_DOC_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "enum",
    "fractions", "functools", "http.client", "inspect", "io", "itertools", "json", "logging", "math",
    "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)
_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise CoalaError(f"split must be 'train' or 'test', got {split!r}", argument="split")


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _module_docstrings() -> list[str]:
    texts = []
    for mod_name in _DOC_MODULES:
        mod = importlib.import_module(mod_name)
        doc = inspect.getdoc(mod)
        if doc:
            texts.append(doc)
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    texts.append(doc)
    return texts


def docs_texts(split: str = "train") -> list[str]:
    """Python's documentation: pydoc topic pages (every fifth held out for "test") and, in "train", docstrings."""
    _check_split(split)
    topics = _pydoc_topics()
    test = [text for i, (_, text) in enumerate(topics) if i % 5 == 0]
    if split == "test":
        return test
    held_out = set(test)  # some topics share one page ("if" / "else"): keep held-out text out of train
    return [text for i, (_, text) in enumerate(topics) if i % 5 != 0 and text not in held_out] + _module_docstrings()


@cache
def _paragraphs(name: str) -> tuple[str, ...]:
    """The non-empty lines (paragraphs) of the packaged text file ``name``."""
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def prose_texts(split: str = "train") -> list[str]:
    """General-English prose written for calibration, one paragraph per document; every fifth is "test"."""
    _check_split(split)
    paras = _paragraphs("calibration_prose.txt")
    return [p for i, p in enumerate(paras) if (i % 5 == 0) == (split == "test")]


def english_texts(split: str = "test") -> list[str]:
    """The separately written evaluation text, one paragraph per document (out of domain for every built-in
    calibration source). CoalaError for split "train": it is not calibration text."""
    _check_split(split)
    if split == "train":
        raise CoalaError("'english' is the evaluation text and has no calibration split: calibrate on builtin, "
                         "docs, prose, wikitext2, c4 or a file", argument="calibration")
    return list(_paragraphs("evaluation.txt"))


def builtin_parts(split: str = "train") -> list[list[str]]:
    """The documents of each part of ``builtin`` (``BUILTIN_PARTS``: docs, prose) for ``split``."""
    return [docs_texts(split), prose_texts(split)]


def builtin_texts(split: str = "train") -> list[str]:
    """Documents of the calibration mix (docs, then prose); ``split`` "train" (calibration) or "test" (held out)."""
    return [doc for part in builtin_parts(split) for doc in part]


def corpus_texts(name: str, split: str = "train") -> list[str]:
    """Documents of the built-in text ``name`` (one of ``CORPORA``) for ``split``."""
    readers = {"builtin": builtin_texts, "docs": docs_texts, "prose": prose_texts, "english": english_texts}
    if name not in readers:
        raise CoalaError(f"unknown built-in text {name!r}; expected one of {', '.join(CORPORA)}", argument="source")
    return readers[name](split)


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before a space and a capital,
# a digit or an opening quote; not after a few common abbreviations.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”’')]))(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)"
                           r"(?<!\bSt\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bvs\.)\s+(?=[\"“‘(]?[A-Z0-9])")


def snippets(texts: list[str], min_chars: int = 40, max_chars: int = 400, *, split_long: bool = True) -> list[str]:
    """Sentence-sized pieces of ``texts`` in order (for sentence encoders): every paragraph (blank-line separated,
    whitespace collapsed) of ``min_chars``..``max_chars`` characters, and the sentences of that length of longer
    paragraphs (``split_long=False``: longer paragraphs are left out)."""
    out = []
    for doc in texts:
        for para in re.split(r"\n\s*\n", doc):
            para = " ".join(para.split())
            pieces = _SENTENCE_END.split(para) if len(para) > max_chars and split_long else [para]
            out += [p for p in pieces if min_chars <= len(p) <= max_chars]
    return out


def builtin_sentences(split: str = "train", min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """``snippets`` of the calibration mix ``builtin`` (docs, then prose), in a fixed order."""
    return snippets(builtin_texts(split), min_chars, max_chars)
