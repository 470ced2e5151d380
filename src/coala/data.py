"""Text sources for calibration and evaluation.

``builtin`` is an offline corpus made of text that ships with Python itself: the pydoc topic pages
(``pydoc_data.topics``) and the docstrings of a fixed list of standard-library modules. It is split
deterministically: every fifth pydoc topic (sorted by name) is held out for evaluation ("test"); the rest
plus the docstrings form "train".
"""

from __future__ import annotations

import importlib
import inspect

_DOC_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "enum",
    "fractions", "functools", "http.client", "inspect", "io", "itertools", "json", "logging", "math",
    "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)


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


def builtin_texts(split: str = "train") -> list[str]:
    """Documents of the built-in offline corpus; ``split`` is "train" (calibration) or "test" (held out)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    topics = _pydoc_topics()
    if split == "test":
        return [text for i, (_, text) in enumerate(topics) if i % 5 == 0]
    return [text for i, (_, text) in enumerate(topics) if i % 5 != 0] + _module_docstrings()


def builtin_sentences(split: str = "train", min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Paragraph-sized snippets of the built-in corpus (for sentence encoders), in a fixed order."""
    out = []
    for doc in builtin_texts(split):
        for para in doc.split("\n\n"):
            para = " ".join(para.split())
            if min_chars <= len(para) <= max_chars:
                out.append(para)
    return out
