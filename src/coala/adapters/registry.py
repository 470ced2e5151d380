"""The registry of LoRA initialisations (as peft's ``register_peft_method``): each method module registers a
builder, ``init_lora`` and ``coala lora-init --method`` read the names from here.

A builder is ``build(model, calibration, lora_config, *, mode, mu, stats_dtype, solve_dtype, progress)``
returning a ``peft.PeftModel`` (keyword arguments a method does not use are ignored); ``context`` says whether
it needs calibration batches, ``modes`` which ``mode`` values it accepts (none: ``mode`` must be None), and
``uses_mu`` whether it takes the regularisation μ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraInit:
    """A registered LoRA initialisation method."""

    name: str
    build: Callable
    context: bool = False
    modes: tuple[str, ...] = ()
    uses_mu: bool = False


LORA_INITS: dict[str, LoraInit] = {}


def register_lora_init(name: str, *, context: bool = False, modes: tuple[str, ...] = (),
                       uses_mu: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering ``build`` under ``name`` (see the module docstring)."""

    def register(build: Callable) -> Callable:
        if name in LORA_INITS:
            raise ValueError(f"LoRA initialisation {name!r} is already registered")
        LORA_INITS[name] = LoraInit(name, build, context, tuple(modes), uses_mu)
        return build

    return register


def get_lora_init(name: str) -> LoraInit:
    if name not in LORA_INITS:
        raise ValueError(f"method must be one of {sorted(LORA_INITS)}, got {name!r}")
    return LORA_INITS[name]
