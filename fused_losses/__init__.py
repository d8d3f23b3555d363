"""fused_losses: fused single-pass loss kernels for PyTorch (CPU and CUDA), registered as torch operators.

- :func:`cost_sensitive_cross_entropy` / :class:`CostSensitiveCrossEntropyLoss`
- :func:`pearson_correlation_loss` / :class:`PearsonCorrelationLoss`,
  :func:`concordance_correlation_loss` / :class:`ConcordanceCorrelationLoss`: per-sequence correlation losses
"""

from . import reference
from .functional import concordance_correlation_loss, cost_sensitive_cross_entropy, pearson_correlation_loss
from .modules import ConcordanceCorrelationLoss, CostSensitiveCrossEntropyLoss, PearsonCorrelationLoss

__all__ = [
    "cost_sensitive_cross_entropy",
    "CostSensitiveCrossEntropyLoss",
    "pearson_correlation_loss",
    "PearsonCorrelationLoss",
    "concordance_correlation_loss",
    "ConcordanceCorrelationLoss",
    "reference",
]

__version__ = "0.1.0"
