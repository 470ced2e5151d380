"""Forward hooks that stream the inputs of linear layers into statistics.

Layers fed by the very same input tensor (q/k/v; gate/up; BERT's query/key/value) are detected on the first
forward pass and share one ``ActivationStats``: their inputs are captured once. Padding rows are excluded
through a (batch × seq) mask that the caller sets on ``capture.mask`` before each forward.

With ``correction`` α the statistics are of paired rows, twice as wide, for the error-correcting solve
(``coala.linalg.corrected``): the caller runs each batch twice, first on the original model's stream with
``recording`` set (each group's input x is kept, no statistics), then on the compressed stream, whose inputs x̃
of the same tokens are paired with it as [x̃, x̃ + α(x − x̃)].

With ``folds`` > 1 the rows are also kept in disjoint parts by calibration sample (the caller sets
``capture.row_folds``, the fold of every batch row, next to the mask): ``fold_parts()`` are the accumulators
(e.g. for a distributed reduction), and ``merge_folds()`` then makes each ``stats`` entry the exact merge of its
parts, holding them as ``ActivationStats.folds`` for fits on each fold (``coala.fisher``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .linalg.stats import ActivationStats
from .lowrank import is_conv1d


def linear_in_features(module: nn.Module) -> int:
    """Input width of an nn.Linear or a GPT-2 style Conv1D (weight stored in × out)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    raise TypeError(f"{type(module).__name__} is not a linear layer coala can capture")


class InputCapture:
    """Context manager: while active, every forward of ``root`` feeds the inputs of ``layers`` into stats.

    Args:
        root: the module whose forward passes are run (a transformer block, or a whole model).
        layers: name → linear module inside ``root``.
        kinds: statistics to collect ("r", "gram", "absmean").
        dtype: accumulation dtype of R / Gram (float32 or float64).
        device: where statistics live (default: each layer's weight device).
        folds: keep the rows of each input in this many disjoint parts by sample (1: one stream).

    After use: ``stats`` maps a group key (the first layer's name) to its ActivationStats, and
    ``group_of`` maps every layer name to its group key.
    """

    def __init__(
        self,
        root: nn.Module,
        layers: dict[str, nn.Module],
        kinds: Iterable[str] = ("r",),
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        folds: int = 1,
        correction: float | None = None,
    ) -> None:
        if folds < 1:
            raise ValueError(f"folds must be >= 1, got {folds}")
        self.root, self.layers, self.kinds = root, dict(layers), tuple(kinds)
        self.dtype, self.device, self.folds = dtype, device, folds
        self.mask: Tensor | None = None
        self.row_folds: Tensor | None = None  # (batch,) int: the fold of each sample of the next forward
        self.stats: dict[str, ActivationStats] = {}
        self._parts: dict[str, list[ActivationStats]] = {}
        self.group_of: dict[str, str] = {}
        self._seen: dict[int, tuple[Tensor, str]] = {}
        self._handles: list = []
        self.correction = correction  # paired statistics: rows [x̃, lerp(x̃, x, correction)]
        self.recording = False  # (with correction) this forward is the original stream's: keep its inputs x
        self._originals: dict[str, Tensor] = {}  # group → x of the last recording forward

    def __enter__(self) -> InputCapture:
        self._handles.append(self.root.register_forward_pre_hook(lambda *_: self._seen.clear()))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def _hook_for(self, name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:  # same tensor as an earlier layer: shared input
                self.group_of.setdefault(name, seen[1])
                return
            key = self.group_of.setdefault(name, name)
            self._seen[id(x)] = (x, key)
            if key != name:  # joined a group earlier, but got a distinct tensor now: inputs differ
                raise RuntimeError(f"layer {name} shared its input with {key} once but not now")
            if self.recording:
                self._originals[key] = x.detach()
                return
            if self.correction is not None:
                x = self._paired(x.detach(), key)
            if key not in self.stats:
                device = self.device if self.device is not None else module.weight.device
                width = linear_in_features(module) * (2 if self.correction is not None else 1)
                new = [ActivationStats(width, self.kinds, dtype=self.dtype, device=device, name=name)
                       for _ in range(self.folds)]
                self.stats[key], self._parts[key] = new[0], new
            mask = self._mask_for(x, name)
            if self.folds == 1:
                self.stats[key].update(x.detach(), mask)
                return
            fold = self._folds_for(x, name)
            for f, part in enumerate(self._parts[key]):
                part.update(x.detach(), fold == f if mask is None else mask.bool() & (fold == f))

        return hook

    def _paired(self, x: Tensor, key: str) -> Tensor:
        """[x̃, x̃ + α(x − x̃)] (..., 2n): this forward's input x̃ next to the target mix with the original input x
        of the same tokens (kept by the last ``recording`` forward, and dropped here: each is paired once)."""
        original = self._originals.pop(key, None)
        if original is None or original.shape != x.shape:
            raise RuntimeError(f"no original-stream input of shape {tuple(x.shape)} recorded for {key}")
        return torch.cat([x, torch.lerp(x, original.to(x), float(self.correction))], dim=-1)

    def _folds_for(self, x: Tensor, name: str) -> Tensor:
        """The fold of every row of x (its lead shape), from ``row_folds`` (one per sample of the batch)."""
        if self.row_folds is None:
            raise ValueError(f"capture with {self.folds} folds: set row_folds before the forward reaching {name}")
        lead = tuple(x.shape[:-1])
        per_row = self.row_folds.to(x.device)
        if len(lead) >= 1 and lead[0] == per_row.shape[0]:
            return per_row.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
        if x[..., 0].numel() % per_row.shape[0] == 0:  # (batch · seq) rows flattened
            return per_row.repeat_interleave(x[..., 0].numel() // per_row.shape[0]).reshape(lead)
        raise ValueError(f"row_folds of {per_row.shape[0]} samples do not fit the input of {name} of shape "
                         f"{tuple(x.shape)}")

    def fold_parts(self) -> list[ActivationStats]:
        """Every accumulator, in a fixed order: the folds' parts (with folds > 1) or the statistics themselves."""
        return [part for key in sorted(self._parts) for part in self._parts[key]]

    def merge_folds(self) -> None:
        """With folds > 1: each ``stats`` entry becomes the exact merge of its parts (``ActivationStats.of_folds``),
        which it keeps as ``.folds``. Call once, after the forwards (and after reducing ``fold_parts()``)."""
        if self.folds > 1:
            self.stats = {key: ActivationStats.of_folds(parts) for key, parts in self._parts.items()}

    def _mask_for(self, x: Tensor, name: str) -> Tensor | None:
        if self.mask is None:
            return None
        lead = tuple(x.shape[:-1])
        if tuple(self.mask.shape) == lead:
            return self.mask.to(x.device)
        if self.mask.numel() == x[..., 0].numel():
            return self.mask.reshape(lead).to(x.device)
        raise ValueError(
            f"padding mask of shape {tuple(self.mask.shape)} does not fit the input of {name} "
            f"of shape {tuple(x.shape)}"
        )

    def stats_for(self, layer_name: str) -> ActivationStats:
        """The statistics of ``layer_name``'s inputs (shared with its group)."""
        if layer_name not in self.group_of:
            raise KeyError(f"layer {layer_name} saw no input during capture (is it reached by forward?)")
        return self.stats[self.group_of[layer_name]]
