"""``coala lora-init MODEL --out DIR``: initialise LoRA adapters from calibration context and save DIR/base +
DIR/adapter (loadable with transformers + peft alone)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from coala.cli._common import DefaultsHelpFormatter, add_threads_argument, set_threads
from coala.linalg.dtypes import DTYPES


def add_parser(sub) -> None:
    from ..adapters.ipm_kpm import MODES
    from ..adapters.registry import LORA_INITS

    p = sub.add_parser(
        "lora-init",
        help="initialise LoRA adapters (coala IPM/KPM, CorDA, PiSSA, MiLoRA) and save a residual base + adapter",
        description="Initialise peft LoRA adapters from calibration context and save DIR/base (residual base "
        "model) + DIR/adapter (initial adapter). At step 0 the pair computes what MODEL computes.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None,
                   help="a transformers model folder, hub id, .gguf file or smollm2 (default: the bundled "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2·rank)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/√r")
    p.add_argument("--targets", default=None,
                   help="comma-separated module names for peft's target_modules (default: peft's for the architecture)")
    p.add_argument("--method", default="coala", choices=sorted(LORA_INITS),
                   help="initialisation (default coala); the registered ones of coala.adapters.LORA_INITS")
    p.add_argument("--mode", default=None, choices=MODES, help="context-aware methods only (default ipm)")
    p.add_argument("--mu", type=float, default=0.0, help="regularisation μ of the coala solve (default 0)")
    p.add_argument("--calib", default="builtin",
                   help="'builtin' (offline: Python's docs + general-English prose), 'docs', 'prose', 'wikitext2', "
                        "'c4', or a .txt / .jsonl ('text') file")
    p.add_argument("--nsamples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: coala.data's)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--model-class", default="auto",
                   help="transformers class name, or 'auto' (config.architectures[0], else AutoModel)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu", help="where the model is loaded, e.g. cuda")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft import LoraConfig

    from ..adapters import init_lora, save_lora
    from ..adapters.registry import get_lora_init
    from ..data import calibration_batches
    from ..distributed_run import check_agreement, on_main
    from ..models import load_model

    set_threads(args.threads)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} exists and is not empty")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    context = get_lora_init(args.method).context
    if not context and args.mode is not None:
        raise ValueError(f"--mode applies to context-aware methods only, not to {args.method}")
    # --model-class auto means the class config.architectures names (with its head): load_model's "architecture"
    loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                        model_class="architecture" if args.model_class == "auto" else args.model_class)
    model, tokenizer, causal = loaded.model, loaded.tokenizer, loaded.causal
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
        use_rslora=args.rslora,
        target_modules=[t.strip() for t in args.targets.split(",")] if args.targets else None,
        task_type="CAUSAL_LM" if causal else None,
    )
    calib = calibration_batches(
        args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        mode="windows" if causal else "sentences", batch_size=args.batch_size,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )
    check_agreement(model, calib.batches, calib.description, (), args.device)  # every rank the same (torchrun)
    batches = calib.batches if context else None
    probe = {k: v[:2, :64].to(args.device) for k, v in calib.batches[0].items()}  # checks identity at init
    with torch.no_grad():
        before = _first_output(model(**probe))
    start = time.perf_counter()
    peft_model = init_lora(model, batches, config, mode=args.mode, method=args.method, mu=args.mu)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        change = float((_first_output(peft_model(**probe)) - before).abs().max())
    meta = {"model": args.model or loaded.source, **({"gguf": loaded.gguf} if loaded.gguf else {}),
            "calibration": calib.description if context else None,
            "init_seconds": round(seconds, 3), "max_output_change_at_init": change}
    on_main(lambda: save_lora(peft_model, out, tokenizer=tokenizer, meta=meta), "save the adapters")  # rank 0
    n_layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    print(f"{args.method}{'-' + (args.mode or 'ipm') if context else ''}: {n_layers} layers, rank {args.rank}, "
          f"{seconds:.1f} s; max |output change| at init {change:.3g} ({args.dtype})")
    print(f"saved {out}/base (residual base) and {out}/adapter; load with PeftModel.from_pretrained")
    return 0


def _first_output(output) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            return getattr(output, key).float()
    return output[0].float()
