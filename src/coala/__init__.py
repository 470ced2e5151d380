"""coala: context-aware low-rank approximation of neural networks (COALA, inversion-free and streaming)."""

from .allocate import ALLOCATIONS, register_allocation
from .compress import apply_low_rank, collect_statistics, compress, decompose_layers
from .config import CalibrationConfig, CompressConfig, OutputConfig, RuntimeConfig
from .errors import CoalaError, CoalaFileError, CoalaFileNotFoundError, CoalaTypeError
from .export import export_dense
from .io import load
from .linalg import (
    METHODS,
    ActivationStats,
    Decomposition,
    RFactor,
    approximate,
    decompose,
    truncation_loss,
)
from .version import __version__

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "ActivationStats",
    "CalibrationConfig",
    "CoalaError",
    "CoalaFileError",
    "CoalaFileNotFoundError",
    "CoalaTypeError",
    "CompressConfig",
    "Decomposition",
    "OutputConfig",
    "RFactor",
    "RuntimeConfig",
    "__version__",
    "apply_low_rank",
    "approximate",
    "collect_statistics",
    "compress",
    "decompose",
    "decompose_layers",
    "export_dense",
    "load",
    "register_allocation",
    "truncation_loss",
]


def __getattr__(name: str):
    """Lazy exports: ``coala.init_lora`` imports peft / transformers only when it is used."""
    if name == "init_lora":
        from .adapters import init_lora

        return init_lora
    raise AttributeError(f"module 'coala' has no attribute {name!r}")
