"""fused_losses: fused single-pass loss kernels for PyTorch (CPU and CUDA), registered as torch operators.

- :func:`cost_sensitive_cross_entropy` / :class:`CostSensitiveCrossEntropyLoss`
"""

from . import reference
from .functional import cost_sensitive_cross_entropy
from .modules import CostSensitiveCrossEntropyLoss

__all__ = [
    "cost_sensitive_cross_entropy",
    "CostSensitiveCrossEntropyLoss",
    "reference",
]

__version__ = "0.1.0"
