"""Fake (meta) kernels and autograd formulas of the fused_losses operators.

The schemas live in csrc/fused_losses.cpp and the device kernels in csrc/cpu and csrc/cuda; this module
teaches torch.compile the output shapes (fake kernels) and autograd the backward of each operator.
"""

import torch

from . import _C  # noqa: F401  (loads the library, registering the operators)

_ops = torch.ops.fused_losses


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for double inputs, float32 otherwise: the dtype the kernels accumulate and save statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- cost-sensitive cross-entropy


def _num_row_stats(cost_matrix, cost_mode: str) -> int:
    has_cost = cost_matrix is not None
    return 1 + int(has_cost) + int(has_cost and cost_mode == "expected")


@torch.library.register_fake("fused_losses::cost_sensitive_cross_entropy")
def _cost_sensitive_cross_entropy_fake(input, target, cost_matrix, weight, ignore_index, reduction,
                                       label_smoothing, cost_mode):
    acc = accumulation_dtype(input.dtype)
    loss = input.new_empty(target.shape) if reduction == "none" else input.new_empty(())
    row_stats = input.new_empty((target.numel(), _num_row_stats(cost_matrix, cost_mode)), dtype=acc)
    return loss, row_stats, input.new_empty((), dtype=acc)


@torch.library.register_fake("fused_losses::cost_sensitive_cross_entropy_backward")
def _cost_sensitive_cross_entropy_backward_fake(grad_loss, input, target, cost_matrix, weight, row_stats,
                                                total_weight, ignore_index, reduction, label_smoothing, cost_mode):
    return input.new_empty(input.shape)


def _cost_sensitive_cross_entropy_setup(ctx, inputs, output):
    input, target, cost_matrix, weight, ignore_index, reduction, label_smoothing, cost_mode = inputs
    _, row_stats, total_weight = output
    ctx.save_for_backward(input, target, cost_matrix, weight, row_stats, total_weight)
    ctx.options = (ignore_index, reduction, label_smoothing, cost_mode)


def _cost_sensitive_cross_entropy_backward(ctx, grad_loss, _grad_row_stats, _grad_total_weight):
    input, target, cost_matrix, weight, row_stats, total_weight = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.cost_sensitive_cross_entropy_backward(
            grad_loss, input, target, cost_matrix, weight, row_stats, total_weight, *ctx.options)
    return grad_input, None, None, None, None, None, None, None


torch.library.register_autograd(
    "fused_losses::cost_sensitive_cross_entropy",
    _cost_sensitive_cross_entropy_backward,
    setup_context=_cost_sensitive_cross_entropy_setup,
)


# ----------------------------------------------------------------------------- correlation losses

_MOMENTS_WIDTH = 8  # count, shifts and means of x and y, Cxx, Cyy, Cxy per sequence (csrc/correlation_math.h)


@torch.library.register_fake("fused_losses::correlation_loss")
def _correlation_loss_fake(input, target, mask, kind, reduction, per_timestep, eps):
    acc = accumulation_dtype(input.dtype)
    batch, _, channels = input.shape
    if reduction != "none":
        loss = input.new_empty(())
    elif per_timestep:
        loss = torch.empty_like(input)  # the kernel keeps the input's (dense) strides
    else:
        loss = input.new_empty((batch, channels))
    stats = input.new_empty((batch, channels, _MOMENTS_WIDTH), dtype=acc)
    return loss, stats, input.new_empty((), dtype=acc)


@torch.library.register_fake("fused_losses::correlation_loss_backward")
def _correlation_loss_backward_fake(grad_loss, input, target, mask, stats, total_weight, kind, reduction,
                                    per_timestep, eps, input_requires_grad, target_requires_grad):
    def gradient(like, requested):
        return torch.empty_like(like) if requested else like.new_empty((0,))

    return gradient(input, input_requires_grad), gradient(target, target_requires_grad)


def _correlation_loss_setup(ctx, inputs, output):
    input, target, mask, kind, reduction, per_timestep, eps = inputs
    _, stats, total_weight = output
    ctx.mark_non_differentiable(stats, total_weight)
    ctx.save_for_backward(input, target, mask, stats, total_weight)
    ctx.options = (kind, reduction, per_timestep, eps)


def _correlation_loss_backward(ctx, grad_loss, _grad_stats, _grad_total_weight):
    input, target, mask, stats, total_weight = ctx.saved_tensors
    want_input, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input = grad_target = None
    if want_input or want_target:
        grad_input, grad_target = _ops.correlation_loss_backward(
            grad_loss, input, target, mask, stats, total_weight, *ctx.options, want_input, want_target)
    return (grad_input if want_input else None, grad_target if want_target else None,
            None, None, None, None, None)


torch.library.register_autograd(
    "fused_losses::correlation_loss",
    _correlation_loss_backward,
    setup_context=_correlation_loss_setup,
)


# ----------------------------------------------------------------------------- weighted / focal / ASL BCE


@torch.library.register_fake("fused_losses::weighted_bce_with_logits")
def _weighted_bce_with_logits_fake(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                   gamma_neg, clip):
    return input.new_empty(input.shape if reduction == "none" else ())


@torch.library.register_fake("fused_losses::weighted_bce_with_logits_backward")
def _weighted_bce_with_logits_backward_fake(grad_loss, input, target, positive_indices, weight, pos_weight,
                                            reduction, gamma_pos, gamma_neg, clip):
    return input.new_empty(input.shape)


def _weighted_bce_with_logits_setup(ctx, inputs, output):
    input, target, positive_indices, weight, pos_weight, *options = inputs
    # The 3-pass schedule saves only the inputs: the backward re-reads them, so any grad_output, retain_graph
    # and repeated backwards stay correct.
    ctx.save_for_backward(input, target, positive_indices, weight, pos_weight)
    ctx.options = tuple(options)  # reduction, gamma_pos, gamma_neg, clip


def _weighted_bce_with_logits_backward(ctx, grad_loss):
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.weighted_bce_with_logits_backward(grad_loss, *ctx.saved_tensors, *ctx.options)
    return grad_input, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "fused_losses::weighted_bce_with_logits",
    _weighted_bce_with_logits_backward,
    setup_context=_weighted_bce_with_logits_setup,
)
