"""Run a function on N real processes joined by torch.distributed (gloo on the CPU), as torchrun would: each
process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls
``coala.distributed.init_from_env``. No mocks: real sockets, a real rendezvous store, real collectives."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    torch.set_num_threads(1)
    from coala import distributed

    distributed.init_from_env(device="cpu", timeout=timeout_s)
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


PRELOAD = ["torch", "transformers", "coala", "coala.distributed_run", "coala.compare", "_compress_models",
           "_distributed"]


def spawn(fn, world: int, *args, timeout_s: float = 60.0) -> None:
    """``fn(rank, *args)`` on ``world`` fresh processes (``fn`` must be importable: a module-level function).

    Started by a fork server that imported torch, transformers and coala once (a clean process that ran no
    computation, so forking it is safe): a process then starts in well under a second instead of re-importing
    for several seconds."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(_entry, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True,
                       start_method="forkserver")


# ---------------------------------------------------------------------------------------------- workers
# Module-level functions, so that the spawned processes can import them. Each writes what the test checks into
# the folder it is given (rank-suffixed files); the test process compares with a one-process run.
def save_json(path, obj) -> None:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(obj))


def error_text(fn) -> dict:
    """{"type", "message", "ranks", "argument"} of the exception ``fn()`` raised ({} when it raised none)."""
    try:
        fn()
    except Exception as err:
        return {"type": type(err).__name__, "message": str(err), "ranks": getattr(err, "ranks", None),
                "argument": getattr(err, "argument", None)}
    return {}


def stats_worker(rank: int, out: str, n: int) -> None:
    """Each rank streams its own rows into float32 and float64 statistics and reduces them (all_reduce_); rank
    k's rows are rows k, k + N, … of one seeded (N·(k+1) … ) matrix, so the test can rebuild the union."""
    import safetensors.torch

    from coala import distributed
    from coala.linalg import ActivationStats, RFactor

    X = rows_of_rank(rank, n)
    saved = {}
    for dtype in (torch.float32, torch.float64):
        stats = ActivationStats(n, ("r", "gram", "absmean"), dtype=dtype)
        stats.update(X[:5])
        stats.update(X[5:])  # two updates: a pending buffer is folded in before the reduction
        alone = RFactor(n, dtype=dtype, block_rows=3)
        alone.update(X)
        distributed.all_reduce_([stats, alone])
        key = str(dtype).removeprefix("torch.")
        saved.update({f"{key}.R": stats.r.R, f"{key}.G": stats.gram.G, f"{key}.absmean": stats.absmean.mean,
                      f"{key}.alone": alone.R,
                      f"{key}.rows": torch.tensor([stats.num_rows, stats.r.num_rows, stats.gram.num_rows,
                                                   stats.absmean.num_rows, alone.num_rows])})
    safetensors.torch.save_file({k: v.contiguous() for k, v in saved.items()}, f"{out}/stats-{rank}.safetensors")
    # the transport helpers
    sent = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64) * 7,
            "c": torch.zeros(0)}
    got = distributed.broadcast_tensors(sent if rank == 1 else None, 1)
    same = all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in sent.items())
    save_json(f"{out}/transport-{rank}.json", {
        "tensors": same, "json": distributed.broadcast_json({"x": [1, 2.5, None]} if rank == 0 else None),
        "gather": distributed.gather_json(rank * 10),
        "same_ok": error_text(lambda: distributed.check_same({"a": 1, "b": [1, 2]}, "a payload")),
        "differs": error_text(lambda: distributed.check_same({"a": 1, "b": rank}, "a payload")),
    })


def rows_of_rank(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    scale = torch.logspace(0, -3, n, dtype=torch.float64)  # cond 1e3 columns
    return (torch.randn(7 + 3 * rank, n, generator=g, dtype=torch.float64) * scale).float()


def compress_worker(rank: int, out: str, cases: list) -> None:
    """``compress`` of each case (kind, method, stats_dtype, pad) on this rank's shard; rank 0 writes the model."""
    from _compress_models import batches, build
    from coala.compress import compress
    from coala.config import CompressConfig, OutputConfig, RuntimeConfig

    for kind, method, dtype, pad in cases:
        model = build_case(kind)
        report = compress(model, batches(n=3, pad=pad), CompressConfig(ratio=0.4, method=method, stats_dtype=dtype),
                          runtime=RuntimeConfig(progress=False),
                          output=OutputConfig(out_dir=f"{out}/{kind}-{method}-{dtype}"))
        save_json(f"{out}/{kind}-{method}-{dtype}-report-{rank}.json", report.to_dict()["layers"])


def build_case(kind: str):
    """The tiny test models; GPT-2's LayerNorms get random weights and biases: with bias 0 every LayerNorm output
    is orthogonal to the all-ones vector, the Gram matrix of SVD-LLM is singular and its shifted Cholesky then
    depends on rounding noise (an ill-posed solve that no two summation orders reproduce)."""
    from _compress_models import build

    model = build(kind)
    if kind == "gpt2":
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
    return model
