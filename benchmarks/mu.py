"""The paper's μ study: how far regularisation moves the solution, and when it helps (docs/design.md §2).

Run: ``python benchmarks/mu.py [--quick]`` from the repository root (or ``coala bench mu``).

Part A — ‖W₀ − W_μ‖_F against μ for a few real layers of all-MiniLM-L6-v2 (inputs captured on the built-in
"train" text), everything in float64 so that rounding does not blur small μ. W_μ is coala's regularised
solution at rank r (R_μ from [R; √μ I]); W₀ the μ = 0 one at the same rank. Next to the measurement:

- the first-order prediction μ·‖Ẇ‖_F, with Ẇ = dW_μ/dμ at μ = 0 from perturbation theory: W_μ = P(μ)W with P
  the projector on the top-r eigenvectors of M(μ) = W(XᵀX + μI)Wᵀ = M₀ + μWWᵀ, so
  Ṗ = Σ_{i≤r<j} (u_iᵀWWᵀu_j)/(λ_i − λ_j)(u_iu_jᵀ + u_ju_iᵀ), λ_i = σ_i²(WXᵀ): inversely proportional to the
  gaps of the squared singular values at the cut, the nearest one σ_r² − σ_{r+1}² above all;
- the paper's bound as docs/design.md §2 restates it:
  2‖W‖₂²‖W‖_F (σ₁(X)/σ_k(X) + max(1, μ/(4σ_k²(X)))) μ / (σ_r²(WXᵀ) − σ_{r+1}²(WXᵀ)).

Part B — held-out quality against μ with few calibration samples, where regularisation should matter most:
``coala.compress`` (COALA, 20 % removed) with 4, 16 and 64 built-in calibration samples, for μ = 0, μ with the
adaptive rule (μ_eff = μ·‖(W−W₀)Xᵀ‖²/‖W−W₀‖², which makes μ dimensionless) and fixed μ; then the mean cosine of
mean-pooled sentence embeddings to the original model's, in domain (``evaluation_sentences("builtin")``: the
held-out part of the calibration mix, never seen) and out of domain (``evaluation_sentences("english")``: the
evaluation text written separately from the calibration text; ``--ood PATH`` takes a file instead).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling helpers (benchmarks/_*.py) import by name, however the script is run
    sys.path.insert(0, str(HERE))

from _report import machine, markdown_table, new_figure, out_dir, write_markdown

F64 = torch.float64
OOD_DEFAULT = "english"
LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.2.intermediate.dense",
          "encoder.layer.3.attention.output.dense", "encoder.layer.5.output.dense")
RATIOS = (0.2, 0.5, 0.8)  # ranks of Part A: the uniform rank for these fractions removed


# ---------------------------------------------------------------------------------------------- part A
@dataclass
class Curve:
    """One layer at one rank: ‖W₀ − W_μ‖_F / ‖W‖_F over the μ grid, and its predictions (same units)."""

    layer: str
    shape: tuple[int, int]
    rank: int
    gap: float  # (σ_r² − σ_{r+1}²) / σ₁² of W Xᵀ
    measured: Tensor  # at each grid point x = μ / σ₁(X)²
    first_order: float  # d(‖W₀ − W_μ‖/‖W‖)/dx at 0
    bound: Tensor  # the bound at each grid point, / ‖W‖_F


def first_order_slope(W: Tensor, U: Tensor, lam: Tensor, r: int) -> float:
    """‖dW_μ/dμ‖_F at μ = 0 (float64): U (m × m) the eigenvectors of W XᵀX Wᵀ, lam (m,) its eigenvalues
    (descending, zeros past rank), r the cut."""
    E = U.T @ W @ W.T @ U
    diff = lam[:r, None] - lam[None, r:]
    K = torch.zeros_like(E)
    K[:r, r:] = E[:r, r:] / diff
    K = K + K.T
    return float((K @ (U.T @ W)).norm())


def layer_curves(name: str, W: Tensor, X: Tensor, grid: Tensor) -> list[Curve]:
    """Part A for one layer (W: out × in, X: tokens × in; float32 from the capture, studied in float64)."""
    from coala.linalg import RFactor, decompose

    W, X = W.to(F64), X.to(F64)
    m, n = W.shape
    stats = RFactor(n, dtype=F64).update(X)
    R = stats.R
    sx = torch.linalg.svdvals(R)
    k = int((sx > max(X.shape) * torch.finfo(F64).eps * sx[0]).sum())
    sx1, sxk = float(sx[0]), float(sx[k - 1])
    U, s, _ = torch.linalg.svd(W @ R.T, full_matrices=True)
    lam = torch.zeros(m, dtype=F64)
    lam[: s.shape[0]] = s.square()
    ranks = [max(1, int(m * n * (1 - ratio) / (m + n))) for ratio in RATIOS]
    w_norm, w2 = float(W.norm()), float(torch.linalg.matrix_norm(W, 2))
    base = decompose(W, stats)
    W0 = {r: torch.matmul(*base.factors(r)) for r in ranks}
    measured = {r: torch.empty(len(grid), dtype=F64) for r in ranks}
    for i, x in enumerate(grid.tolist()):
        dec = decompose(W, stats, mu=x * sx1**2)
        for r in ranks:
            measured[r][i] = float((W0[r] - torch.matmul(*dec.factors(r))).norm()) / w_norm
    out = []
    for r in ranks:
        gap = float(lam[r - 1] - lam[r])
        mu = grid * sx1**2
        bound = 2 * w2**2 * w_norm * (sx1 / sxk + torch.clamp(mu / (4 * sxk**2), min=1.0)) * mu / gap / w_norm
        slope = first_order_slope(W, U, lam, r) * sx1**2 / w_norm
        out.append(Curve(name, (m, n), r, gap / float(lam[0]), measured[r], slope, bound))
    return out


def measured_slope(c: Curve, grid: Tensor) -> float:
    """d(‖W₀ − W_μ‖/‖W‖)/dx from the smallest grid point whose change is clear of float64 rounding (> 1e-11)."""
    ok = (c.measured > 1e-11).nonzero()
    if ok.numel() == 0:
        return math.nan
    i = int(ok[0])
    return float(c.measured[i] / grid[i])


def linear_until(c: Curve, grid: Tensor, tol: float = 0.1) -> float:
    """The largest grid x up to which the measurement stays within ``tol`` of the first-order line."""
    last = math.nan
    for i, x in enumerate(grid.tolist()):
        y = float(c.measured[i])
        if y <= 1e-11:
            continue
        if abs(y - c.first_order * x) > tol * y:
            break
        last = x
    return last


def part_a(tokens: int, grid: Tensor, layers: tuple[str, ...], progress: bool) -> tuple[list[Curve], str]:
    from _activations import capture_linear_inputs, load_minilm
    from coala.data import builtin_sentences

    model, tok = load_minilm()
    caps = capture_linear_inputs(model, tok, layers, builtin_sentences("train"), max_tokens=tokens,
                                 progress=progress)
    curves = []
    for name in layers:
        t0 = time.perf_counter()
        curves += layer_curves(name, caps[name].weight, caps[name].rows, grid)
        print(f"  {name}: {caps[name].rows.shape[0]} tokens, {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for c in curves:
        meas = measured_slope(c, grid)
        bound_slope = float(c.bound[0] / grid[0])
        rows.append([c.layer.removeprefix("encoder."), f"{c.shape[0]} × {c.shape[1]}", c.rank, f"{c.gap:.2e}",
                     f"{meas:.3g}", f"{c.first_order:.3g}", f"{meas / c.first_order:.3f}",
                     f"{meas * c.gap:.3g}", f"{bound_slope:.3g}", f"{bound_slope / meas:.2g}",
                     f"{linear_until(c, grid):.0e}"])
    fit = gap_exponent(curves, grid)
    table = markdown_table(
        ["layer", "W (out × in)", "rank r", "gap (σ_r² − σ_{r+1}²)/σ₁²", "slope measured", "slope 1st order",
         "measured / 1st order", "slope × gap", "slope of the bound", "bound / measured",
         "linear (±10 %) up to μ/σ₁(X)² ="], rows)
    return curves, table + (f"\n\nLeast-squares fit over these {len(curves)} points: measured slope ∝ gap^{fit:.2f} "
                            "(−1 would be the nearest gap alone).")


def gap_exponent(curves: list[Curve], grid: Tensor) -> float:
    """b of the least-squares fit log(slope) = a + b·log(gap) over all (layer, rank) points."""
    g = torch.tensor([math.log(c.gap) for c in curves], dtype=F64)
    y = torch.tensor([math.log(measured_slope(c, grid)) for c in curves], dtype=F64)
    A = torch.stack([torch.ones_like(g), g], 1)
    return float(torch.linalg.lstsq(A, y[:, None]).solution[1, 0])


# ---------------------------------------------------------------------------------------------- part B
def ood_texts(source: str) -> list[str] | None:
    """Out-of-domain sentences: a named source's evaluation sentences, a file's documents, or None (no such file)."""
    from coala.data import SOURCES, evaluation_sentences

    if source not in SOURCES and not Path(source).is_file():
        return None
    return [t for t in evaluation_sentences(source) if len(t.strip()) >= 40]


def settings(adaptive: list[float], fixed: list[float]) -> list[tuple[str, float, bool]]:
    """(label, μ, adaptive) for μ = 0, each adaptive μ and each fixed (absolute) μ."""
    return ([("0", 0.0, False)] + [(f"adaptive {m:g}", m, True) for m in adaptive if m > 0]
            + [(f"fixed {m:g}", m, False) for m in fixed if m > 0])


def part_b(samples: list[int], grid: list[tuple[str, float, bool]], ratio: float, ood_path: str,
           seed: int) -> tuple[list[dict], str]:
    from tqdm.auto import tqdm

    from coala import CalibrationConfig, CompressConfig, RuntimeConfig, compress
    from coala.data import evaluation_sentences
    from coala.evaluate import embedding_fidelity, sentence_embeddings
    from coala.models import load_model

    model, tok, _ = load_model()
    sets = {"in domain": evaluation_sentences("builtin")}
    ood = ood_texts(ood_path)
    if ood:
        sets["out of domain"] = ood
    refs = {k: sentence_embeddings(model, tok, v) for k, v in sets.items()}
    results = []
    for ns in tqdm(samples, desc="calibration samples", leave=False):
        for label, mu, adaptive in tqdm(grid, desc="mu", leave=False):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            config = CompressConfig(ratio=ratio, mu=mu, adaptive_mu=adaptive, allocation="uniform")  # μ alone varies
            report = compress(m, "builtin", config,
                              data=CalibrationConfig(nsamples=ns, seed=seed), runtime=RuntimeConfig(progress=False),
                              tokenizer=tok)
            eff = [r.mu for r in report.layers]
            row = {"samples": ns, "tokens": report.calibration.get("tokens"), "setting": label,
                   "mean_mu_eff": sum(eff) / len(eff), "off": sum(e < 1e-6 * mu for e in eff), "layers": len(eff),
                   "seconds": time.perf_counter() - t0}
            for k, texts in sets.items():
                fid = embedding_fidelity(m, refs[k], tok, texts)
                row[k] = (fid.mean_cosine, fid.p05_cosine)
            results.append(row)
            print(f"  samples {ns:3d} ({row['tokens']} tokens)  μ {label:<14s} "
                  + "  ".join(f"{k}: {row[k][0]:.4f}" for k in sets), flush=True)
            del m
    heads = ["samples (tokens)", "μ", "mean μ_eff", "layers switched off (μ_eff < 1e-6·μ)"]
    for k in sets:
        heads += [f"{k}: mean cos", f"{k}: p05"]
    rows = []
    for r in results:
        best = {k: max(x[k][0] for x in results if x["samples"] == r["samples"]) for k in sets}
        row = [f"{r['samples']} ({r['tokens']})", r["setting"], f"{r['mean_mu_eff']:.3g}",
               f"{r['off']} / {r['layers']}" if r["setting"].startswith("adaptive") else ""]
        for k in sets:
            mean = f"{r[k][0]:.4f}"
            row += [f"**{mean}**" if r[k][0] == best[k] else mean, f"{r[k][1]:.4f}"]
        rows.append(row)
    note = "" if ood else f"\n\nOut of domain: not measured ({ood_path} is neither a source nor a file)."
    counts = ", ".join(f"{k}: {len(v)} texts" for k, v in sets.items())
    return results, markdown_table(heads, rows) + f"\n\n({counts}; best per sample count in bold.)" + note


# ---------------------------------------------------------------------------------------------- output
def _plot(curves: list[Curve], grid: Tensor, results: list[dict], ratio: float, path: Path) -> None:
    layers = list(dict.fromkeys(c.layer for c in curves))
    cols = math.ceil((len(layers) + 2) / 2)
    fig, grid_axes = new_figure(2, cols, figsize=(4.6 * cols, 8.2), squeeze=False)
    axes = [ax for row in grid_axes for ax in row]
    x = grid.numpy()
    for ax, layer in zip(axes, layers, strict=False):
        mine = [c for c in curves if c.layer == layer]
        for j, c in enumerate(mine):
            color = f"C{j}"
            ok = c.measured.numpy() > 1e-11
            ax.loglog(x[ok], c.measured.numpy()[ok], "o-", color=color, ms=3, label=f"r={c.rank} measured")
            ax.loglog(x, c.first_order * x, "--", color=color, lw=1, label="1st order")
            ax.loglog(x, c.bound.numpy(), ":", color=color, lw=1, label="bound (§2)")
        ax.set_title(f"{layer.removeprefix('encoder.')} ({mine[0].shape[0]} × {mine[0].shape[1]})", fontsize=9)
        ax.set_xlabel("μ / σ₁(X)²")
        ax.set_ylim(1e-9, 1e3)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("‖W₀ − W_μ‖_F / ‖W‖_F")
    axes[0].legend(fontsize=6, ncol=1)
    ax = axes[len(layers)]
    gaps = [c.gap for c in curves]
    ax.loglog(gaps, [measured_slope(c, grid) for c in curves], "o", label="measured")
    ax.loglog(gaps, [c.first_order for c in curves], "x", color="k", label="1st order")
    g = torch.tensor(sorted(gaps), dtype=F64)
    ref = sorted(zip(gaps, [measured_slope(c, grid) for c in curves], strict=True))[len(gaps) // 2]
    ax.loglog(g, ref[1] * ref[0] / g, ":", color="gray", label="∝ 1 / gap")
    ax.set_xlabel("(σ_r² − σ_{r+1}²) / σ₁²  of W Xᵀ")
    ax.set_ylabel("slope d(‖W₀ − W_μ‖/‖W‖) / d(μ/σ₁(X)²)")
    ax.set_title("slope against the gap at the cut", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[len(layers) + 1]
    labels = list(dict.fromkeys(r["setting"] for r in results))
    for j, ns in enumerate(dict.fromkeys(r["samples"] for r in results)):
        rs = {r["setting"]: r for r in results if r["samples"] == ns}
        for k, ls in (("in domain", "-"), ("out of domain", "--")):
            if k in results[0]:
                ax.plot(range(len(labels)), [rs[lab][k][0] for lab in labels], ls, marker="o", color=f"C{j}", ms=3,
                        label=f"{ns} samples, {k}")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("μ")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title(f"held-out quality against μ ({100 * ratio:g} % removed)", fontsize=9)
    if results:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/mu)")
    ap.add_argument("--quick", action="store_true", help="coarser μ grids, 4 and 16 samples, 2048 tokens for part A")
    ap.add_argument("--tokens", type=int, default=None, help="part A tokens (default 4096; quick 2048)")
    ap.add_argument("--samples", default=None, help="part B sample counts (default 4,16,64; quick 4,16)")
    ap.add_argument("--adaptive-mus", default=None,
                    help="part B μ with the adaptive rule (default 0.1,1,10; quick 1,10)")
    ap.add_argument("--fixed-mus", default=None,
                    help="part B absolute μ, no rule (default 1,10,100; quick 10): μ ≈ that many tokens of unit "
                         "variance per channel, the scale of LayerNorm'd inputs")
    ap.add_argument("--ratio", type=float, default=0.2, help="part B fraction removed (default 0.2)")
    ap.add_argument("--ood", default=OOD_DEFAULT,
                    help=f"out-of-domain text: a named source or a .txt / .jsonl file (default {OOD_DEFAULT})")
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    ap.add_argument("--skip-b", action="store_true", help="part A only")
    ap.add_argument("--layers", default=",".join(LAYERS), help="part A: MiniLM layers (comma-separated)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: MKL's SVD slows down ~10x when threads share busy cores)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    tokens = args.tokens or (2048 if args.quick else 4096)
    grid = torch.logspace(-10, 0, 11 if args.quick else 21, dtype=F64)
    samples = [int(t) for t in (args.samples or ("4,16" if args.quick else "4,16,64")).split(",") if t.strip()]
    adaptive = [float(t) for t in (args.adaptive_mus or ("1,10" if args.quick else "0.1,1,10")).split(",") if t.strip()]
    fixed = [float(t) for t in (args.fixed_mus if args.fixed_mus is not None else ("10" if args.quick else "1,10,100")
                                ).split(",") if t.strip()]
    folder = out_dir(args.out, "mu")
    print(machine())
    t_start = time.perf_counter()

    print("Part A: ‖W₀ − W_μ‖ against μ (float64)")
    layers = tuple(t.strip() for t in args.layers.split(",") if t.strip())
    curves, t_a = part_a(tokens, grid, layers, progress=True)
    print(t_a)
    results, t_b = [], "(skipped)"
    if not args.skip_b:
        print("Part B: held-out quality against μ")
        results, t_b = part_b(samples, settings(adaptive, fixed), args.ratio, args.ood, args.seed)
        print(t_b)
    elapsed = time.perf_counter() - t_start
    _plot(curves, grid, results, args.ratio, folder / "mu.png")
    notes_a = (f"Part A: all-MiniLM-L6-v2, inputs of {len(layers)} layers on the first {tokens}+ built-in train tokens "
               "(padding excluded); R, the regularised solves and the references in float64. Ranks: the uniform "
               f"rank for {', '.join(f'{100 * r:g} %' for r in RATIOS)} removed. Slopes are "
               "d(‖W₀ − W_μ‖_F/‖W‖_F)/d(μ/σ₁(X)²) at μ → 0: measured at the smallest μ of the grid whose change "
               "clears float64 rounding; '1st order' is the perturbation derivative above; 'slope × gap' would be "
               "constant if the nearest gap alone set the slope. The bound is the paper's (docs/design.md §2).")
    body = ("## Part A — ‖W₀ − W_μ‖ against μ\n\n" + t_a + "\n\n" + notes_a + "\n\n## Part B — held-out quality "
            f"against μ, few calibration samples\n\n{t_b}\n\nPart B: coala.compress, COALA, {100 * args.ratio:g} % "
            "of the targeted parameters removed (uniform ranks), sequential propagation, float32 statistics, "
            f"built-in calibration samples drawn with seed {args.seed}. 'adaptive μ': the official rule, μ_eff = "
            "μ·‖(W−W₀)Xᵀ‖²/‖W−W₀‖² per layer (the 'mean μ_eff' column); for a layer whose X has rank ≤ r the "
            "weighted truncation loss vanishes (up to rounding), so the rule switches μ off exactly when the "
            "solution is not unique (the 'switched off' column). 'fixed μ': μ itself, i.e. μI added to XᵀX (about "
            "μ tokens of unit variance per channel). In domain: the held-out sentences of the built-in calibration "
            f"mix (never seen); out of domain: {args.ood!r} (written separately from the calibration text). Mean "
            "cosine of mean-pooled embeddings to the original model's.")
    write_markdown(folder / "mu.md", "μ study (paper: regularisation)", body, f"Total time {elapsed:.1f} s.")
    print(f"(total {elapsed:.1f} s)\nwrote {folder / 'mu.png'} and {folder / 'mu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
