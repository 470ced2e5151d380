"""The low-rank linear layer and helpers to find and swap linear layers inside a model (``is_linear``,
``is_conv1d``, ``model_device``, ...).

``LowRankLinear`` computes y = (x Bᵀ) Aᵀ + bias, i.e. in_features → rank → out_features, with
A ∈ ℝ^{out×rank} and B ∈ ℝ^{rank×in}. It holds two ``nn.Linear`` submodules so that the state-dict keys are
stable and peft can put LoRA adapters on the factors (``target_modules=["down", "up"]``):

    down.weight  (rank × in)   = B
    up.weight    (out × rank)  = A
    up.bias      (out,)        only when the layer has a bias

A layer kept at rank r stores r·(in + out) weights instead of in·out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def low_rank_params(m: int, n: int, r: int) -> int:
    """Number of weights of a rank-r factorisation of an m × n matrix: r·(m + n) (bias not counted)."""
    return r * (m + n)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``transformers.pytorch_utils.Conv1D`` (weight stored in × out), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), Tensor
    )




def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2's ``Conv1D``: the layers coala can factorise."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def model_device(model: nn.Module) -> torch.device:
    """Device of the module's first parameter (the CPU for a module without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class LowRankLinear(nn.Module):
    """y = up(down(x)) = (x Bᵀ) Aᵀ + bias: a linear map in_features → rank → out_features.

    Args:
        in_features, out_features: the shape of the dense layer it replaces (W is out × in).
        rank: inner width r ≥ 1.
        bias: whether ``up`` carries a bias of shape (out_features,).
        dtype, device: of the parameters (default: torch defaults).

    Input (..., in_features) → output (..., out_features), in the parameters' dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LowRankLinear: {arg} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"LowRankLinear: {arg} must be >= 1, got {value}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(
        cls, A: Tensor, B: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        """Build the layer holding copies of A (out × rank), B (rank × in) and bias (out,) or None.

        The parameters live on A's device, in ``dtype`` (default: A's dtype; A and B must then share it).
        """
        for arg, t in (("A", A), ("B", B)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim != 2:
                raise TypeError(f"LowRankLinear.from_factors: {arg} must be a 2-D floating tensor")
        if A.shape[1] != B.shape[0]:
            raise ValueError(
                f"LowRankLinear.from_factors: A is {tuple(A.shape)} (out × rank) and B is {tuple(B.shape)} "
                "(rank × in): their ranks differ"
            )
        if dtype is None and A.dtype != B.dtype:
            raise TypeError(f"LowRankLinear.from_factors: A is {A.dtype} and B is {B.dtype}; pass dtype=")
        out_features, rank = A.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_features,)):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"LowRankLinear.from_factors: bias must have shape ({out_features},), got {shape}")
        dtype = dtype or A.dtype
        layer = cls(B.shape[1], out_features, rank, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            layer.up.weight.copy_(A)
            layer.down.weight.copy_(B)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def bias(self) -> Tensor | None:
        """The output bias (out,), or None."""
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def to_dense_weight(self) -> Tensor:
        """A @ B: the dense (out × in) weight this layer applies, in the parameters' dtype."""
        return self.up.weight @ self.down.weight

    def num_weights(self) -> int:
        """rank·(in + out): the number of factor weights (bias excluded)."""
        return low_rank_params(self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


def dense_weight(module: nn.Module) -> Tensor:
    """The weight W as (out × in) for nn.Linear, GPT-2's Conv1D (a transposed view) or LowRankLinear (A @ B).

    The result may share memory with the module: do not modify it in place.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    if isinstance(module, LowRankLinear):
        return module.to_dense_weight()
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear, Conv1D or LowRankLinear)")


def dense_bias(module: nn.Module) -> Tensor | None:
    """The bias (out,) of an nn.Linear, Conv1D or LowRankLinear, or None."""
    if is_linear(module) or isinstance(module, LowRankLinear):
        return module.bias
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear, Conv1D or LowRankLinear)")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear, Conv1D or LowRankLinear."""
    if isinstance(module, LowRankLinear):
        return module.out_features, module.in_features
    W = dense_weight(module)
    return int(W.shape[0]), int(W.shape[1])


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. "model.layers.0.self_attn.q_proj") by ``new``."""
    if not isinstance(new, nn.Module):
        raise TypeError(f"replace_module: new must be an nn.Module, got {type(new).__name__}")
    if not name:
        raise ValueError("replace_module: name must be a non-empty dotted module path")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError as e:
        raise ValueError(f"replace_module: no submodule {parent_name!r} in {type(root).__name__}") from e
    if child not in parent._modules:
        raise ValueError(f"replace_module: {type(parent).__name__} at {parent_name or '<root>'!r} has no child "
                         f"module {child!r}")
    setattr(parent, child, new)


def install_low_rank(root: nn.Module, name: str, A: Tensor, B: Tensor, bias: Tensor | None = None) -> LowRankLinear:
    """Replace the linear layer at dotted path ``name`` by a ``LowRankLinear`` computing x (AB)ᵀ + bias, with A
    (out × rank) and B (rank × in) cast to the replaced layer's dtype and placed on its device. Returns the new
    layer. The one place where coala builds and swaps in a low-rank layer."""
    W = dense_weight(root.get_submodule(name))
    new = LowRankLinear.from_factors(A.to(W.dtype), B.to(W.dtype), None if bias is None else bias.detach(),
                                     dtype=W.dtype)
    new = new.to(W.device)
    replace_module(root, name, new)
    return new


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.device != b.device or a.shape != b.shape or a.is_meta or b.is_meta:
        return False
    return a.data_ptr() == b.data_ptr()


def _excluded_heads(root: nn.Module) -> set[int]:
    """ids of the output head modules: lm_head, the output embeddings, and layers tied to an input embedding."""
    excluded: set[int] = set()
    get_out = getattr(root, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            excluded.add(id(head))
    tied_to: list[Tensor] = []
    get_in = getattr(root, "get_input_embeddings", None)
    if callable(get_in):
        try:
            emb = get_in()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(getattr(emb, "weight", None), Tensor):
            tied_to.append(emb.weight)
    for name, module in root.named_modules():
        if not is_linear(module):
            continue
        if name == "lm_head" or name.endswith(".lm_head"):
            excluded.add(id(module))
        elif any(_same_tensor(module.weight, w) for w in tied_to):
            excluded.add(id(module))
    return excluded


def _all_linear(root: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D under root, skipping the factors inside LowRankLinear modules."""
    found: dict[str, nn.Module] = {}
    inside_low_rank: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p + ".") for p in inside_low_rank):
            continue
        if isinstance(module, LowRankLinear):
            inside_low_rank.append(name)
        elif is_linear(module) and name:
            found[name] = module
    return found


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_linear_layers(root: nn.Module, targets: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The nn.Linear / Conv1D submodules of ``root`` to compress, by dotted name (in module order).

    Args:
        root: a model or a block.
        targets: names to match against the end of each dotted module name, on component boundaries
            ("q_proj" matches "model.layers.0.self_attn.q_proj"; "attn.c_attn" matches "h.3.attn.c_attn").
            None: every linear layer except the output head (``lm_head``, the model's output embeddings and
            any layer whose weight is tied to the input embedding). Factors inside an existing
            LowRankLinear are never returned.

    Raises:
        TypeError: targets is a bare string.
        ValueError: a target matches no layer (the message lists the available names), or it matches an
            output layer tied to the input embedding (compressing it would untie the weights).
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of names, not the string {targets!r} (write [{targets!r}])")
    linear = _all_linear(root)
    excluded = _excluded_heads(root)
    if targets is None:
        return {name: m for name, m in linear.items() if id(m) not in excluded}
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: pass None to target every linear layer, or a list of names")
    chosen: dict[str, nn.Module] = {}
    for target in targets:
        if not isinstance(target, str) or not target:
            raise TypeError(f"every target must be a non-empty string, got {target!r}")
        hits = {name: m for name, m in linear.items() if _matches(name, target)}
        if not hits:
            available = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ValueError(
                f"target {target!r} matches no linear layer of {type(root).__name__}; available layer names: "
                f"{', '.join(available) if available else '(none)'}"
            )
        tied = [name for name, m in hits.items() if id(m) in excluded and _tied_to_input(root, m)]
        if tied:
            raise ValueError(
                f"target {target!r} matches {tied[0]}, whose weight is tied to the input embedding; "
                "compressing it would untie them"
            )
        chosen.update(hits)
    return {name: m for name, m in linear.items() if name in chosen}


def _tied_to_input(root: nn.Module, module: nn.Module) -> bool:
    get_in = getattr(root, "get_input_embeddings", None)
    if not callable(get_in):
        return False
    try:
        emb = get_in()
    except (NotImplementedError, AttributeError):
        return False
    w = getattr(emb, "weight", None)
    return isinstance(w, Tensor) and _same_tensor(module.weight, w)


def low_rank_layers(root: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear under root, by dotted name."""
    return {name: m for name, m in root.named_modules() if isinstance(m, LowRankLinear)}
