"""Functional API of fused_losses: each function validates its arguments, calls the fused operator and
returns the loss. Arguments follow ``torch.nn.functional`` (order, names, ``reduction``)."""

from typing import Optional

import torch
from torch import Tensor

from . import _registrations  # noqa: F401  (operators, fake kernels, autograd)
from ._validation import REDUCTIONS, check_choice, check_cost_matrix_values, check_no_grad, check_tensor, \
    needs_data_checks

__all__ = ["cost_sensitive_cross_entropy"]

_ops = torch.ops.fused_losses

COST_MODES = ("argmax", "expected")


def _check_class_indices(target: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target contains class index {value}, outside [0, {num_classes}) and not "
                         f"ignore_index ({ignore_index})")


def cost_sensitive_cross_entropy(
    input: Tensor,
    target: Tensor,
    cost_matrix: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    cost_mode: str = "argmax",
) -> Tensor:
    r"""Cross-entropy scaled per sample by a misclassification cost.

    ``loss_i = cost_matrix[y_i, argmax_j input[i, j]] * ce_i`` where ``ce_i`` is
    ``F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction="none",
    label_smoothing=label_smoothing)[i]``. The cost matrix has **rows = true class, columns = predicted class**
    (as scikit-learn's ``confusion_matrix``); the factor is a constant of the step (no gradient flows through
    the argmax). With ``cost_mode="expected"`` the factor is ``sum_j softmax(input_i)_j * cost_matrix[y_i, j]``
    and gradients flow through it.

    Args:
        input: logits, shape ``(N, C)`` or ``(N, C, d1, ..., dk)`` (or ``(C,)`` for one sample);
            float32, float16, bfloat16 or float64.
        target: class indices, int64 or int32, shape ``(N,)`` / ``(N, d1, ..., dk)`` (``()`` for one sample).
        cost_matrix: ``(C, C)`` non-negative, finite costs; ``None`` means all ones (plain cross-entropy).
        weight: ``(C,)`` class weights, as in ``F.cross_entropy``.
        ignore_index: target value whose samples contribute neither loss nor gradient.
        reduction: ``"none"`` (per-sample losses, target's shape), ``"mean"`` (sum divided by the summed
            ``weight[y]`` of non-ignored samples, their count without ``weight``) or ``"sum"``.
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        cost_mode: ``"argmax"`` or ``"expected"``.

    Returns:
        The loss in the input's dtype. With ``cost_matrix=None`` it equals ``F.cross_entropy`` for every
        argument.

    Example:
        >>> cost = torch.ones(3, 3); cost[1, 2] = 1.2      # true B predicted as C costs 1.2
        >>> loss = cost_sensitive_cross_entropy(logits, labels, cost)
    """
    check_tensor("input", input)
    check_tensor("target", target)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("cost_mode", cost_mode, COST_MODES)
    check_no_grad("cost_matrix", cost_matrix)
    check_no_grad("weight", weight)
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.dtype.is_complex:
        raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype} "
                        "(class-probability targets are not supported)")
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    if target.dtype != torch.int64:
        target = target.long()
    if input.dim() >= 2 and needs_data_checks(input):
        _check_class_indices(target, input.shape[1], ignore_index)
        if cost_matrix is not None:
            check_cost_matrix_values(cost_matrix)
    loss, _, _ = _ops.cost_sensitive_cross_entropy(input, target, cost_matrix, weight, int(ignore_index),
                                                    reduction, float(label_smoothing), cost_mode)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss
