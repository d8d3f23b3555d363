"""fused_losses: fused single-pass loss kernels for PyTorch (CPU and CUDA), registered as torch operators.

- :func:`cost_sensitive_cross_entropy` / :class:`CostSensitiveCrossEntropyLoss`
- :func:`pearson_correlation_loss` / :class:`PearsonCorrelationLoss`,
  :func:`concordance_correlation_loss` / :class:`ConcordanceCorrelationLoss`: per-sequence correlation losses
- :func:`weighted_bce_with_logits` / :class:`WeightedBCEWithLogitsLoss` (pos_weight, focal, ASL; dense or
  sparse multi-label targets)
- :func:`bayes_decision`: the minimum-expected-cost class under a cost matrix (a decision rule, not a loss)

Keras 3 forms of the three losses (torch backend) are in :mod:`fused_losses.keras`, imported only on request.
"""

from . import reference
from .decision import bayes_decision
from .functional import (concordance_correlation_loss, cost_sensitive_cross_entropy, pearson_correlation_loss,
                         weighted_bce_with_logits)
from .modules import (ConcordanceCorrelationLoss, CostSensitiveCrossEntropyLoss, PearsonCorrelationLoss,
                      WeightedBCEWithLogitsLoss)

__all__ = [
    "cost_sensitive_cross_entropy",
    "CostSensitiveCrossEntropyLoss",
    "pearson_correlation_loss",
    "PearsonCorrelationLoss",
    "concordance_correlation_loss",
    "ConcordanceCorrelationLoss",
    "weighted_bce_with_logits",
    "WeightedBCEWithLogitsLoss",
    "bayes_decision",
    "reference",
]

__version__ = "0.1.0"
