"""Pure-PyTorch reference implementations: the formulas users write by hand. The tests compare the fused
kernels against them, and the benchmark times them eagerly and under torch.compile."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._sequences import as_sequence_batch

__all__ = ["cost_sensitive_cross_entropy", "pearson_correlation_loss", "concordance_correlation_loss",
           "dense_target_from_indices", "weighted_bce_with_logits"]


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


def _correlation_loss(kind: str, input: Tensor, target: Tensor, mask: Optional[Tensor], dim: int, reduction: str,
                      per_timestep: bool, eps: float, lengths: Optional[Tensor]) -> Tensor:
    """Two-pass masked moments in float32 (float64 for double), the loss formula, then the reduction."""
    batch = as_sequence_batch(input, target, mask, dim, lengths)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x, y = batch.input.to(acc), batch.target.to(acc)
    if not batch.has_channels:
        x, y = x.unsqueeze(-1), y.unsqueeze(-1)                              # (B, T, D)
    valid = torch.ones_like(x[..., :1], dtype=torch.bool) if batch.mask is None else batch.mask.unsqueeze(-1)
    n = valid.sum(1).to(acc).expand(x.shape[0], x.shape[2])                  # (B, D)
    safe_n = n.clamp_min(1).unsqueeze(1)
    mean_x = torch.where(valid, x, 0).sum(1, keepdim=True) / safe_n
    mean_y = torch.where(valid, y, 0).sum(1, keepdim=True) / safe_n
    dx, dy = torch.where(valid, x - mean_x, 0), torch.where(valid, y - mean_y, 0)
    cxx, cyy, cxy = (dx * dx).sum(1), (dy * dy).sum(1), (dx * dy).sum(1)   # centred sums, (B, D)
    if kind == "pearson":
        # eps inside each variance bounds the gradient (csrc/correlation_math.h); sqrt is differentiated only
        # where its argument is positive (a flat sequence with eps = 0 has scale 0, below).
        def safe_sqrt(v):
            return torch.where(v > 0, v, 1).sqrt().where(v > 0, 0)

        numerator, denominator = 1.0, safe_sqrt(cxx + n * eps) * safe_sqrt(cyy + n * eps)
    else:
        gap = (mean_x - mean_y).squeeze(1)
        numerator, denominator = 2.0, cxx + cyy + n * (gap * gap + eps)
    def user_channels(values: Tensor) -> Tensor:  # the operators' per-sequence / per-step shape
        return values if batch.has_channels else values.squeeze(-1)

    zero = denominator == 0
    scale = torch.where(zero, 0.0, numerator / torch.where(zero, 1.0, denominator))  # loss = 1 - scale * Cxy
    if per_timestep:
        steps = torch.where(valid, 1 - (scale * n).unsqueeze(1) * dx * dy, 0)
        if reduction == "none":
            return batch.restore_layout(user_channels(steps.to(input.dtype)), per_step=True)
        total = steps.sum()
        return (total if reduction == "sum" else total / n.sum()).to(input.dtype)
    loss = 1 - scale * cxy
    if reduction == "none":
        return batch.restore_layout(user_channels(loss.to(input.dtype)), per_step=False)
    return (loss.sum() if reduction == "sum" else loss.mean()).to(input.dtype)


def pearson_correlation_loss(input: Tensor, target: Tensor, mask: Optional[Tensor] = None, dim: int = 1,
                             reduction: str = "mean", per_timestep: bool = False, eps: float = 1e-8,
                             lengths: Optional[Tensor] = None) -> Tensor:
    """``1 - cov / sqrt((var_x + eps)(var_y + eps))`` per sequence (eps inside each variance: a bounded
    gradient, also at a flat sequence)."""
    return _correlation_loss("pearson", input, target, mask, dim, reduction, per_timestep, eps, lengths)


def concordance_correlation_loss(input: Tensor, target: Tensor, mask: Optional[Tensor] = None, dim: int = 1,
                                 reduction: str = "mean", per_timestep: bool = False, eps: float = 1e-8,
                                 lengths: Optional[Tensor] = None) -> Tensor:
    """``1 - 2 cov / (var_x + var_y + (mean_x - mean_y)^2 + eps)`` per sequence."""
    return _correlation_loss("concordance", input, target, mask, dim, reduction, per_timestep, eps, lengths)


# ----------------------------------------------------------------------------- weighted / focal / ASL BCE


def dense_target_from_indices(positive_indices: Tensor, num_labels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, L) 0/1 matrix of (N, K) label indices padded with -1 (a label listed twice is set once)."""
    rows = positive_indices.shape[0]
    # Out of place: under vmap (per-sample gradients through the differentiable backward) the indices are
    # batched and the zeros are not, which an in-place scatter_ refuses.
    zeros = torch.zeros(rows, num_labels + 1, dtype=dtype, device=positive_indices.device)
    dense = zeros.scatter(1, positive_indices.where(positive_indices >= 0, num_labels), 1)  # padding -> extra column
    # Contiguous, as a user's target is: the view without the extra column has padded rows, which the fused
    # kernels read through their strided path (a benchmark once measured that path instead of the flat one).
    return dense[:, :num_labels].contiguous()


def _power_from_log(log_base: Tensor, gamma: float) -> Tensor:
    """base ** gamma from log(base), with 0 ** 0 = 1."""
    return torch.exp(gamma * log_base) if gamma != 0 else torch.ones_like(log_base)


def weighted_bce_with_logits(input: Tensor, target: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                             pos_weight: Optional[Tensor] = None, reduction: str = "mean", *,
                             positive_indices: Optional[Tensor] = None, gamma_pos: float = 0.0, gamma_neg: float = 0.0,
                             clip: float = 0.0) -> Tensor:
    """``F.binary_cross_entropy_with_logits`` without focusing; otherwise the focal / ASL terms written out
    from log-sigmoid (stable for large logits), in the input's dtype. Sparse targets are densified."""
    if positive_indices is not None:
        target = dense_target_from_indices(positive_indices, input.shape[-1], input.dtype)
    target = target.to(input.dtype)
    if gamma_pos == 0 and gamma_neg == 0 and clip == 0:
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)
    log_p, log_one_minus_p = F.logsigmoid(input), F.logsigmoid(-input)
    positive = -log_p * _power_from_log(log_one_minus_p, gamma_pos)
    if clip == 0:
        negative = -log_one_minus_p * _power_from_log(log_p, gamma_neg)
    else:
        shifted = (torch.sigmoid(input) - clip).clamp(min=0)
        active = shifted > 0
        safe_shifted = shifted.where(active, 1)  # keeps log() and its gradient finite where it is masked out
        negative = torch.where(active, -torch.log1p(-shifted) * _power_from_log(safe_shifted.log(), gamma_neg), 0)
    if pos_weight is not None:
        positive = positive * pos_weight
    loss = target * positive + (1 - target) * negative
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, torch.tensor(loss.numel(), dtype=loss.dtype, device=loss.device))
