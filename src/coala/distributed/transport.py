"""Moving JSON values and named tensors between ranks, and checking that all ranks agree (docs/design.md §12)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .session import DistributedError, comm_device, global_rank, is_distributed, phase, rank, world_size


def _bytes_tensor(data: bytes, dev: torch.device) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)


def broadcast_json(obj: Any, src: int = 0, *, what: str = "broadcast", group=None) -> Any:
    """``obj`` (JSON-serialisable, given on rank ``src``) as every rank reads it back from JSON."""
    if not is_distributed(group):
        return json.loads(json.dumps(obj))
    dev = comm_device(group)
    with phase(what, group):
        data = json.dumps(obj).encode() if rank(group) == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(size, global_rank(group, src), group=group)
        buf = _bytes_tensor(data, dev) if rank(group) == src else torch.empty(int(size), dtype=torch.uint8, device=dev)
        dist.broadcast(buf, global_rank(group, src), group=group)
    return json.loads(bytes(buf.cpu().numpy()).decode())


def gather_json(obj: Any, *, what: str = "gather", group=None) -> list[Any]:
    """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank."""
    if not is_distributed(group):
        return [json.loads(json.dumps(obj))]
    dev, n = comm_device(group), world_size(group)
    data = json.dumps(obj).encode()
    with phase(what, group):
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=dev), group=group)
        width = max(int(s) for s in sizes)
        mine = torch.zeros(width, dtype=torch.uint8, device=dev)
        mine[: len(data)] = _bytes_tensor(data, dev)
        bufs = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in range(n)]
        dist.all_gather(bufs, mine, group=group)
    return [json.loads(bytes(b[: int(s)].cpu().numpy()).decode()) for b, s in zip(bufs, sizes, strict=True)]


def broadcast_tensors(tensors: Mapping[str, Tensor] | None, src: int = 0, *, device: torch.device | str | None = None,
                      what: str = "broadcast tensors", group=None) -> dict[str, Tensor]:
    """Rank ``src``'s named tensors (any dtypes) on every rank, sent as one byte buffer; received ones land on
    ``device`` (default: the CPU), ``src`` gets its own dict back."""
    if not is_distributed(group):
        return dict(tensors or {})
    mine = rank(group) == src
    header = ([[k, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size()]
               for k, t in tensors.items()] if mine else None)
    header = broadcast_json(header, src, what=what, group=group)
    total = sum(size for *_, size in header)
    if total == 0:
        return dict(tensors) if mine else {k: torch.empty(shape, dtype=getattr(torch, d)) for k, d, shape, _ in header}
    dev = comm_device(group)
    with phase(what, group):
        if mine:
            flat = torch.cat([t.detach().to(dev).contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()])
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=dev)
        dist.broadcast(flat, global_rank(group, src), group=group)
    if mine:
        return dict(tensors)
    out, offset = {}, 0
    for k, d, shape, size in header:  # a copy per tensor: its own aligned storage, on ``device``
        chunk = flat[offset : offset + size].to(device or "cpu", copy=True)
        out[k] = chunk.view(getattr(torch, d)).reshape(shape)
        offset += size
    return out


# ---------------------------------------------------------------------------------------------- agreement
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same(payload: Mapping[str, Any], what: str, *, group=None) -> None:
    """Raise a ``DistributedError`` on every rank unless all ranks hold the same ``payload`` (hashed per key,
    JSON with ``str`` for other values); the message names the ranks and keys that differ from rank 0."""
    if not is_distributed(group):
        return
    digests = gather_json({k: _digest(v) for k, v in payload.items()}, what=f"check {what}", group=group)
    bad = {}
    for r, theirs in enumerate(digests[1:], start=1):
        keys = sorted(k for k in set(theirs) | set(digests[0]) if theirs.get(k) != digests[0].get(k))
        if keys:
            bad[r] = keys
    if bad:
        detail = "; ".join(f"rank {r} differs from rank 0 in {', '.join(keys)}" for r, keys in bad.items())
        raise DistributedError(f"the ranks disagree on {what}: {detail}. Every rank must load the same model "
                               "and run the same command", ranks=bad, shared=True)

