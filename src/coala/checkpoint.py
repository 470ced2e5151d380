"""Resumable block-by-block compression: one safetensors + one JSON file per finished block.

Layout of ``work_dir``:

    fingerprint.json          the settings of the run (model, method, ratio, calibration, ...), JSON
    block-00000.safetensors   the block's tensors (e.g. its new state dict)
    block-00000.json          {"index": 0, "meta": {...}}: written last, it marks the block as finished

Every file is written to a temporary name in the same folder and renamed into place (atomic on POSIX), so a
crash leaves either a finished block or none. A resume with a different fingerprint is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
from torch import Tensor

FINGERPRINT_FILE = "fingerprint.json"


def _normalise(obj: dict, what: str) -> dict:
    """obj as it reads back from JSON (tuples → lists, ...); TypeError for a non-JSON value."""
    if not isinstance(obj, dict):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlockCheckpoint:
    """Finished blocks of a block-by-block compression, kept in ``work_dir`` for ``--resume``.

    Usage::

        ckpt = BlockCheckpoint(work_dir)
        skip = ckpt.start(fingerprint)          # number of blocks already done (0 for a fresh run)
        for i in range(skip): state, meta = ckpt.load_block(i) ...
        ... ckpt.save_block(i, block_state, {"ranks": ...})
        ckpt.clear()                            # when the final model is saved
    """

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.work_dir = Path(work_dir)
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise ValueError(f"checkpoint work_dir {self.work_dir} exists and is not a folder")

    def _tensors(self, index: int) -> Path:
        return self.work_dir / f"block-{index:05d}.safetensors"

    def _meta(self, index: int) -> Path:
        return self.work_dir / f"block-{index:05d}.json"

    @staticmethod
    def _check_index(index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"block index must be an int >= 0, got {index!r}")
        return index

    def fingerprint(self) -> dict | None:
        """The recorded fingerprint, or None when no run was started in work_dir."""
        path = self.work_dir / FINGERPRINT_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

    def config_matches(self, fingerprint: dict) -> bool:
        """True when a run was started here with exactly these settings (False when none was started)."""
        return self.fingerprint() == _normalise(fingerprint, "fingerprint")

    def start(self, fingerprint: dict) -> int:
        """Begin or resume a run: records the fingerprint, or checks it against the recorded one.

        Returns the number of consecutive finished blocks (the blocks to skip). Raises ValueError naming the
        differing settings when work_dir holds a run with another fingerprint (clear() it to start over).
        """
        fp = _normalise(fingerprint, "fingerprint")
        recorded = self.fingerprint()
        if recorded is None:
            if any(self.work_dir.glob("block-*")):
                raise ValueError(f"{self.work_dir} holds block files but no {FINGERPRINT_FILE}; clear() it first")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.work_dir / FINGERPRINT_FILE, lambda p: Path(p).write_text(json.dumps(fp, indent=2)))
            return 0
        if recorded != fp:
            keys = sorted(k for k in set(fp) | set(recorded) if fp.get(k, "<absent>") != recorded.get(k, "<absent>"))
            details = "; ".join(f"{k}: {recorded.get(k, '<absent>')!r} -> {fp.get(k, '<absent>')!r}" for k in keys[:6])
            raise ValueError(
                f"cannot resume from {self.work_dir}: it was started with other settings ({details}); "
                "use another work folder or clear it"
            )
        return self.finished()

    def save_block(self, index: int, state: dict[str, Tensor], meta: dict) -> None:
        """Store block ``index``: tensors (copied to CPU) then its JSON meta, each atomically."""
        index = self._check_index(index)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise TypeError(f"state of block {index} must be a dict of tensors")
        record = {"index": index, "meta": _normalise(meta, f"meta of block {index}")}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._meta(index).unlink(missing_ok=True)  # an overwritten block is unfinished until its meta lands
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        _atomic_write(self._tensors(index), lambda p: safetensors.torch.save_file(tensors, p))
        _atomic_write(self._meta(index), lambda p: Path(p).write_text(json.dumps(record, indent=2)))

    def is_finished(self, index: int) -> bool:
        return self._meta(index).is_file() and self._tensors(index).is_file()

    def finished(self) -> int:
        """Number of consecutive finished blocks counted from block 0."""
        i = 0
        while self.is_finished(i):
            i += 1
        return i

    def load_block(self, index: int) -> tuple[dict[str, Tensor], dict]:
        """(tensors on CPU, meta) of a finished block; FileNotFoundError naming the file otherwise."""
        index = self._check_index(index)
        if not self.is_finished(index):
            raise FileNotFoundError(f"block {index} is not finished in {self.work_dir} (no {self._meta(index).name})")
        try:
            record = json.loads(self._meta(index).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._meta(index)} is not valid JSON: {e}") from e
        return safetensors.torch.load_file(str(self._tensors(index))), record["meta"]

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
