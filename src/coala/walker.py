"""The one block loop (in the spirit of llm-compressor's ``SequentialPipeline``): every pass over a model's blocks
in coala — compressing, collecting statistics, probing for a rank allocation, replaying a resumed run — is
``BlockWalker.walk`` with different callbacks.

For each block i, ``walk``:
1. moves block i to the compute device;
2. streams every calibration batch through it while ``InputCapture`` hooks fill one ``ActivationStats`` per
   distinct input of the targeted layers (padding excluded) — only when statistics are asked for; in a
   distributed run each rank streams its own batches and the statistics are then reduced over the ranks
   (``coala.distributed.all_reduce_``);
3. calls ``solve(step)`` (statistics on the device; the callback may replace the block's layers);
4. propagates: the batches' hidden states become the block's outputs, computed by the block as it was during
   step 2 (``propagate="original"``) or as ``solve`` left it (``"compressed"``, sequential calibration);
5. moves the block home, calls ``after(step, result)`` (e.g. probes of the whole model), and with a checkpoint
   saves ``result.state`` / ``result.meta``.

Blocks already in the checkpoint (resume) are not solved again: ``restore(state, meta)`` swaps their saved
layers in and they propagate exactly as in the first run. Time spent in forwards, ``solve`` and ``after`` is
accumulated in ``times``. Hidden states live in memory or, with ``offload_dir``, in files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .blocks import BlockInputs, block_layers, catch_block_inputs, check_outputs, find_blocks
from .capture import InputCapture
from .checkpoint import BlockCheckpoint
from .distributed import all_reduce_, is_distributed
from .lowrank import model_device
from .resume import maybe_interrupt


@dataclass
class BlockStep:
    """Block ``index`` (dotted ``name``) during a walk: ``layers`` maps full names to its targeted layers, and
    ``capture`` holds their input statistics (``capture.stats_for(name)``), None when none were asked for."""

    index: int
    name: str
    layers: dict[str, nn.Module]
    capture: InputCapture | None


class Checkpointable(Protocol):
    """What ``solve`` returns when the walk keeps a checkpoint: tensors + JSON meta of the finished block."""

    state: dict[str, Tensor]
    meta: dict


class BlockWalker:
    """Walks calibration batches through a model's blocks, one block on the compute device at a time.

    Args:
        model: the model (eval mode; left where it is, usually on the CPU).
        batches: model inputs (``coala.blocks.normalize_batches``).
        targets: linear-layer names to compress inside each block (None: all of them).
        device: compute device for the current block (default: the model's device).
        progress: tqdm bars.
        offload_dir: keep the calibration hidden states in files in this folder instead of in memory.

    Attributes: ``prefix`` / ``blocks`` (``find_blocks``), ``layers[i]`` (full name → targeted layer of block i),
    ``times`` (seconds spent in block forwards, ``solve`` and ``after`` callbacks, over all walks).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[dict[str, Tensor]],
        *,
        targets: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        offload_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model, self.batches, self.progress, self.offload_dir = model, batches, progress, offload_dir
        self.prefix, self.blocks = find_blocks(model)
        self.layers = block_layers(model, self.blocks, self.prefix, targets)
        self.home = model_device(model)
        self.device = torch.device(device) if device is not None else self.home
        self.inputs: BlockInputs | None = None
        self.originals: BlockInputs | None = None  # the original model's stream (propagate="corrected")
        self.correction: float | None = None
        self.times = {"forward": 0.0, "solve": 0.0, "after": 0.0}

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    # ------------------------------------------------------------------------------------------ the loop
    def walk(
        self,
        solve: Callable[[BlockStep], Any],
        *,
        kinds: Iterable[str] = (),
        dtype: torch.dtype = torch.float32,
        propagate: str = "original",
        after: Callable[[BlockStep, Any], None] | None = None,
        checkpoint: BlockCheckpoint | None = None,
        done: int = 0,
        restore: Callable[[dict[str, Tensor], dict], Any] | None = None,
        desc: str = "blocks",
        folds: int = 1,
        correction: float | None = None,
    ) -> list[Any]:
        """Run the loop of the module docstring over every block; returns what ``solve`` (or ``restore``, for the
        first ``done`` blocks read back from ``checkpoint``) returned for each block.

        ``kinds``: statistics to collect ("r", "gram", "absmean"; none: no forward pass runs at all), accumulated
        in ``dtype``. With ``checkpoint``, ``solve`` returns an object with ``state`` (tensors) and ``meta``
        (JSON), saved after each block. ``folds`` > 1: the statistics also keep their rows in that many parts, by
        calibration sample (``sample_folds``; ``InputCapture``), as ``stats.folds``. ``propagate="corrected"``:
        compressed propagation whose statistics pair each input x̃ with the mix x̃ + α(x − x̃), α = ``correction``,
        x the same tokens' input in the original model (a second stream of hidden states, ``originals``, runs
        through the unchanged blocks; ``coala.linalg.corrected``).
        """
        if propagate not in ("original", "compressed", "corrected"):
            raise ValueError(f"propagate must be 'original', 'compressed' or 'corrected', got {propagate!r}")
        if propagate == "corrected" and correction is None:
            raise ValueError("propagate='corrected' needs the correction α (CompressConfig.correction)")
        self.correction = correction if propagate == "corrected" else None
        if done and (checkpoint is None or restore is None):
            raise ValueError("resuming (done > 0) needs the checkpoint and a restore callback")
        kinds = set(kinds)
        forward = bool(kinds)
        results: list[Any] = []
        last = len(self) - 1
        with torch.no_grad(), contextlib.ExitStack() as cleanup:
            cleanup.callback(self.close)
            if forward:
                self._catch(second=propagate == "corrected")
            for i in tqdm(range(len(self)), desc=desc, disable=not self.progress):
                step = BlockStep(i, self.block_name(i), self.layers[i], None)
                if i < done:
                    results.append(self._replay(i, checkpoint, restore, propagate, forward and i < last))
                    continue
                with self._on_device(i):
                    if forward:
                        step.capture = self._statistics(i, kinds, dtype, write=propagate == "original" and i < last,
                                                        folds=folds)
                    t0 = time.perf_counter()
                    result = solve(step)
                    self.times["solve"] += time.perf_counter() - t0
                    step.capture = None  # free the statistics before the propagation forward
                    if forward and propagate != "original" and i < last:
                        self._run(i, desc="propagate")
                step.layers = self._refresh_layers(i)
                if after is not None:
                    t0 = time.perf_counter()
                    after(step, result)
                    self.times["after"] += time.perf_counter() - t0
                if checkpoint is not None:
                    checkpoint.save_block(i, result.state, result.meta)
                    maybe_interrupt(i)
                results.append(result)
        return results

    def _statistics(self, i: int, kinds: set[str], dtype: torch.dtype, write: bool, folds: int = 1) -> InputCapture:
        """Statistics of the inputs of block i's targeted layers (one ActivationStats per distinct input), on the
        device; with ``write``, the batches' hidden states become the (unchanged) block's outputs."""
        with InputCapture(self.blocks[i], self.layers[i], kinds, dtype=dtype, device=self.device, folds=folds,
                          correction=self.correction) as cap:
            self._run(i, capture=cap, write=write, desc="calibrate")
        missing = [name for name in self.layers[i] if name not in cap.group_of]
        if missing:
            raise ValueError(f"layer {missing[0]} received no input during the calibration forward passes")
        if is_distributed():  # each rank saw its shard of the batches: reduce to the statistics of all of them
            t0 = time.perf_counter()
            all_reduce_(cap.fold_parts(), what=f"statistics of {self.block_name(i)}")
            self.times["forward"] += time.perf_counter() - t0  # part of the calibration time
        cap.merge_folds()
        return cap

    def _replay(self, i: int, checkpoint: BlockCheckpoint, restore, propagate: str, forward: bool) -> Any:
        """Block i from the checkpoint: its saved layers swapped in, its outputs propagated as in the first run."""
        state, meta = checkpoint.load_block(i)
        with self._on_device(i):
            if propagate == "corrected" and forward:  # the original stream goes through the unchanged block first
                self._run(i, desc="replay original", inputs=self.originals)
            if propagate != "original":
                result = restore(state, meta)
            if forward:
                self._run(i, desc="replay")
            if propagate == "original":
                result = restore(state, meta)
        self._refresh_layers(i)
        return result

    def _refresh_layers(self, i: int) -> dict[str, nn.Module]:
        """Point block i's entry at the layers now in the model (replaced dense weights must not stay alive)."""
        self.layers[i] = {name: self.model.get_submodule(name) for name in self.layers[i]}
        return self.layers[i]

    # ------------------------------------------------------------------------------------------ parts
    def _catch(self, second: bool = False) -> None:
        """Block 0's inputs for every batch; with ``second``, a second copy (``originals``: the original stream)."""
        self.close()
        t0 = time.perf_counter()
        self.inputs = catch_block_inputs(self.model, self.blocks[0], self.batches, progress=self.progress,
                                         offload_dir=self.offload_dir)
        if second:
            where = os.path.join(self.offload_dir, "original") if self.offload_dir is not None else None
            self.originals = self.inputs.copy(where)  # the two streams start equal
        self.times["forward"] += time.perf_counter() - t0

    def close(self) -> None:
        """Drop the cached hidden states (and their files when offloaded)."""
        for inputs in (self.originals, self.inputs):  # the originals' folder sits inside the other's
            if inputs is not None:
                inputs.close()
        self.inputs = self.originals = None

    def _forward(self, i: int, inputs: BlockInputs, b: int, write: bool) -> None:
        """Batch b of ``inputs`` through block i; with ``write``, its outputs replace the batch's hidden states."""
        args, kwargs = inputs.call(b, self.device)
        out = self.blocks[i](*args, **kwargs)
        del args, kwargs
        if write:
            h = out[0] if isinstance(out, (tuple, list)) else out
            check_outputs(h, inputs.masks[b], f"block {self.block_name(i)}")
            inputs.set_hidden(b, h)

    def _run(self, i: int, *, capture: InputCapture | None = None, write: bool = True, desc: str = "",
             inputs: BlockInputs | None = None) -> None:
        """Stream every batch of ``inputs`` (default: the compressed / only stream) through block i (already on the
        device); with ``write``, each batch's hidden states become the block's outputs (checked finite on real
        tokens). A ``capture`` with a ``correction`` (propagate="corrected") pairs each batch's inputs with the
        original stream's: that batch runs first through the unchanged block from ``originals`` while the capture
        records, and its outputs become block i+1's original inputs (except after the last block)."""
        inputs = inputs if inputs is not None else self.inputs
        t0 = time.perf_counter()
        bar = tqdm(range(len(inputs)), desc=f"{desc} {self.block_name(i)}", disable=not self.progress, leave=False)
        first = 0  # index of the batch's first sample in the walk
        with torch.no_grad():
            for b in bar:
                if capture is not None:
                    capture.mask = inputs.masks[b]
                    if capture.folds > 1:  # hashing every sample is only needed when the rows are kept in folds
                        capture.row_folds = sample_folds(self.batches[b], first, capture.folds)
                    first += inputs.sizes[b]
                    if capture.correction is not None:
                        capture.recording = True
                        self._forward(i, self.originals, b, write=i < len(self) - 1)
                        capture.recording = False
                self._forward(i, inputs, b, write)
        self.times["forward"] += time.perf_counter() - t0

    @contextlib.contextmanager
    def _on_device(self, i: int):
        block = self.blocks[i]
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(self.home)


def sample_folds(batch: dict[str, Tensor], first: int, folds: int) -> Tensor:
    """The fold (0..folds-1) of every sample of ``batch``: a hash of its real tokens (input ids where the mask is
    1), so that a sample falls in the same fold however the samples are batched or shared out between the ranks
    of a distributed run; ``(first + row) mod folds`` for batches without input ids (``first``: the index of the
    batch's first sample in the walk)."""
    ids = batch.get("input_ids")
    if ids is None:
        return torch.arange(first, first + int(next(iter(batch.values())).shape[0])) % folds
    mask = batch.get("attention_mask")
    out = []
    for row in range(ids.shape[0]):
        real = ids[row] if mask is None else ids[row][mask[row].bool()]
        digest = hashlib.blake2b(real.to(torch.int64).cpu().numpy().tobytes(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") % folds)
    return torch.tensor(out, dtype=torch.int64)
