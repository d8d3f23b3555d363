"""fused_losses: fused single-pass loss kernels for PyTorch (CPU and CUDA), registered as torch operators.

- :func:`cost_sensitive_cross_entropy` / :class:`CostSensitiveCrossEntropyLoss`
- :func:`weighted_bce_with_logits` / :class:`WeightedBCEWithLogitsLoss` (pos_weight, focal, ASL; dense or
  sparse multi-label targets)
"""

from . import reference
from .functional import cost_sensitive_cross_entropy, weighted_bce_with_logits
from .modules import CostSensitiveCrossEntropyLoss, WeightedBCEWithLogitsLoss

__all__ = [
    "cost_sensitive_cross_entropy",
    "CostSensitiveCrossEntropyLoss",
    "weighted_bce_with_logits",
    "WeightedBCEWithLogitsLoss",
    "reference",
]

__version__ = "0.1.0"
