"""``coala finetune DIR --out OUT``: LoRA recovery fine-tuning of a compressed model (LoRA on the low-rank factors,
merged back into them), saved in the compressed format (reloadable with ``coala.load``)."""

from __future__ import annotations

import argparse
import math
import time

from coala.cli._common import DefaultsHelpFormatter, add_threads_argument, set_threads

_OBJECTIVES = ("auto", "lm", "distill")
_WINDOW = 10  # training-loss means over the first / last this many steps
_LABELS = {"held_out_loss": "held-out loss", "held_out_ppl": "held-out perplexity",
           "embedding_cosine": "held-out embedding cosine vs the teacher"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="recovery fine-tuning of a compressed model: LoRA on its low-rank factors, merged back",
        description="Train LoRA adapters on the down/up factors of every low-rank layer of a compressed model "
        "(written by `coala compress`), merge them into the factors (ranks unchanged) and save the result "
        "in the compressed format. Objective: next-token loss for causal LMs, distillation of the original "
        "model's hidden states for encoders.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("dir", help="compressed model folder (with coala.json)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--data", default="builtin",
                   help="training text: 'builtin' (offline), 'wikitext2', 'c4', or a .txt / .jsonl file")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters on each factor")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2·rank)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--objective", default="auto", choices=_OBJECTIVES,
                   help="auto: 'lm' for causal LMs, 'distill' (needs the original model) otherwise")
    p.add_argument("--teacher", default=None,
                   help="original model for 'distill' (default: the base_model recorded in coala.json)")
    p.add_argument("--nsamples", type=int, default=256, help="training samples drawn from --data")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per training sample")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--eval-samples", type=int, default=64,
                   help="held-out samples (builtin test split) scored before and after; 0 to skip")
    p.add_argument("--seed", type=int, default=0, help="sampling and LoRA initialisation seed")
    p.add_argument("--device", default="cpu", help="where the model trains, e.g. cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _evaluate(model, tokenizer, eval_batches, eval_texts, objective: str, teacher) -> dict:
    from ..evaluate import embedding_fidelity
    from ..finetune import mean_loss

    if not eval_batches:
        return {}
    loss = mean_loss(model, eval_batches, objective, teacher)
    out = {"held_out_loss": loss}
    if objective == "lm":
        out["held_out_ppl"] = math.exp(loss)
    else:
        out["embedding_cosine"] = embedding_fidelity(model, teacher, tokenizer, eval_texts).mean_cosine
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data import builtin_sentences, builtin_texts, calibration_batches
    from ..finetune import FinetuneConfig, finetune
    from ..io import META_FILE, RESERVED_META_KEYS, read_meta, save_compressed
    from ..models import load_model

    set_threads(args.threads)
    if not (Path(args.dir) / META_FILE).is_file():
        raise FileNotFoundError(f"{args.dir} is not a compressed model folder (no {META_FILE})")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"output folder {out} exists and is not empty (pass --overwrite)")
    loaded = load_model(args.dir, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    objective = args.objective if args.objective != "auto" else ("lm" if loaded.causal else "distill")
    config = FinetuneConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, steps=args.steps, lr=args.lr,
                            objective=objective, seed=args.seed).validate()
    teacher = None
    if objective == "distill":
        source = args.teacher or loaded.base_model
        if not source:
            raise ValueError("objective 'distill' needs the original model: pass --teacher MODEL")
        teacher = load_model(source, device=args.device).model
    mode = "windows" if objective == "lm" else "sentences"
    max_pos = getattr(model.config, "max_position_embeddings", None)
    train = calibration_batches(args.data, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                mode=mode, batch_size=args.batch_size, max_positions=max_pos)
    eval_texts = builtin_sentences("test")[: args.eval_samples]
    eval_batches = []
    if args.eval_samples > 0:
        eval_batches = calibration_batches(builtin_texts("test"), tokenizer, nsamples=args.eval_samples,
                                           seqlen=args.seqlen, seed=args.seed + 1, mode=mode,
                                           batch_size=args.batch_size, max_positions=max_pos).batches
    before = _evaluate(model, tokenizer, eval_batches, eval_texts, objective, teacher)
    start = time.perf_counter()
    model = finetune(model, train.batches, config, teacher=teacher)
    seconds = time.perf_counter() - start
    after = _evaluate(model, tokenizer, eval_batches, eval_texts, objective, teacher)
    meta = {k: v for k, v in read_meta(args.dir).items() if k not in RESERVED_META_KEYS}
    first, last = _mean(config.history[:_WINDOW]), _mean(config.history[-_WINDOW:])
    meta["recovery"] = {"config": config.to_dict(), "data": train.description, "seconds": round(seconds, 1),
                        "loss_first": config.history[0], "loss_first10": first, "loss_last10": last,
                        "before": before, "after": after, "source": str(args.dir)}
    save_compressed(model, out, meta=meta, tokenizer=tokenizer, overwrite=args.overwrite)
    window = min(_WINDOW, len(config.history))
    print(f"recovery ({objective}): {config.steps} steps in {seconds:.1f} s; training loss, mean of the first "
          f"{window} steps -> mean of the last {window}: {first:.4f} -> {last:.4f}")
    for key in before:
        print(f"  {_LABELS.get(key, key)}: {before[key]:.5g} -> {after[key]:.5g}")
    print(f"saved {out} (coala.load reloads it)")
    return 0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)
