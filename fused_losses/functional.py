"""Functional API of fused_losses: each function validates its arguments, calls the fused operator and
returns the loss. Arguments follow ``torch.nn.functional`` (order, names, ``reduction``)."""

from typing import Optional

import torch
from torch import Tensor

from ._registrations import call_operator
from ._sequences import as_sequence_batch
from ._validation import REDUCTIONS, as_tensor_argument, check_bool, check_choice, check_cost_matrix_values, \
    check_eps, check_focusing, check_integer, check_no_grad, check_real, check_tensor, needs_data_checks

__all__ = ["cost_sensitive_cross_entropy", "pearson_correlation_loss", "concordance_correlation_loss",
           "weighted_bce_with_logits"]

COST_MODES = ("argmax", "expected")


def _writes_gradient(input: Tensor, reduction: str) -> bool:
    """Whether the forward should also write the gradient of `input` (any tensor it differentiates; the 2-pass
    schedule, csrc/common.h): when a backward to it is coming and its grad_loss is one scalar, so that the
    backward is free in eager mode. Not while torch.compile traces: its functionalised backward cannot reuse
    that tensor (_registrations._take_forward_gradients), so the 3-pass schedule moves fewer bytes there; nor
    under torch.func transforms, whose backward is the differentiable one (_registrations._register_autograd)."""
    return (reduction != "none" and input.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active())


def _as_autocast_output(loss: Tensor) -> Tensor:
    """Under autocast PyTorch runs its losses in float32 (autocast's float32 op list: F.cross_entropy,
    F.binary_cross_entropy_with_logits and F.mse_loss return float32). The fused kernels read the half-precision
    logits as they are and accumulate in float32; the loss they store in the logits' dtype is returned as float32
    here, so code written for PyTorch's losses sees the dtype it expects."""
    if loss.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(loss.device.type):
        return loss.float()
    return loss


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
        target: integer class indices, shape ``(N,)`` / ``(N, d1, ..., dk)`` (``()`` for one sample); int64
            is read as it is, int32 / int16 / int8 / uint8 are converted to int64 first.
        cost_matrix: ``(C, C)`` non-negative, finite costs (a tensor or an array-like: nested lists, a NumPy
            array); ``None`` means all ones (plain cross-entropy). In ``"argmax"`` mode the diagonal scales
            the loss of correct predictions: keep it at 1 (a zero gives them zero loss and zero gradient;
            the module form warns about it).
        weight: ``(C,)`` class weights, as in ``F.cross_entropy`` (a tensor or an array-like).
        ignore_index: an int, the target value whose samples contribute neither loss nor gradient.
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
    check_integer("ignore_index", ignore_index)
    check_real("label_smoothing", label_smoothing)
    cost_matrix = as_tensor_argument("cost_matrix", cost_matrix, 2, input.device)
    weight = as_tensor_argument("weight", weight, 1, input.device)
    check_no_grad("cost_matrix", cost_matrix)
    check_no_grad("weight", weight)
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.dtype.is_complex:
        raise TypeError(f"target must hold integer class indices (int64, int32, int16, int8 or uint8), got "
                        f"{target.dtype} (class-probability targets are not supported)")
    unbatched = input.dim() == 1
    if unbatched:
        if target.dim() != 0:  # checked here: the operator would name the (1, C) view below, not these shapes
            raise ValueError(f"target must be a 0-d class index for input of shape {tuple(input.shape)} (one sample "
                             f"of {input.shape[0]} classes), got shape {tuple(target.shape)}; for N samples pass "
                             "(N, C) logits")
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    if target.dtype != torch.int64:
        target = target.long()
    if input.dim() >= 2 and needs_data_checks(input):
        _check_class_indices(target, input.shape[1], ignore_index)
        if cost_matrix is not None:
            check_cost_matrix_values(cost_matrix)
    loss, _, _, _ = call_operator("cost_sensitive_cross_entropy", input, target, cost_matrix, weight,
                                  int(ignore_index), reduction, float(label_smoothing), cost_mode,
                                  _writes_gradient(input, reduction))
    return _as_autocast_output(loss.squeeze(0) if unbatched and reduction == "none" else loss)



# ----------------------------------------------------------------------------- correlation losses


def _correlation_loss(kind: str, input: Tensor, target: Tensor, mask: Optional[Tensor], dim: int,
                      reduction: str, per_timestep: bool, eps: float, lengths: Optional[Tensor]) -> Tensor:
    check_choice("reduction", reduction, REDUCTIONS)
    check_bool("per_timestep", per_timestep)
    check_eps(eps)
    if (isinstance(input, Tensor) and isinstance(target, Tensor) and input.dtype != target.dtype
            and input.dtype.is_floating_point and target.dtype.is_floating_point):
        # Mixed precision (bf16 predictions, float32 targets): promote as torch's elementwise losses do.
        common = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(common), target.to(common)
    batch = as_sequence_batch(input, target, mask, dim, lengths)
    loss, *_ = call_operator("correlation_loss", batch.input, batch.target, batch.mask, kind, reduction,
                             per_timestep, float(eps), _writes_gradient(batch.input, reduction),
                             _writes_gradient(batch.target, reduction))
    return _as_autocast_output(batch.restore_layout(loss, per_timestep) if reduction == "none" else loss)


_CORRELATION_ARGS = r"""
    Args:
        input: predictions, shape ``(B, T)`` or ``(B, T, D)`` with the time axis ``dim`` (of the other axes the
            first is the batch, the second the channels); float32, float16, bfloat16 or float64.
        target: same shape and dtype as ``input``; it is differentiated too when it requires grad.
        mask: bool, the input's shape without the channel axis (``(B, T)`` batch-first); True = valid step.
            Statistics use the valid steps only.
        dim: the time axis (default 1, batch-first).
        reduction: ``"none"``: one loss per sequence, ``(B,)`` for 2-D input, ``(B, D)`` for 3-D input;
            ``"mean"`` / ``"sum"`` over sequences (and channels).
        per_timestep: return per-step contributions ``c_t`` whose mean over the valid steps of a sequence is
            that sequence's loss (padding steps are 0); with ``reduction="none"`` they have the input's shape.
            With ``"sum"`` the result is the sum of ``c_t`` over all valid steps (each sequence's loss times
            its number of valid steps) and with ``"mean"`` that sum divided by the number of valid steps (a
            mean weighted by valid length).
        eps: ``>= 0``, added to the denominator as in the formula.
        lengths: alternative to ``mask``: ``(B,)`` integers in ``[0, T]``, the valid prefix of each sequence.

    Moments are population moments over the valid steps, accumulated in float32 (float64 for double input)
    as shifted sums over short blocks merged with Chan's formulas, so data far from zero keeps its precision.
    A flat sequence or one with fewer than 2 valid steps has covariance 0: its loss is 1, finite, with
    gradients bounded by ``1.5 / sqrt(n eps)`` (Pearson) and ``(2 sqrt(2 n) + 2) / (n sqrt(eps))`` (CCC) in
    every dtype (with ``eps = 0`` neither bound holds). A sequence without valid steps has loss 1, no
    gradient, and still counts in ``"mean"``. NaN in a valid step propagates to
    its sequence; padding is never read into the result.
"""


def pearson_correlation_loss(input: Tensor, target: Tensor, mask: Optional[Tensor] = None, dim: int = 1,
                             reduction: str = "mean", per_timestep: bool = False, eps: float = 1e-8,
                             lengths: Optional[Tensor] = None) -> Tensor:
    return _correlation_loss("pearson", input, target, mask, dim, reduction, per_timestep, eps, lengths)


def concordance_correlation_loss(input: Tensor, target: Tensor, mask: Optional[Tensor] = None, dim: int = 1,
                                 reduction: str = "mean", per_timestep: bool = False, eps: float = 1e-8,
                                 lengths: Optional[Tensor] = None) -> Tensor:
    return _correlation_loss("concordance", input, target, mask, dim, reduction, per_timestep, eps, lengths)


pearson_correlation_loss.__doc__ = r"""Pearson correlation loss per sequence, over the time axis.

    ``loss = 1 - cov(x, y) / sqrt((var(x) + eps) (var(y) + eps))`` for each sequence (and channel); per step
    ``c_t = 1 - (x_t - mean x)(y_t - mean y) / sqrt((var(x) + eps) (var(y) + eps))``. With eps inside each
    variance the gradient is bounded, ``|d loss / d x_t| <= 1.5 / sqrt(n eps)`` over the ``n`` valid steps
    (1500 for ``n = 100`` and the default eps; at a flat prediction it is ``z_t / (n sqrt(eps))``, ``z_t``
    the target's standardised value), also for a flat or nearly flat prediction; for variances far above eps
    the value is ``1 - r`` to float32 rounding.
""" + _CORRELATION_ARGS + r"""
    Example:
        >>> pred, true = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> loss = pearson_correlation_loss(pred, true, lengths=torch.full((8,), 90))
        >>> loss.backward()
"""

concordance_correlation_loss.__doc__ = r"""Concordance correlation (Lin's CCC) loss per sequence, over the time axis.

    ``loss = 1 - 2 cov(x, y) / (var(x) + var(y) + (mean x - mean y)^2 + eps)`` for each sequence (and
    channel); per step ``c_t = 1 - 2 (x_t - mean x)(y_t - mean y) / (var(x) + var(y) + (mean x - mean y)^2 + eps)``.
""" + _CORRELATION_ARGS + r"""
    Example:
        >>> pred = torch.randn(4, 50, 2, requires_grad=True)      # (batch, time, channels)
        >>> loss = concordance_correlation_loss(pred, torch.randn(4, 50, 2), reduction="none")  # (4, 2)
"""
# ----------------------------------------------------------------------------- weighted / focal / ASL BCE


def _copy_target_for_flat_kernels(input: Tensor, target: Tensor) -> bool:
    """Whether a dense target should be copied to contiguous memory before a CUDA call. The flat kernels need the
    logits and the target contiguous and 16-byte aligned at a common element; a target in any other dense layout
    (a padded-row slice, a transposed view) sends every pass to the strided kernel, whose per-element index math
    ran at 16% of DRAM peak on an H200 (0.62x torch.compile, a padded bf16 target): one contiguous copy costs
    less. It is made before the operator, so that the forward and both backwards read the same layout. Not for a
    broadcast target (a stride 0: a copy would materialise it), nor beside logits that are not contiguous or not
    16-byte aligned (a fresh copy is aligned at element 0, so the strided kernel would run anyway; weights
    broadcast along a middle dimension send it there too, copy or not)."""
    return (input.is_contiguous() and input.storage_offset() * input.element_size() % 16 == 0
            and not target.is_contiguous() and target.shape == input.shape
            and all(stride != 0 or size <= 1 for stride, size in zip(target.stride(), target.shape)))


def _check_positive_index_values(positive_indices: Tensor, num_labels: int) -> None:
    bad = (positive_indices < -1) | (positive_indices >= num_labels)
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"positive_indices contains {int(positive_indices[row, column])} (row {row}), outside "
                         f"[0, {num_labels}) and not the padding value -1")


def weighted_bce_with_logits(
    input: Tensor,
    target: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    pos_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    *,
    positive_indices: Optional[Tensor] = None,
    gamma_pos: float = 0.0,
    gamma_neg: float = 0.0,
    clip: float = 0.0,
) -> Tensor:
    r"""Binary cross-entropy with logits for multi-label targets, with ``pos_weight``, focal and asymmetric
    (ASL) focusing, on dense or sparse targets, in one fused pass.

    With ``p = sigmoid(input)``, target ``y``, ``q = pos_weight`` and ``w = weight`` (ones when absent)::

        loss = w * (q * y * l_pos + (1 - y) * l_neg)
        l_pos = -(1 - p) ** gamma_pos * log(p)
        l_neg = -p_m ** gamma_neg * log(1 - p_m),   p_m = max(p - clip, 0)

    With ``gamma_pos = gamma_neg = clip = 0`` this equals ``F.binary_cross_entropy_with_logits(input, target,
    weight, pos_weight=pos_weight, reduction=reduction)``; ``gamma_pos = gamma_neg`` with ``clip = 0`` is the
    focal loss; different gammas with a ``clip`` margin is ASL (Ridnik et al., 2021). Soft targets in
    ``[0, 1]`` mix the positive and negative terms linearly, as above. Everything is computed in float32
    (float64 for double input) from log-sigmoid, so logits up to ``|1e4|`` give finite losses and gradients
    in every dtype; ``0 ** 0`` is 1. Gradients with respect to ``input`` include the derivative of the
    focusing factors (nothing is detached); a floating-point ``target`` that requires grad gets its gradient
    ``weight (pos_weight l_pos - l_neg)``; no gradient flows to the weights.

    Args:
        input: logits of any shape (``(N, L)`` with ``positive_indices``); float32, float16, bfloat16 or
            float64.
        target: dense targets, the input's shape: floating point (soft labels; read directly in the input's
            dtype or float32, other floating dtypes are converted to float32), ``bool`` or ``uint8``
            (read as 0 / 1 in their own narrow dtype, never converted).
        weight: rescaling weight broadcastable to the input's shape, as in PyTorch (a tensor or an array-like:
            nested lists, a NumPy array).
        pos_weight: weight of the positive term, broadcastable to the input's shape: usually ``(L,)``, one
            per label (the last dimension); a tensor or an array-like.
        reduction: ``"none"`` (the input's shape), ``"mean"`` (over all elements, as PyTorch) or ``"sum"``.
        positive_indices: sparse targets instead of ``target``: ``(N, K)`` int64 (or int32) label indices in
            ``[0, L)`` that are positive for each row, padded with ``-1``. A label listed twice in a row counts
            once (each row is a set). Invalid indices raise ``ValueError`` on the CPU; on CUDA they make their
            row's loss and gradient NaN unless ``FUSED_LOSSES_CHECK=1`` (which validates first, with a host
            synchronisation). No dense target is ever built.
        gamma_pos, gamma_neg: finite focusing exponents ``>= 0`` of the positive and negative terms.
        clip: probability margin in ``[0, 1)`` of the negative term (ASL); 0 disables it.

    Returns:
        The loss in the input's dtype.

    Example:
        >>> logits = torch.randn(4, 1000, requires_grad=True)
        >>> labels = torch.tensor([[3, 17, -1], [5, -1, -1], [0, 1, 2], [-1, -1, -1]])
        >>> loss = weighted_bce_with_logits(logits, positive_indices=labels, gamma_neg=4.0, gamma_pos=1.0,
        ...                                 clip=0.05)
        >>> loss.backward()
    """
    check_tensor("input", input)
    check_choice("reduction", reduction, REDUCTIONS)
    check_focusing(gamma_pos, gamma_neg, clip)
    if (target is None) == (positive_indices is None):
        raise ValueError("pass exactly one of target (dense) and positive_indices (sparse), got "
                         f"{'neither' if target is None else 'both'}")
    weight = as_tensor_argument("weight", weight, None, input.device)
    pos_weight = as_tensor_argument("pos_weight", pos_weight, None, input.device)
    check_no_grad("weight", weight)
    check_no_grad("pos_weight", pos_weight)
    if target is not None:
        check_tensor("target", target, "for sparse multi-label targets pass positive_indices: (N, K) label indices "
                                        "per row, padded with -1")
        convert = target.dtype.is_floating_point and target.dtype not in (input.dtype, torch.float32)
        copy = (target.device.type == "cuda" and not torch._C._are_functorch_transforms_active()
                and _copy_target_for_flat_kernels(input, target))
        if convert or copy:  # one copy for both
            target = target.to(torch.float32 if convert else target.dtype,
                               memory_format=torch.contiguous_format if copy else torch.preserve_format)
    else:
        check_tensor("positive_indices", positive_indices)
        if positive_indices.dtype == torch.int32:
            positive_indices = positive_indices.long()
        if input.dim() == 2 and positive_indices.dtype == torch.int64 and needs_data_checks(input):
            _check_positive_index_values(positive_indices, input.shape[1])
    loss, _ = call_operator("weighted_bce_with_logits", input, target, positive_indices, weight, pos_weight,
                            reduction, float(gamma_pos), float(gamma_neg), float(clip),
                            _writes_gradient(input, reduction))
    return _as_autocast_output(loss)
