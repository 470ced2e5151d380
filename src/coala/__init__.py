"""coala: context-aware low-rank approximation of neural networks (COALA, inversion-free and streaming)."""

from .linalg import (
    METHODS,
    ActivationStats,
    Decomposition,
    RFactor,
    approximate,
    decompose,
    truncation_loss,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ActivationStats",
    "Decomposition",
    "RFactor",
    "__version__",
    "approximate",
    "decompose",
    "truncation_loss",
]


def __getattr__(name: str):
    """Lazy exports: ``coala.init_lora`` imports peft / transformers only when it is used."""
    if name == "init_lora":
        from .adapters import init_lora

        return init_lora
    raise AttributeError(f"module 'coala' has no attribute {name!r}")
