"""Checks that run before any work and before anything is written, so that a bad input fails in a second with a
``CoalaError`` naming the culprit instead of after the calibration, with a misleading message, or half-way
through writing.

- ``check_model`` / ``check_weights``: the targets exist in every block; every parameter of the model is
  materialised and finite (a NaN weight would otherwise surface as NaN *activations* of a later layer), and
  every targeted layer is a floating 2-D (out × in) matrix whose bias fits.
- ``check_output_location`` / ``check_writable``: the output folder (and the checkpoint folder) can be created
  and written: no plain file in the way, the nearest existing folder writable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .blocks import block_layers, find_blocks
from .errors import CoalaError, CoalaFileError
from .lowrank import dense_bias, dense_weight

__all__ = ["check_model", "check_output_location", "check_weights", "check_writable"]

_CHUNK = 1 << 24  # elements per isfinite pass: bounds the temporary mask (16 MB) whatever the tensor's size


def _owner(name: str) -> str:
    return name.rpartition(".")[0] or name


def _nonfinite(t: Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return any(not bool(torch.isfinite(flat[s : s + _CHUNK]).all()) for s in range(0, flat.numel(), _CHUNK))


def _describe_nonfinite(name: str, t: Tensor) -> str:
    flat = t.detach().reshape(-1)
    nan, bad = int(torch.isnan(flat).sum()), int((~torch.isfinite(flat)).sum())
    first = int((~torch.isfinite(flat)).nonzero()[0])
    index = []
    for d in reversed(t.shape):
        index.append(first % d)
        first //= d
    return (f"weight {name} holds {nan} NaN and {bad - nan} Inf values out of {t.numel()} (the first at index "
            f"{tuple(reversed(index))}): the model's weights are damaged (a bad download or conversion, or an "
            f"overflow when they were cast to {str(t.dtype).removeprefix('torch.')}); coala checks every weight "
            "before calibrating and wrote nothing")


def check_weights(model: nn.Module, layers: Mapping[str, nn.Module] | None = None) -> None:
    """CoalaError naming the parameter (``layer``: its module) when a parameter of ``model`` is on the meta
    device or holds NaN / Inf, or naming the layer when a targeted layer (full name → module) is not a floating
    2-D weight of its declared shape with a fitting bias."""
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CoalaError(f"weight {name} is on the meta device (not loaded, or offloaded by accelerate): "
                             "load the whole model into memory to compress it", layer=_owner(name))
        if p.is_floating_point() and _nonfinite(p):
            raise CoalaError(_describe_nonfinite(name, p), layer=_owner(name))
    for name, module in (layers or {}).items():
        W, bias = dense_weight(module), dense_bias(module)
        if not W.is_floating_point():
            raise CoalaError(f"layer {name} has a {W.dtype} weight: coala compresses floating-point weights "
                             "(load the model unquantized, e.g. --dtype float32)", layer=name)
        out_f = getattr(module, "out_features", getattr(module, "nf", None))
        if W.ndim != 2 or (out_f is not None and W.shape[0] != out_f):
            raise CoalaError(f"layer {name} has a weight of shape {tuple(W.shape)}, not the (out × in) matrix of "
                             f"its declared {out_f} outputs", layer=name)
        if bias is not None and tuple(bias.shape) != (W.shape[0],):
            raise CoalaError(f"layer {name} has a bias of shape {tuple(bias.shape)} for {W.shape[0]} outputs",
                             layer=name)


def check_model(model: nn.Module, targets: Sequence[str] | None) -> None:
    """The model has repeated blocks holding every target (ValueError naming the target otherwise), and passes
    ``check_weights`` with those targeted layers."""
    prefix, blocks = find_blocks(model)
    check_weights(model, {name: m for layers in block_layers(model, blocks, prefix, targets)
                          for name, m in layers.items()})


def check_writable(path: str | os.PathLike, what: str, argument: str | None = None, *,
                   shown: str | os.PathLike | None = None) -> None:
    """CoalaFileError naming ``shown`` (default ``path``) unless ``path`` is, or can be created as, a folder coala
    can write in: an existing path must be a folder, else its nearest existing ancestor must be a writable
    folder. Probes with a temporary file that is removed at once (read-only mounts, ACLs and permissions all
    count)."""
    target = Path(os.path.abspath(path))
    name = Path(os.path.abspath(shown)) if shown is not None else target
    probe = target
    try:
        while not probe.exists():
            probe = probe.parent
    except OSError as err:
        raise CoalaFileError(f"cannot write the {what} {name}: {probe} cannot be read ({err.strerror or err})",
                             path=name, argument=argument) from err
    if not probe.is_dir():
        where = "it" if probe == name else str(probe)
        raise CoalaFileError(f"cannot write the {what} {name}: {where} is a file, not a folder",
                             path=name, argument=argument)
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise CoalaFileError(f"cannot write the {what} {name}: {probe} is not writable ({err.strerror or err})",
                             path=name, argument=argument) from err


def check_output_location(out_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> None:
    """The output folder can be written (it is assembled in its parent and renamed into place; an existing
    output path must be a folder), and so can the checkpoint folder."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise CoalaFileError(f"output path {out} exists and is not a folder", path=out, argument="out_dir")
    check_writable(out.parent, "output folder", "out_dir", shown=out)
    if work_dir is not None:
        check_writable(work_dir, "checkpoint folder", "work_dir")
