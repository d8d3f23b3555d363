"""Pure-PyTorch reference implementations: the formulas users write by hand. The tests compare the fused
kernels against them, and the benchmark times them eagerly and under torch.compile."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cost_sensitive_cross_entropy"]


def _reduce(loss: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # As F.cross_entropy: NaN when nothing counts, with a zero (not NaN) gradient.
    counted = denominator != 0
    mean = loss.sum() / denominator.where(counted, torch.ones_like(denominator))
    return mean.where(counted, torch.full_like(mean, float("nan")))


def cost_sensitive_cross_entropy(input: Tensor, target: Tensor, cost_matrix: Optional[Tensor] = None,
                                 weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, cost_mode: str = "argmax") -> Tensor:
    """``cost[y, argmax(input)] * F.cross_entropy(..., reduction='none')`` reduced like F.cross_entropy."""
    ce = F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    valid = target != ignore_index
    safe_target = target.where(valid, 0)
    if cost_matrix is None:
        loss = ce
    elif cost_mode == "argmax":
        loss = cost_matrix[safe_target, input.argmax(1)].to(ce.dtype) * ce
    else:
        costs = cost_matrix[safe_target].movedim(-1, 1).to(input.dtype)  # (N, C, d...) rows of the true class
        loss = (input.softmax(1) * costs).sum(1) * ce
    class_weight = weight[safe_target] if weight is not None else torch.ones_like(ce)
    denominator = (class_weight * valid).sum()
    return _reduce(loss, reduction, denominator)
