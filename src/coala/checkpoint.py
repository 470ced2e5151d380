"""Resumable block-by-block compression: one safetensors + one JSON file per finished block.

Layout of ``work_dir``:

    fingerprint.json          the settings of the run (model, method, ratio, calibration, ...), JSON
    block-00000.safetensors   the block's tensors (e.g. its new state dict)
    block-00000.json          {"index": 0, "meta": {...}}: written last, it marks the block as finished

Every file is written to a temporary name in the same folder, fsynced and renamed into place, and the folder is
fsynced (``coala.integrity.atomic_write``), so a crash or a power loss leaves either a finished block or none.
A resume with a different fingerprint is refused. The block's JSON also records its tensors (name, dtype, shape)
and the SHA-256 of its safetensors file; ``validate`` checks every finished block against that record before a
resume replays it, and discards the first damaged block and every block after it, which are then recomputed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import safetensors.torch
from torch import Tensor

from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError, CoalaTypeError
from .integrity import atomic_write, safetensors_header, sha256_file

FINGERPRINT_FILE = "fingerprint.json"


def _normalise(obj: dict, what: str) -> dict:
    """obj as it reads back from JSON (tuples → lists, ...); TypeError for a non-JSON value."""
    if not isinstance(obj, dict):
        raise CoalaTypeError(f"{what} must be a dict, got {type(obj).__name__}", argument=what)
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CoalaTypeError(f"{what} must be JSON-serialisable: {e}", argument=what) from e


class BlockCheckpoint:
    """Finished blocks of a block-by-block compression, kept in ``work_dir`` for ``--resume``.

    Usage::

        ckpt = BlockCheckpoint(work_dir)
        skip = ckpt.start(fingerprint)          # number of valid blocks already done (0 for a fresh run)
        for i in range(skip): state, meta = ckpt.load_block(i) ...
        ... ckpt.save_block(i, block_state, {"ranks": ...})
        ckpt.clear()                            # when the final model is saved
    """

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.work_dir = Path(work_dir)
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise CoalaFileError(f"checkpoint work_dir {self.work_dir} exists and is not a folder",
                                 path=self.work_dir)

    def _tensors(self, index: int) -> Path:
        return self.work_dir / f"block-{index:05d}.safetensors"

    def _meta(self, index: int) -> Path:
        return self.work_dir / f"block-{index:05d}.json"

    @staticmethod
    def _check_index(index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise CoalaError(f"block index must be an int >= 0, got {index!r}", argument="index")
        return index

    def fingerprint(self) -> dict | None:
        """The recorded fingerprint, or None when no run was started in work_dir (CoalaFileError when the file is
        damaged)."""
        path = self.work_dir / FINGERPRINT_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CoalaFileError(f"{path} is not valid JSON: {e}", path=path) from e

    def config_matches(self, fingerprint: dict) -> bool:
        """True when a run was started here with exactly these settings (False when none was started)."""
        return self.fingerprint() == _normalise(fingerprint, "fingerprint")

    def start(self, fingerprint: dict) -> int:
        """Begin or resume a run: records the fingerprint, or checks it against the recorded one.

        Returns the number of consecutive finished blocks that pass ``validate`` (the blocks to skip). Raises
        CoalaError naming the differing settings when work_dir holds a run with another fingerprint (clear() it
        to start over). A damaged fingerprint file (a power loss) discards the checkpoint, with a warning.
        """
        fp = _normalise(fingerprint, "fingerprint")
        try:
            recorded = self.fingerprint()
        except CoalaFileError as err:
            warnings.warn(f"{err}: the checkpoint in {self.work_dir} is discarded and every block recomputed",
                          RuntimeWarning, stacklevel=2)
            self.clear()
            recorded = None
        if recorded is None:
            if any(self.work_dir.glob("block-*")):
                raise CoalaFileError(f"{self.work_dir} holds block files but no {FINGERPRINT_FILE}; clear() it first",
                                     path=self.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.work_dir / FINGERPRINT_FILE, lambda p: Path(p).write_text(json.dumps(fp, indent=2)))
            return 0
        if recorded != fp:
            keys = sorted(k for k in set(fp) | set(recorded) if fp.get(k, "<absent>") != recorded.get(k, "<absent>"))
            details = "; ".join(f"{k}: {recorded.get(k, '<absent>')!r} -> {fp.get(k, '<absent>')!r}" for k in keys[:6])
            raise CoalaError(
                f"cannot resume from {self.work_dir}: it was started with other settings ({details}); "
                "use another work folder or clear it", path=self.work_dir,
            )
        return self.validate()

    def save_block(self, index: int, state: dict[str, Tensor], meta: dict) -> None:
        """Store block ``index``: tensors (copied to CPU) then its JSON record (meta, tensor list, SHA-256 of the
        tensors file), each atomically and durably."""
        index = self._check_index(index)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CoalaTypeError(f"state of block {index} must be a dict of tensors", argument="state")
        record = {"index": index, "meta": _normalise(meta, f"meta of block {index}")}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._meta(index).unlink(missing_ok=True)  # an overwritten block is unfinished until its meta lands
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        path = self._tensors(index)
        atomic_write(path, lambda p: safetensors.torch.save_file(tensors, p))
        record.update(tensors=safetensors_header(path), sha256=sha256_file(path))
        atomic_write(self._meta(index), lambda p: Path(p).write_text(json.dumps(record, indent=2)))

    def is_finished(self, index: int) -> bool:
        return self._meta(index).is_file() and self._tensors(index).is_file()

    def finished(self) -> int:
        """Number of consecutive finished blocks counted from block 0 (their files exist; see ``validate``)."""
        i = 0
        while self.is_finished(i):
            i += 1
        return i

    def validate(self) -> int:
        """Check the finished blocks in order (JSON record, complete safetensors file whose tensors and SHA-256
        are those recorded); the first damaged block and every block after it are deleted, with a warning naming
        it, so that they are recomputed. Returns the number of valid consecutive blocks. A record written
        before the tensor list was kept gets it now."""
        i = 0
        while self.is_finished(i):
            problem = self._problem(i)
            if problem is not None:
                warnings.warn(f"checkpoint block {i} in {self.work_dir} is damaged ({problem}): it and the blocks "
                              "after it are recomputed", RuntimeWarning, stacklevel=2)
                self._discard_from(i)
                break
            i += 1
        return i

    def _problem(self, index: int) -> str | None:
        meta, path = self._meta(index), self._tensors(index)
        try:
            record = json.loads(meta.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{meta.name} is not valid JSON: {e}"
        if not isinstance(record, dict) or record.get("index") != index or not isinstance(record.get("meta"), dict):
            return f"{meta.name} is not the record of block {index}"
        try:
            header = safetensors_header(path)
        except CoalaFileError as e:
            return str(e)
        if "tensors" not in record:  # written by an older coala: record the list now
            record.update(tensors=header, sha256=sha256_file(path))
            atomic_write(meta, lambda p: Path(p).write_text(json.dumps(record, indent=2)))
        elif record["tensors"] != header:
            return f"the tensors in {path.name} are not those listed in {meta.name}"
        elif record.get("sha256") is not None and sha256_file(path) != record["sha256"]:
            return f"the SHA-256 of {path.name} differs from the one recorded in {meta.name}"
        return None

    def _discard_from(self, index: int) -> None:
        for p in self.work_dir.glob("block-*"):
            stem = p.name.split(".")[0].removeprefix("block-")
            if stem.isdigit() and int(stem) >= index:
                p.unlink(missing_ok=True)

    def load_block(self, index: int) -> tuple[dict[str, Tensor], dict]:
        """(tensors on CPU, meta) of a finished block; CoalaFileNotFoundError / CoalaFileError naming the file
        otherwise."""
        index = self._check_index(index)
        if not self.is_finished(index):
            raise CoalaFileNotFoundError(f"block {index} is not finished in {self.work_dir} "
                                         f"(no {self._meta(index).name})", path=self._meta(index))
        try:
            record = json.loads(self._meta(index).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CoalaFileError(f"{self._meta(index)} is not valid JSON: {e}", path=self._meta(index)) from e
        path = self._tensors(index)
        safetensors_header(path)  # a damaged file raises CoalaFileError naming it
        return safetensors.torch.load_file(str(path)), record["meta"]

    def clear(self) -> None:
        """Delete the checkpoint files (and work_dir when nothing else is left in it)."""
        if not self.work_dir.is_dir():
            return
        for p in [*self.work_dir.glob("block-*"), *self.work_dir.glob(".block-*"), self.work_dir / FINGERPRINT_FILE]:
            p.unlink(missing_ok=True)
        for p in self.work_dir.glob(f".{FINGERPRINT_FILE}.tmp-*"):
            p.unlink(missing_ok=True)
        if not any(self.work_dir.iterdir()):
            self.work_dir.rmdir()
