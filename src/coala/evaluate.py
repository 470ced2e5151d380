"""Evaluation with the protocols papers use (docs/design.md §8): perplexity, lm-eval zero-shot tasks, and
embedding fidelity for encoders.

- ``perplexity``: join documents with "\\n\\n", tokenize once, cut non-overlapping windows of ``seqlen`` tokens,
  drop the remainder, ppl = exp(mean token NLL). Logits are taken in the model's dtype, the log-softmax and the
  NLL sum in float32 and the mean over all windows in float64. A non-finite window loss is an error naming it.
- ``lm_eval_tasks``: ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapped around the (possibly compressed) model,
  zero-shot; the headline metric per task is acc_norm or acc as in the papers (``TASK_METRICS``).
- ``embedding_fidelity``: cosine similarity of mean-pooled sentence embeddings of a model against a reference
  model on the same text (mean and 5th percentile), embeddings in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .lowrank import model_device

# Headline metric per zero-shot task: acc_norm where length normalisation is the papers' choice.
TASK_METRICS: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "boolq": "acc",
    "winogrande": "acc",
    "mmlu": "acc",
}


@dataclass
class PerplexityResult:
    source: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    dtype: str
    seconds: float = 0.0  # wall time of the forward passes and losses
    tokens_per_s: float = 0.0  # window tokens scored per second (windows · seqlen / seconds)
    batch_size: int = 1  # windows per forward pass

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PerplexityWindows:
    """The windows of one text source, tokenized and cut once: ``ids`` (windows × seqlen, int64, CPU). One object
    serves every model scored on the same text (``coala compare`` scores each of its models on the same windows)."""

    ids: Tensor
    source: str

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])

    @property
    def windows(self) -> int:
        return int(self.ids.shape[0])


def _token_stream(tokenizer, texts: Sequence[str]) -> Tensor:
    """All texts joined with "\n\n" and tokenized once: (1, T) int64."""
    joined = "\n\n".join(texts)
    enc = tokenizer(joined, return_tensors="pt", add_special_tokens=False, verbose=False)
    return enc["input_ids"]


def perplexity_windows(tokenizer, texts: Sequence[str], seqlen: int, source: str = "text") -> PerplexityWindows:
    """Join ``texts`` with "\\n\\n", tokenize once, cut ⌊T/seqlen⌋ non-overlapping windows (remainder dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    ids = _token_stream(tokenizer, texts)
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise ValueError(f"{source}: {ids.shape[1]} tokens are fewer than one window of seqlen={seqlen}")
    return PerplexityWindows(ids[0, : windows * seqlen].reshape(windows, seqlen).clone(), source)


LOGITS_BYTES_CPU = 512 * 2**20  # float32 logits held at once on the CPU by the automatic perplexity batch


def auto_batch_size(model: nn.Module, seqlen: int) -> int:
    """Windows per forward for ``perplexity``: as many as keep the float32 logits (batch × seqlen × vocab) within
    512 MiB on the CPU, or within a quarter of the free memory on a CUDA device (at least 1, at most 64).

    On the CPU one window of a few hundred tokens already keeps every core busy, so larger batches gain little;
    the budget bounds the memory. On a GPU, throughput grows with the batch until the memory is used.
    """
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = model_device(model)
    budget = LOGITS_BYTES_CPU
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    return max(1, min(64, budget // (4 * vocab * seqlen)))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | PerplexityWindows,
    *,
    seqlen: int = 2048,
    batch_size: int | None = None,
    source: str = "text",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``texts`` (GPTQ / SVD-LLM protocol). Returns ppl, mean NLL, counts and speed.

    ``texts``: documents, or ``PerplexityWindows`` cut before (then ``seqlen`` and ``source`` are theirs).
    ``batch_size``: windows per forward (None: ``auto_batch_size``); it does not change the result beyond rounding.
    KV caches are off.
    """
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no language-model head: perplexity needs a causal LM")
    if not isinstance(texts, PerplexityWindows):
        texts = perplexity_windows(tokenizer, texts, seqlen, source)
    ids, seqlen, source, windows = texts.ids, texts.seqlen, texts.source, texts.windows
    if batch_size is None:
        batch_size = auto_batch_size(model, seqlen)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    starts = range(0, windows, batch_size)
    t0 = time.perf_counter()
    for start in tqdm(starts, desc=f"ppl {source}", disable=not progress, unit="batch"):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        targets = torch.full_like(batch, -100)  # the last position predicts nothing: ignored, no sliced copy
        targets[:, :-1] = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
        per_window = nll.reshape(batch.shape[0], -1).sum(1)
        del logits
        bad = ~torch.isfinite(per_window)
        if bad.any():
            w = start + int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"{source}: non-finite loss in window {w} (tokens {w * seqlen}..{(w + 1) * seqlen - 1}); "
                "the model produced NaN/Inf logits there"
            )
        total += per_window.double().sum().cpu()
        count += batch.shape[0] * (seqlen - 1)
    seconds = time.perf_counter() - t0
    mean_nll = float(total / count)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return PerplexityResult(source, math.exp(mean_nll), mean_nll, count, windows, seqlen, dtype, seconds,
                            windows * seqlen / seconds if seconds > 0 else float("inf"), batch_size)


def lm_eval_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval results per task: {task: {"metric": name, "value": x, "stderr": s}}.

    ``include_path``: a folder of extra task YAML files (e.g. local task definitions). Needs the ``eval`` extra.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("lm-eval is not installed: pip install 'coala[eval]'") from err
    device = model_device(model)
    # Tokenizers without BOS/EOS (BERT-style) need an explicit prefix token for loglikelihood requests.
    prefix = None
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        prefix = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.pad_token_id
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), prefix_token_id=prefix)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
        log_samples=False, bootstrap_iters=0,
    )
    results = {}
    for task, metrics in out["results"].items():
        name = TASK_METRICS.get(task, "acc_norm" if "acc_norm,none" in metrics else "acc")
        if f"{name},none" not in metrics:
            name = next(k.split(",")[0] for k in metrics if k.endswith(",none") and "stderr" not in k)
        stderr = metrics.get(f"{name}_stderr,none")
        results[task] = {
            "metric": name,
            "value": float(metrics[f"{name},none"]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else float("nan"),
        }
    return results


def last_hidden_states(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The last hidden states (batch × seq × dim) of an encoder with or without a head, from one forward of
    ``batch`` through its body, ``model.base_model`` (transformers' model without its head: BertForMaskedLM's
    ``bert``; a bare BertModel is its own), so that no head (e.g. a masked-LM vocabulary projection) runs."""
    body = getattr(model, "base_model", model)
    hidden = getattr(body(**batch), "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{type(body).__name__} (the body of {type(model).__name__}) returns no last_hidden_state: "
                         "it gives no sentence embeddings")
    return hidden


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (batch × seq × dim) over real tokens (mask 1): (batch × dim) in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 256
) -> Tensor:
    """Mean-pooled last hidden states over real tokens: (len(texts) × hidden), float32, on the CPU."""
    device = model_device(model)
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        ).to(device)
        out.append(mean_pool(last_hidden_states(model, enc), enc["attention_mask"]).cpu())
    return torch.cat(out)


@dataclass
class FidelityResult:
    mean_cosine: float
    p05_cosine: float
    min_cosine: float
    sentences: int

    def to_dict(self) -> dict:
        return asdict(self)


def embedding_fidelity(
    model: nn.Module,
    reference: nn.Module | Tensor,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> FidelityResult:
    """Cosine similarity of ``model``'s mean-pooled embeddings to ``reference``'s (a model or its embeddings)."""
    if not texts:
        raise ValueError("embedding fidelity needs at least one sentence")
    ours = sentence_embeddings(model, tokenizer, texts, batch_size=batch_size)
    ref = reference if isinstance(reference, Tensor) else sentence_embeddings(
        reference, tokenizer, texts, batch_size=batch_size
    )
    if ref.shape != ours.shape:
        raise ValueError(f"reference embeddings have shape {tuple(ref.shape)}, model's {tuple(ours.shape)}")
    cos = F.cosine_similarity(ours, ref, dim=-1)
    if not torch.isfinite(cos).all():
        raise FloatingPointError(f"{int((~torch.isfinite(cos)).sum())} sentence embeddings are not finite")
    return FidelityResult(
        float(cos.mean()), float(torch.quantile(cos, 0.05)), float(cos.min()), int(cos.numel())
    )
