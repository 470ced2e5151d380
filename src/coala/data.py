"""Text sources for calibration and evaluation.

``builtin`` is an offline corpus made of text that ships with Python itself: the pydoc topic pages
(``pydoc_data.topics``) and the docstrings of a fixed list of standard-library modules. It is split
deterministically: every fifth pydoc topic (sorted by name) is held out for evaluation ("test"); the rest
plus the docstrings form "train" (a topic page identical to a held-out one is left out of "train").
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError, CoalaTypeError

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
    test = [text for i, (_, text) in enumerate(topics) if i % 5 == 0]
    if split == "test":
        return test
    held_out = set(test)  # some topics share one page ("if" / "else"): keep held-out text out of train
    return [text for i, (_, text) in enumerate(topics) if i % 5 != 0 and text not in held_out] + _module_docstrings()


def builtin_sentences(split: str = "train", min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Paragraph-sized snippets of the built-in corpus (for sentence encoders), in a fixed order."""
    out = []
    for doc in builtin_texts(split):
        for para in doc.split("\n\n"):
            para = " ".join(para.split())
            if min_chars <= len(para) <= max_chars:
                out.append(para)
    return out


# ---------------------------------------------------------------------------------------------- calibration
SOURCES = ("builtin", "wikitext2", "c4")
_C4_FILE = "en/c4-train.00000-of-01024.json.gz"  # the shard GPTQ and SVD-LLM calibrate on


@dataclass
class CalibrationSet:
    """Tokenized calibration batches, ready for ``model(**batch)``.

    ``batches``: dicts with "input_ids" (batch × seq, int64) and "attention_mask" (batch × seq, int64,
    1 = real token, 0 = padding). ``description``: JSON-safe record of how they were made (source, seed, …).
    """

    batches: list[dict[str, Tensor]]
    description: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in all batches."""
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    def __len__(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)


def _need_datasets(source: str):
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"calibration source {source!r} needs the optional package 'datasets' (pip install 'coala[eval]'); "
            "without it use --calib builtin or a local .txt / .jsonl file"
        ) from err
    return datasets


def _load_hub(source: str, split: str) -> list[str]:
    datasets = _need_datasets(source)
    try:
        if source == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            files = {"train": _C4_FILE, "validation": "en/c4-validation.00000-of-00008.json.gz"}
            name = "validation" if split == "test" else "train"
            data = datasets.load_dataset("allenai/c4", data_files={name: files[name]}, split=name)
    except Exception as err:  # network / hub errors of any type: say which source failed
        raise ValueError(f"could not load calibration source {source!r} through 'datasets': {err}") from err
    return list(data["text"])


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a file (a BOM is dropped); CoalaFileError naming the file, line and byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise CoalaFileError(
            f"calibration file {str(path)!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(line {line}) cannot be decoded; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
            path=path) from None


def _read_file(path: Path) -> list[str]:
    """Documents of a local file: .jsonl (one object per line, field "text") or text (.txt, .text, .md, no
    suffix): paragraphs separated by blank lines, or, in a file without any blank line, one document per line
    (a file of one sentence per line is read as one sentence per line)."""
    if path.is_dir():
        raise CoalaFileError(f"calibration file {str(path)!r} is a folder; expected a .txt or .jsonl file", path=path)
    if not path.is_file():
        raise CoalaFileNotFoundError(f"calibration file {str(path)!r} does not exist", path=path)
    if path.suffix not in (".jsonl", ".txt", ".text", ".md", ""):
        raise CoalaError(f"calibration file {str(path)!r}: expected a .txt or .jsonl file, got {path.suffix!r}",
                         path=path)
    try:
        raw = _decode(path, path.read_bytes())
    except OSError as err:
        if isinstance(err, CoalaError):
            raise
        raise CoalaFileError(f"calibration file {str(path)!r} cannot be read: {err.strerror or err}",
                             path=path) from err
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CoalaError(f"{path}:{lineno}: not valid JSON ({err.msg})", path=path) from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CoalaError(f"{path}:{lineno}: expected a JSON object with a string field 'text'", path=path)
            docs.append(obj["text"])
    else:  # paragraphs separated by blank lines; no blank line anywhere: one document per line
        docs = re.split(r"\n\s*\n", raw.strip())
        if len(docs) == 1:
            docs = raw.splitlines()
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise CoalaError(f"calibration file {str(path)!r} contains no text", path=path)
    return docs


def load_texts(source: str | os.PathLike, split: str = "train") -> list[str]:
    """Documents of a calibration/evaluation source: "builtin", "wikitext2", "c4" or a .txt / .jsonl path."""
    if isinstance(source, str) and source in SOURCES:
        if source == "builtin":
            return builtin_texts(split)
        return _load_hub(source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise CoalaTypeError(f"calibration source must be a name or a path, got {type(source).__name__}",
                             argument="source")
    return _read_file(Path(source))


def describe_source(source: str | os.PathLike) -> dict:
    """JSON-safe identity of a source: its name, or a file's path, size and SHA-256."""
    if isinstance(source, str) and source in SOURCES:
        return {"source": source}
    path = Path(source)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"source": "file", "path": str(path), "sha256": digest}


def _adds_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends it by default (Llama, OPT), else None (GPT-2, BERT)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


_ATTN_FREE_LEN = 256  # sequence length up to which a batch is budgeted by its tokens alone


def _batch_cost(rows: int, width: int) -> float:
    """Padded tokens, weighted by width / 256 beyond 256 so that the attention scores (∝ rows · width²) of a
    batch of long sequences stay within what a batch of 256-token sequences of the same budget needs."""
    return rows * width * max(1.0, width / _ATTN_FREE_LEN)


def _chunks(rows: list[list[int]], batch_size: int | None, batch_tokens: int) -> list[list[list[int]]]:
    """Consecutive groups of rows: ``batch_size`` rows each, or (None) as many as keep ``_batch_cost`` within
    ``batch_tokens`` (at least one row), which bounds a batch's activation memory whatever the lengths."""
    if batch_size is not None:
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    chunks: list[list[list[int]]] = []
    for r in rows:
        if chunks and _batch_cost(len(chunks[-1]) + 1, max(len(r), *map(len, chunks[-1]))) <= batch_tokens:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def _stack(chunks: list[list[list[int]]], pad_id: int) -> list[dict[str, Tensor]]:
    batches = []
    for chunk in chunks:
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _windows(
    texts: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, where: str
) -> list[list[int]]:
    """SVD-LLM / GPTQ style: join documents with blank lines, tokenize once, cut ``nsamples`` random windows."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    bos = _adds_bos(tokenizer)
    body = seqlen - (bos is not None)
    if len(ids) < body:
        raise ValueError(f"calibration source {where} has {len(ids)} tokens, fewer than one window of {body}")
    starts = [rng.randint(0, len(ids) - body) for _ in range(nsamples)]
    return [([bos] if bos is not None else []) + ids[s : s + body] for s in starts]


def _c4_windows(texts: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    """GPTQ's c4 recipe: pick random documents until one is longer than seqlen, take a random window of it."""
    out = []
    for _ in range(nsamples):
        for _attempt in range(100_000):
            ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], verbose=False)["input_ids"]
            if len(ids) > seqlen:
                break
        else:
            raise ValueError(f"c4: found no document longer than {seqlen} tokens")
        s = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[s : s + seqlen])
    return out


def _sentences(
    texts: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, where: str
) -> list[list[int]]:
    """Paragraphs (blank-line separated, ≥ 40 characters), sampled without replacement, tokenized with the
    model's special tokens ([CLS] … [SEP]) and truncated to seqlen; sorted by length to limit padding."""
    paras = [" ".join(p.split()) for doc in texts for p in re.split(r"\n\s*\n", doc)]
    paras = [p for p in paras if len(p) >= 40]
    if len(paras) < nsamples:
        raise ValueError(
            f"calibration source {where} has {len(paras)} paragraphs of at least 40 characters, "
            f"fewer than nsamples={nsamples}"
        )
    chosen = rng.sample(paras, nsamples)
    rows = [tokenizer(p, truncation=True, max_length=seqlen, verbose=False)["input_ids"] for p in chosen]
    return sorted(rows, key=len)


def _documents(texts: list[str], tokenizer, nsamples: int | None, seqlen: int, where: str) -> list[list[int]]:
    """Every document in order, tokenized with the model's special tokens and cut into consecutive windows of
    at most seqlen tokens (a window under 2 tokens is dropped); the first ``nsamples`` windows (None: all)."""
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        rows += [ids[s : s + seqlen] for s in range(0, len(ids), seqlen) if len(ids[s : s + seqlen]) >= 2]
        if nsamples is not None and len(rows) >= nsamples:
            return rows[:nsamples]
    if not rows:
        raise ValueError(f"calibration source {where}: every document tokenised to fewer than 2 tokens")
    return rows


def calibration_batches(
    source: str | os.PathLike | list[str],
    tokenizer,
    *,
    nsamples: int | None = 256,
    seqlen: int = 2048,
    seed: int = 0,
    mode: str = "windows",
    batch_size: int | None = None,
    batch_tokens: int = 2048,
    max_positions: int | None = None,
    pad_id: int | None = None,
) -> CalibrationSet:
    """Tokenized calibration batches from a source (deterministic for a fixed seed).

    Args:
        source: "builtin" (offline), "wikitext2", "c4" (through ``datasets``), a .txt / .jsonl path, or a
            list of documents.
        tokenizer: a Hugging Face tokenizer.
        nsamples, seqlen: number of samples and their length in tokens (``seqlen`` is clamped to
            ``max_positions``, the model's ``max_position_embeddings``, when given). In "documents" mode
            ``nsamples`` caps the windows taken (None: all of them).
        mode: "windows" (decoder LMs: random windows of exactly seqlen tokens of the joined corpus, with BOS
            first when the tokenizer adds one; c4 follows GPTQ's per-document recipe), "sentences"
            (encoders: one paragraph per sample with the tokenizer's special tokens, padded per batch) or
            "documents" (no sampling, ``seed`` unused: every document in order, tokenized with the special
            tokens and cut into consecutive windows of at most seqlen tokens, windows under 2 tokens dropped).
        batch_size: samples per batch; default None: as many as fit in ``batch_tokens`` padded tokens (at least
            one; sequences longer than 256 tokens count width/256 times, for their attention scores), so that
            the memory of a batch's forward does not depend on how long the longest sample is.
        batch_tokens: that budget (default 2048: a full batch then costs about what 64 short calibration
            samples cost, so peak memory hardly depends on ``nsamples``; larger batches were not faster on CPU).
        pad_id: token id of the padding (default: the tokenizer's pad token, else 0; masked out either way).

    Returns a ``CalibrationSet``: batches of {"input_ids", "attention_mask"} (int64, batch × longest row),
    right-padded.
    """
    if mode not in ("windows", "sentences", "documents"):
        raise ValueError(f"mode must be 'windows', 'sentences' or 'documents', got {mode!r}")
    for arg, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if v is None and arg == "nsamples" and mode == "documents":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if max_positions is not None:
        seqlen = min(seqlen, int(max_positions))
    if isinstance(source, list):
        texts, desc, where = source, {"source": "texts", "documents": len(source)}, "(list of texts)"
        if not any(t.strip() for t in texts):
            raise ValueError("calibration texts are empty")
    else:
        texts, desc, where = load_texts(source), describe_source(source), repr(str(source))
    rng = random.Random(seed)
    if mode == "documents":
        rows = _documents(texts, tokenizer, nsamples, seqlen, where)
    elif mode == "sentences":
        rows = _sentences(texts, tokenizer, nsamples, seqlen, rng, where)
    elif source == "c4":
        rows = _c4_windows(texts, tokenizer, nsamples, seqlen, rng)
    else:
        rows = _windows(texts, tokenizer, nsamples, seqlen, rng, where)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _stack(_chunks(rows, batch_size, batch_tokens), pad_id)
    desc = {**desc, "mode": mode, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "batch_size": batch_size if batch_size is not None else f"<= {batch_tokens} tokens",
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__)}
    out = CalibrationSet(batches, desc)
    out.description["tokens"] = out.num_tokens
    return out
