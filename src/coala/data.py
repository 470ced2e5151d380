"""Text sources for calibration and evaluation (docs/design.md §8).

Named sources: the built-in offline texts of ``coala.corpus`` — ``builtin`` (the calibration mix: Python's
documentation and general-English prose, half of the samples from each), ``docs``, ``prose`` and ``english``
(the evaluation text, written separately: out of domain) —, and ``wikitext2`` / ``c4`` through ``datasets``.
A path is a local .txt / .jsonl file (``coala.textfile.read_file``).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .corpus import BUILTIN_PARTS, CORPORA, builtin_parts, builtin_sentences, builtin_texts, corpus_texts, snippets
from .errors import CoalaTypeError
from .textfile import read_file

__all__ = ["SOURCES", "CalibrationSet", "builtin_sentences", "builtin_texts", "calibration_batches",
           "describe_source", "domain_label", "evaluation_sentences", "load_texts"]


# ---------------------------------------------------------------------------------------------- calibration
SOURCES = (*CORPORA, "wikitext2", "c4")
"""Named calibration / evaluation sources (anything else is a file path)."""
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


def load_texts(source: str | os.PathLike, split: str = "train") -> list[str]:
    """Documents of a calibration/evaluation source: a built-in text ("builtin", "docs", "prose", "english"; see
    ``coala.corpus``), "wikitext2", "c4", or a .txt / .jsonl path (a file has no split: all of it)."""
    if isinstance(source, str) and source in SOURCES:
        if source in CORPORA:
            return corpus_texts(source, split)
        return _load_hub(source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise CoalaTypeError(f"calibration source must be a name or a path, got {type(source).__name__}",
                             argument="source")
    return read_file(Path(source))


def _calibration_parts(source: str | os.PathLike) -> list[list[str]]:
    """The calibration documents of ``source`` by part: ``builtin`` has two (docs, prose; half of the samples
    come from each), every other source one."""
    if isinstance(source, str) and source == "builtin":
        return builtin_parts("train")
    return [load_texts(source)]


def evaluation_sentences(source: str | os.PathLike) -> list[str]:
    """Sentences for embedding fidelity: the sentence-sized ``coala.corpus.snippets`` of a named source's test
    split ("english": the out-of-domain evaluation text; "builtin": the held-out part of the calibration mix),
    or a file's documents as they are (its paragraphs, or its lines when it has no blank line)."""
    if isinstance(source, str) and source in SOURCES:
        return snippets(load_texts(source, "test"))
    return load_texts(source)


def _identity(source) -> str | None:
    """A source's name, or a file's SHA-256 (None for in-memory texts); ``source`` may be a ``describe_source``
    dict."""
    if isinstance(source, dict):
        name = source.get("source")
        return source.get("sha256") if name == "file" else (name if name in SOURCES else None)
    if isinstance(source, str) and source in SOURCES:
        return source
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    return describe_source(path).get("sha256") if path is not None and path.is_file() else None


def domain_label(evaluation: str | os.PathLike, calibration: str | os.PathLike | dict | None = "builtin") -> str:
    """How evaluation text relates to the calibration text (docs/design.md §8): "in domain, held out" (the test
    split of the calibration source, or of a part of the ``builtin`` mix), "partly in domain, held out" (the mix
    evaluated after calibrating on one of its parts), "calibration text" (the very same file), or "out of domain"
    (another source), or "relation to calibration unknown" (calibrated on in-memory texts). ``calibration``: a
    source, or the ``description`` of a ``CalibrationSet`` (coala.json's "calibration"); None is treated as the
    default "builtin"."""
    calib, ev = _identity(calibration if calibration is not None else "builtin"), _identity(evaluation)
    if calib is None:  # in-memory calibration texts
        return "relation to calibration unknown"
    if calib == ev:
        return "in domain, held out" if ev in SOURCES else "calibration text"
    if calib == "builtin" and ev in BUILTIN_PARTS:
        return "in domain, held out"
    if ev == "builtin" and calib in BUILTIN_PARTS:
        return "partly in domain, held out"
    return "out of domain"


def describe_source(source: str | os.PathLike) -> dict:
    """JSON-safe identity of a source: its name (for ``builtin``, its parts), or a file's path, size and SHA-256."""
    if isinstance(source, str) and source in SOURCES:
        return {"source": source, **({"parts": list(BUILTIN_PARTS)} if source == "builtin" else {})}
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


def _paragraphs_of(texts: list[str]) -> list[str]:
    """Paragraphs (blank-line separated, whitespace collapsed) of at least 40 characters."""
    paras = [" ".join(p.split()) for doc in texts for p in re.split(r"\n\s*\n", doc)]
    return [p for p in paras if len(p) >= 40]


def _sentences(
    paras: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, where: str
) -> list[list[int]]:
    """``nsamples`` of the paragraphs, sampled without replacement, tokenized with the model's special tokens
    ([CLS] … [SEP]) and truncated to seqlen."""
    if len(paras) < nsamples:
        raise ValueError(
            f"calibration source {where} has {len(paras)} paragraphs of at least 40 characters, "
            f"fewer than nsamples={nsamples}"
        )
    chosen = rng.sample(paras, nsamples)
    return [tokenizer(p, truncation=True, max_length=seqlen, verbose=False)["input_ids"] for p in chosen]


def _shares(nsamples: int, available: list[int] | None, parts: int) -> list[int]:
    """``nsamples`` split evenly over ``parts`` (the first parts take the remainder); with ``available`` (what
    each part holds), a part's shortfall goes to the others."""
    shares = [nsamples // parts + (i < nsamples % parts) for i in range(parts)]
    if available is None or sum(available) < nsamples:
        return shares
    shares = [min(s, a) for s, a in zip(shares, available, strict=True)]
    for i in range(parts):
        extra = min(nsamples - sum(shares), available[i] - shares[i])
        shares[i] += extra
    return shares


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
        source: a built-in text ("builtin", the default calibration mix: half of the samples from Python's
            documentation, half from the general-English prose; "docs"; "prose"), "wikitext2", "c4" (through
            ``datasets``), a .txt / .jsonl path, or a list of documents.
        tokenizer: a Hugging Face tokenizer.
        nsamples, seqlen: number of samples and their length in tokens (``seqlen`` is clamped to
            ``max_positions``, the model's ``max_position_embeddings``, when given). In "documents" mode
            ``nsamples`` caps the windows taken (None: all of them).
        mode: "windows" (decoder LMs: random windows of exactly seqlen tokens of the joined corpus, with BOS
            first when the tokenizer adds one; c4 follows GPTQ's per-document recipe), "sentences"
            (encoders: one paragraph of ≥ 40 characters per sample, with the tokenizer's special tokens, sorted by
            length and padded per batch; a part of ``builtin`` short of paragraphs leaves its share to the other) or
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
        parts, desc, where = [source], {"source": "texts", "documents": len(source)}, "(list of texts)"
        if not any(t.strip() for t in source):
            raise ValueError("calibration texts are empty")
    else:
        parts, desc, where = _calibration_parts(source), describe_source(source), repr(str(source))
    names = list(BUILTIN_PARTS) if len(parts) > 1 else [None]
    rng = random.Random(seed)
    if mode == "sentences":
        parts = [_paragraphs_of(texts) for texts in parts]
    shares = (None if nsamples is None
              else _shares(nsamples, [len(p) for p in parts] if mode == "sentences" else None, len(parts)))
    rows: list[list[int]] = []
    for i, (texts, name) in enumerate(zip(parts, names, strict=True)):
        n = None if shares is None else shares[i]
        here = where if name is None else f"{where} (part {name!r})"
        if n == 0:
            continue
        if mode == "documents":
            rows += _documents(texts, tokenizer, n, seqlen, here)
        elif mode == "sentences":
            rows += _sentences(texts, tokenizer, n, seqlen, rng, where if len(parts) == 1 else f"{where} (all parts)")
        elif source == "c4":
            rows += _c4_windows(texts, tokenizer, n, seqlen, rng)
        else:
            rows += _windows(texts, tokenizer, n, seqlen, rng, here)
    if mode == "sentences":
        rows = sorted(rows, key=len)  # to limit padding
    if len(parts) > 1 and shares is not None:
        desc["samples_per_part"] = dict(zip(names, shares, strict=True))
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
