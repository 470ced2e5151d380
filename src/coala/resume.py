"""Plumbing of resumable runs: the run's fingerprint, the output / checkpoint folders, the interruption hook."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import BlockCheckpoint
from .distributed import rank, world_size
from .io import OutputExistsError
from .preflight import check_output_location
from .version import __version__

if TYPE_CHECKING:
    from .config import OutputConfig

INTERRUPT_ENV = "COALA_INTERRUPT_AFTER_BLOCK"


class SimulatedInterruption(RuntimeError):
    """Raised after block k's checkpoint when the environment variable COALA_INTERRUPT_AFTER_BLOCK=k is set.

    A testing hook: it simulates a crash so that ``resume=True`` can be checked against an uninterrupted run.
    """


def _digest(h, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)  # a strided sample: enough to tell models apart, cheap for 70B
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(flat[::step].contiguous().cpu().view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module, batches: list, description: dict, settings: Sequence, device) -> dict:
    """JSON-safe identity of a run: every field of the ``settings`` dataclasses (the algorithm and the calibration
    configs: everything that changes the result), the model (config, names, shapes, dtypes and a strided sample
    of every tensor), the calibration batches (all their bytes), the device type and coala's version."""
    weights, data = hashlib.sha256(), hashlib.sha256()
    for name, t in model.state_dict().items():
        weights.update(name.encode())
        _digest(weights, t)
    for b in batches:
        for k in sorted(b):
            data.update(k.encode())
            data.update(b[k].contiguous().cpu().numpy().tobytes())
    cfg = getattr(model, "config", None)
    return {
        "coala": __version__,
        "settings": {type(s).__name__: asdict(s) for s in settings},
        "device_type": torch.device(device).type,
        "model_class": type(model).__name__,
        "model_config": hashlib.sha256(cfg.to_json_string().encode()).hexdigest() if cfg is not None else None,
        "weights": weights.hexdigest(),
        "calibration": data.hexdigest(),
        "calibration_description": description,
    }


def prepare_output(config: OutputConfig) -> BlockCheckpoint | None:
    """Refuse to clobber, and check that the output and checkpoint folders can be written (before any work and
    before anything is written); return the block checkpoint when writing to out_dir."""
    if not config.out_dir:
        return None
    out = Path(config.out_dir)
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not empty (pass overwrite to replace it)",
                                path=out, argument="out_dir")
    ckpt = BlockCheckpoint(config.work_dir or f"{out}.partial")
    check_output_location(out, ckpt.work_dir)
    if ckpt.work_dir.exists() and not config.resume:
        if not config.overwrite:
            raise OutputExistsError(f"{ckpt.work_dir} holds an unfinished run: pass resume to continue it, or "
                                    "overwrite to discard it", path=ckpt.work_dir, argument="work_dir")
        ckpt.clear()
    return ckpt


def offload_dir(offload: bool, ckpt: BlockCheckpoint | None) -> str | None:
    """Where offloaded hidden states go: ``work_dir/hidden`` when checkpointing (``hidden-rank<k>`` for rank k of
    a distributed run), else a new temporary folder."""
    if not offload:
        return None
    if ckpt is not None:
        return str(ckpt.work_dir / ("hidden" if world_size() == 1 else f"hidden-rank{rank()}"))
    import tempfile

    return tempfile.mkdtemp(prefix="coala-hidden-")


def maybe_interrupt(i: int) -> None:
    value = os.environ.get(INTERRUPT_ENV)
    if value is not None and value.strip() == str(i):
        raise SimulatedInterruption(f"simulated interruption after block {i} ({INTERRUPT_ENV}={value})")


