"""Reading a local text file of documents (calibration or evaluation text): UTF-8 .txt / .jsonl, with errors
that name the file, line and byte (docs/design.md §8)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError

__all__ = ["read_file"]


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


def read_file(path: Path) -> list[str]:
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
