"""Pure tensor maths: streaming R factors, the COALA solve, baselines. No nn.Module, no transformers."""

from .decomposition import Decomposition
from .methods import METHODS, approximate, decompose, get_method, truncation_loss
from .stats import AbsMeanAccumulator, ActivationStats, GramAccumulator
from .tsqr import RFactor, regularize

__all__ = [
    "METHODS",
    "AbsMeanAccumulator",
    "ActivationStats",
    "Decomposition",
    "GramAccumulator",
    "RFactor",
    "approximate",
    "decompose",
    "get_method",
    "regularize",
    "truncation_loss",
]
