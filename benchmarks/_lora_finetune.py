"""Part 2 of ``benchmarks/lora.py``: a short real LoRA fine-tune of the pretrained MiniLM (all-MiniLM-L6-v2) from
each initialisation, on Python's documentation (the built-in text ``docs``), with a plain training loop.

Task: adjacent-paragraph retrieval on ``docs_texts("train")`` — each paragraph's embedding (mean pooled,
normalised, as sentence-transformers does) must pick the next paragraph of the same document among the batch
(symmetric InfoNCE, temperature 0.05). 10 % of the pairs are held out for evaluation (loss, top-1 accuracy).
"Knowledge": the held-out pydoc pages (their paragraphs of 40–400 characters), never trained on, split in two: one half
is the KPM calibration context (what to preserve), the other half measures drift: mean (1 − cos) between
fine-tuned and original sentence embeddings, and the relative change of token states ‖H − H₀‖/‖H₀‖.
IPM inits are calibrated on task text. All methods see the same batches in the same order (fixed seeds).
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coala.adapters import init_lora, text_batches
from coala.adapters.peft_bridge import lora_layers
from coala.corpus import docs_texts, snippets

TEMPERATURE = 0.05


def paragraph_pairs(min_chars: int = 40, max_chars: int = 400) -> list[tuple[str, str]]:
    """Consecutive paragraphs of the same document of the docs train split."""
    pairs = []
    for doc in docs_texts("train"):
        paras = [" ".join(p.split()) for p in doc.split("\n\n")]
        paras = [p for p in paras if min_chars <= len(p) <= max_chars]
        pairs += list(itertools.pairwise(paras))
    return pairs


@dataclass
class Data:
    """Task pairs (train / held out), calibration texts (task, knowledge) and the knowledge texts for drift."""

    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    task_calib: list[str]
    knowledge_calib: list[str]
    knowledge_eval: list[str]


def make_data(n_calib: int, n_knowledge: int, seed: int = 0) -> Data:
    """Shuffled paragraph pairs (10 % held out, at least 32) and the two halves of the knowledge sentences."""
    pairs = paragraph_pairs()
    random.Random(seed).shuffle(pairs)
    n_hold = max(32, len(pairs) // 10)
    knowledge = snippets(docs_texts("test"), split_long=False)
    return Data(
        train=pairs[n_hold:],
        held_out=pairs[:n_hold],
        task_calib=[a for a, _ in pairs[n_hold : n_hold + n_calib]],
        knowledge_calib=knowledge[0::2][:n_calib],
        knowledge_eval=knowledge[1::2][:n_knowledge],
    )


def embed(model: nn.Module, enc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised mean-pooled sentence embeddings (B × d), token states (B × T × d)), float32."""
    h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1), h


def info_nce(model: nn.Module, tok: Any, pairs: list[tuple[str, str]],
             seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE loss and top-1 accuracy of a batch of (anchor, positive) pairs."""
    a = tok([p[0] for p in pairs], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    b = tok([p[1] for p in pairs], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    ea, _ = embed(model, a)
    eb, _ = embed(model, b)
    logits = ea @ eb.T / TEMPERATURE
    target = torch.arange(len(pairs))
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return loss, (logits.argmax(1) == target).float().mean()


@torch.no_grad()
def knowledge_states(model: nn.Module, tok: Any, texts: list[str], seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """(embeddings, token states, mask) per batch of 32 knowledge sentences."""
    out = []
    for s in range(0, len(texts), 32):
        enc = tok(texts[s : s + 32], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        e, h = embed(model, enc)
        out.append((e, h, enc["attention_mask"]))
    return out


def drift(now: list[tuple[torch.Tensor, ...]], ref: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """(mean 1 − cos of sentence embeddings, ‖H − H₀‖_F / ‖H₀‖_F over real tokens)."""
    cos, num, den, n = 0.0, 0.0, 0.0, 0
    for (e, h, m), (e0, h0, _) in zip(now, ref, strict=True):
        cos += float((1 - (e * e0).sum(-1)).sum())
        n += e.shape[0]
        mask = m.bool()
        num += float((h - h0)[mask].double().square().sum())
        den += float(h0[mask].double().square().sum())
    return cos / n, (num / den) ** 0.5


@torch.no_grad()
def held_out_eval(model: nn.Module, tok: Any, pairs: list[tuple[str, str]], seq_len: int) -> tuple[float, float]:
    """Mean InfoNCE loss and top-1 accuracy over the full batches of 32 held-out pairs."""
    losses, accs = [], []
    for s in range(0, len(pairs) - 31, 32):
        loss, acc = info_nce(model, tok, pairs[s : s + 32], seq_len)
        losses.append(float(loss))
        accs.append(float(acc))
    return sum(losses) / len(losses), sum(accs) / len(accs)


@dataclass
class RunResult:
    """One initialisation's timings, per-step training losses, held-out scores and knowledge drift."""

    name: str
    init_seconds: float
    train_seconds: float
    n_layers: int = 0
    losses: list[float] = field(default_factory=list)
    init_drift: float = 0.0
    held_loss: float = 0.0
    held_acc: float = 0.0
    cos_drift: float = 0.0
    state_drift: float = 0.0


SPECS = {  # name → (method, mode, calibration text: "task" | "knowledge" | None)
    "LoRA (B=0)": ("lora", None, None),
    "PiSSA": ("pissa", None, None),
    "MiLoRA": ("milora", None, None),
    "CorDA-IPM": ("corda", "ipm", "task"),
    "CorDA-KPM": ("corda", "kpm", "knowledge"),
    "coala-IPM": ("coala", "ipm", "task"),
    "coala-KPM": ("coala", "kpm", "knowledge"),
}


def run_one(name: str, base: nn.Module, tok: Any, data: Data, lora_config: Any, *, steps: int, batch: int, lr: float,
            seq_len: int, ref_states: list[tuple[torch.Tensor, ...]], seed: int = 0) -> RunResult:
    """Initialise with SPECS[name], train ``steps`` steps with AdamW, evaluate."""
    method, mode, calib_kind = SPECS[name]
    model = copy.deepcopy(base)
    calib = None
    if calib_kind is not None:
        texts = data.task_calib if calib_kind == "task" else data.knowledge_calib
        calib = text_batches(tok, texts, seq_len=seq_len, batch_size=16)
    torch.manual_seed(seed)  # plain LoRA draws A at random
    t0 = time.perf_counter()
    pm = init_lora(model, calib, lora_config, method=method, mode=mode, progress=False)
    init_s = time.perf_counter() - t0
    res = RunResult(name=name, init_seconds=init_s, train_seconds=0.0, n_layers=len(lora_layers(pm)))
    pm.eval()
    res.init_drift = drift(knowledge_states(pm, tok, data.knowledge_eval, seq_len), ref_states)[1]
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed).sample(range(len(data.train)), k=min(len(data.train), steps * batch))
    while len(order) < steps * batch:
        order += order[: steps * batch - len(order)]
    torch.manual_seed(seed)
    pm.train()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=name, leave=False):
        pairs = [data.train[i] for i in order[step * batch : (step + 1) * batch]]
        loss, _ = info_nce(pm, tok, pairs, seq_len)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        res.losses.append(float(loss.detach()))
    res.train_seconds = time.perf_counter() - t0
    pm.eval()
    res.held_loss, res.held_acc = held_out_eval(pm, tok, data.held_out, seq_len)
    res.cos_drift, res.state_drift = drift(knowledge_states(pm, tok, data.knowledge_eval, seq_len), ref_states)
    return res
