"""The pipeline side of a distributed run (docs/design.md §12): which calibration batches and which solves each
rank takes, what only rank 0 does (files), and the check that every rank runs the same job.

In one process every function here is the identity or the plain one-process call, so the verbs (``compress``,
``collect_statistics``, ``compare``, LoRA initialisation) run one code path whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .capture import InputCapture
from .checkpoint import BlockCheckpoint
from .compress_report import LayerReport
from .config import CompressConfig, OutputConfig, RuntimeConfig
from .distributed import (
    DistributedError,
    balance,
    broadcast_json,
    broadcast_tensors,
    check_same,
    is_distributed,
    is_main,
    merge_loads,
    phase,
    publish_failure,
    rank,
    world_size,
)
from .layer_solve import StatsSource, restore_layers, solve_layers
from .linalg.decomposition import Decomposition
from .lowrank import dense_weight, linear_shape, model_device
from .resume import fingerprint, prepare_output

T = TypeVar("T")


def _rows(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    size = int((batch["input_ids"] if "input_ids" in batch else batch["inputs_embeds"]).shape[0])
    return [{k: v[i : i + 1] if isinstance(v, Tensor) and v.ndim and v.shape[0] == size else v
             for k, v in batch.items()} for i in range(size)]


def shard_batches(batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """This rank's calibration batches: whole batches (so each sample's hidden states are computed in the same
    batch as in one process), balanced by padded tokens; when there are fewer batches than ranks, single samples.
    One process: all of them. Fewer samples than ranks is a DistributedError (argument "nsamples")."""
    n = world_size()
    if n == 1:
        return list(batches)
    if len(batches) < n:
        batches = [row for b in batches for row in _rows(b)]
        if len(batches) < n:
            raise DistributedError(f"fewer calibration samples ({len(batches)}) than ranks ({n}): every rank needs "
                                   "at least one; give more samples (--nsamples) or start fewer processes",
                                   argument="nsamples", shared=True)
    sizes = [(b["input_ids"] if "input_ids" in b else b["inputs_embeds"][..., 0]).shape for b in batches]
    costs = [float(rows * seq) * max(1.0, seq / 256) for rows, seq in sizes]
    me = rank()
    return [b for b, owner in zip(batches, balance(costs, n), strict=True) if owner == me]


def on_main(fn: Callable[[], T], what: str, *, share: bool = False) -> T | None:
    """``fn()`` on rank 0 only (files); every rank then waits for it, and a failure there is raised on every rank
    (a DistributedError naming rank 0 on the others). ``share``: the (JSON) result is broadcast; otherwise the
    other ranks get None. One process: just ``fn()``."""
    if not is_distributed():
        return fn()
    value = None
    if is_main():
        try:
            value = fn()
        except BaseException as err:
            publish_failure(err)
            raise
    with phase(what):  # the check-in: the others learn here whether rank 0 failed
        return broadcast_json(value if is_main() else None, 0, what=what) if share else value


class MainCheckpoint:
    """A ``BlockCheckpoint`` that only rank 0 reads and writes, for the block walker of a distributed run:
    ``start`` and ``load_block`` broadcast what rank 0 found, ``save_block`` / ``clear`` act on rank 0 only."""

    def __init__(self, ckpt: BlockCheckpoint | None, work_dir: str | Path) -> None:
        self.ckpt, self.work_dir = ckpt, Path(work_dir)

    def start(self, fingerprint: dict) -> int:
        return int(on_main(lambda: self.ckpt.start(fingerprint), "open the checkpoint", share=True))

    def save_block(self, index: int, state: dict[str, Tensor], meta: dict) -> None:
        if is_main():
            self.ckpt.save_block(index, state, meta)

    def load_block(self, index: int) -> tuple[dict[str, Tensor], dict]:
        state, meta = self.ckpt.load_block(index) if is_main() else (None, None)  # a failure is published
        with phase(f"read checkpoint block {index}"):
            meta = broadcast_json(meta, 0, what=f"checkpoint block {index}")
            return broadcast_tensors(state, 0, what=f"checkpoint block {index} tensors"), meta

    def finished(self) -> int:
        return self.ckpt.finished() if is_main() else 0

    def clear(self) -> None:
        if is_main():
            self.ckpt.clear()


def prepare_run(output: OutputConfig) -> BlockCheckpoint | MainCheckpoint | None:
    """``resume.prepare_output`` (the output checks and the checkpoint), run on rank 0 in a distributed run."""
    if not is_distributed():
        return prepare_output(output)
    ckpt = on_main(lambda: prepare_output(output), "check the output folder")
    if not output.out_dir:
        return None
    return MainCheckpoint(ckpt, output.work_dir or f"{output.out_dir}.partial")


def distribute(model: nn.Module, batches: list[dict[str, Tensor]], description: dict, settings: Sequence,
               runtime: RuntimeConfig) -> tuple[list[dict[str, Tensor]], RuntimeConfig]:
    """(this rank's batches, its runtime settings): every rank must hold the same model, settings and calibration
    (their fingerprint is compared: a DistributedError names the ranks and what differs); progress bars on rank 0
    only. One process: the arguments unchanged."""
    if not is_distributed():
        return batches, runtime
    check_agreement(model, batches, description, settings, runtime.device or model_device(model))
    return shard_batches(batches), replace(runtime, progress=runtime.progress and is_main())


def check_agreement(model: nn.Module, batches: Sequence[dict[str, Tensor]], description: dict, settings: Sequence,
                    device: torch.device | str) -> None:
    """A DistributedError on every rank unless all ranks hold the same model (config, names, shapes, dtypes and a
    strided sample of every tensor), settings (dataclasses) and calibration batches — the fingerprint of a
    resumable run (``resume.fingerprint``), compared by hash. One process: nothing."""
    if is_distributed():
        check_same(fingerprint(model, list(batches), description, settings, device),
                   "the model, the settings and the calibration")


def share_plan(plan: Mapping[str, int | None]) -> dict[str, int | None]:
    """Rank 0's rank plan on every rank (so that every rank compresses to the same ranks whatever the rounding of
    its own allocation evidence)."""
    return dict(plan) if not is_distributed() else broadcast_json(dict(plan), 0, what="the rank plan")


def _layer_of(key: str) -> str:
    return key.rsplit(".", 2)[0]  # "<layer>.down.weight" / "<layer>.up.weight" / "<layer>.up.bias"


MERGE_COST = 1 / 6  # a TSQR merge of width n, in units of solve_cost: ≈ n³ / 6 (measured, see solve_cost)


def solve_cost(m: int, n: int) -> float:
    """Relative cost of solving an m × n matrix: its SVD (∝ m·n·min(m, n)) plus its products with the n × n R
    (W Rᵀ and the reported error, ∝ m·n²; ≈ 1/3 of an SVD unit each, measured on one CPU thread with SmolLM2,
    where a merge of two n × n triangles costs ≈ n³/6 of the same units)."""
    return float(m * n * min(m, n)) + m * n * n / 3


def solve_layers_split(model: nn.Module, layers: Mapping[str, nn.Module], source: StatsSource,
                       plan: Mapping[str, int | None], config: CompressConfig, *,
                       device: torch.device | str | None = None,
                       decompositions: Mapping[str, Decomposition] | None = None,
                       progress: bool = True) -> tuple[list[LayerReport], dict[str, Tensor]]:
    """``layer_solve.solve_layers`` with the matrices shared out between the ranks (largest first, to the least
    loaded rank, by ``solve_cost``, counting the TSQR merges each rank did in the walker's reduction of this block,
    which fall in the same phase): each rank solves its own, then each broadcasts its report rows and new layers'
    tensors and the others swap those layers in. Every rank ends with the same model and returns the rows and
    tensors of all ``layers`` in their order, as one process would. One process: ``solve_layers``."""
    if not is_distributed():
        return solve_layers(model, layers, source, plan, config, device=device, decompositions=decompositions,
                            progress=progress)
    names = list(layers)
    costs = [0.0 if plan[n] is None else solve_cost(*linear_shape(layers[n])) for n in names]
    merged = (merge_loads([source.stats[k] for k in sorted(source.stats)], world_size())
              if isinstance(source, InputCapture) else [0.0] * world_size())  # the walker's merges, this phase
    owner = dict(zip(names, balance(costs, world_size(), [MERGE_COST * x for x in merged]), strict=True))
    me = rank()
    mine = {n: layers[n] for n in names if owner[n] == me}
    rows, state = solve_layers(model, mine, source, plan, config, device=device, decompositions=decompositions,
                               progress=progress)
    target = dense_weight(layers[names[0]]).device if names else None
    by_name: dict[str, Any] = {r.name: r for r in rows}
    tensors: dict[str, Tensor] = dict(state)
    with phase("share the solved layers"):  # one check-in for the whole exchange
        for r in range(world_size()):
            got_rows = broadcast_json([asdict(x) for x in rows] if r == me else None, r, what=f"rows of rank {r}")
            got = broadcast_tensors(state if r == me else None, r, device=target, what=f"factors of rank {r}")
            if r != me:
                restore_layers(model, got, got_rows)
                by_name.update({row["name"]: LayerReport(**row) for row in got_rows})
                del got  # copied into the new layers: keep their own tensors, as for the layers solved here
                tensors.update({f"{row['name']}.{k}": v for row in got_rows if row["rank"] is not None
                                for k, v in model.get_submodule(row["name"]).state_dict().items()})
    order = {n: i for i, n in enumerate(names)}
    return [by_name[n] for n in names], dict(sorted(tensors.items(), key=lambda kv: order[_layer_of(kv[0])]))


def split_work(costs: Mapping[str, float], work: Callable[[str], dict[str, Tensor]], *,
               device: torch.device | str | None = None, what: str = "work") -> dict[str, dict[str, Tensor]]:
    """``work(name)`` (named tensors) for every name of ``costs``, each computed on one rank (``balance``), every
    result then broadcast, so that every rank returns all of them in the order of ``costs``. One process: a loop."""
    if not is_distributed():
        return {name: work(name) for name in costs}
    names, me = list(costs), rank()
    owner = dict(zip(names, balance([float(costs[n]) for n in names], world_size()), strict=True))
    mine = {n: work(n) for n in names if owner[n] == me}
    out: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    with phase(what):
        for r in range(world_size()):
            flat = {f"{n}\t{k}": t for n, res in mine.items() for k, t in res.items()} if r == me else None
            for key, t in broadcast_tensors(flat, r, device=device, what=f"{what}: results of rank {r}").items():
                n, k = key.split("\t", 1)
                out[n][k] = t
    return out
