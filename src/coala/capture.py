"""Forward hooks that stream the inputs of linear layers into statistics.

Layers fed by the very same input tensor (q/k/v; gate/up; BERT's query/key/value) are detected on the first
forward pass and share one ``ActivationStats``: their inputs are captured once. Padding rows are excluded
through a (batch × seq) mask that the caller sets on ``capture.mask`` before each forward.
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
    ) -> None:
        self.root, self.layers, self.kinds = root, dict(layers), tuple(kinds)
        self.dtype, self.device = dtype, device
        self.mask: Tensor | None = None
        self.stats: dict[str, ActivationStats] = {}
        self.group_of: dict[str, str] = {}
        self._seen: dict[int, tuple[Tensor, str]] = {}
        self._handles: list = []

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
            if key not in self.stats:
                device = self.device if self.device is not None else module.weight.device
                self.stats[key] = ActivationStats(
                    linear_in_features(module), self.kinds, dtype=self.dtype, device=device, name=name
                )
            self.stats[key].update(x.detach(), self._mask_for(x, name))

        return hook

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
