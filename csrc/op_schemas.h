// Every operator schema of the library, in one place: fused_losses.cpp defines them for the library, and the
// host emulation of the CUDA kernels (tests/cuda_emulation) for its own namespace.
#pragma once

#include <torch/library.h>

namespace fused_losses {

inline void define_operator_schemas(torch::Library& m) {
  // Returns (loss, row_stats, total_weight, gradient): loss has the target's shape for reduction='none', else
  // it is a scalar; row_stats (rows, k) and total_weight (the sum of the class weights of non-ignored rows)
  // are what the backward needs; with write_gradient (a reduced loss only) gradient is d loss / d input for
  // grad_loss = 1, written in the same pass, else an empty (0,) tensor (common.h: schedules).
  m.def(
      "cost_sensitive_cross_entropy(Tensor input, Tensor target, Tensor? cost_matrix, Tensor? weight, "
      "int ignore_index, str reduction, float label_smoothing, str cost_mode, bool write_gradient) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cost_sensitive_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? cost_matrix, "
      "Tensor? weight, Tensor row_stats, Tensor total_weight, int ignore_index, str reduction, "
      "float label_smoothing, str cost_mode) -> Tensor");
  // Turns the forward's gradient (grad_loss = 1) into the gradient for grad_loss, in place: nothing to do when
  // grad_loss is 1, else recomputed from the inputs.
  m.def(
      "cost_sensitive_cross_entropy_backward_inplace(Tensor grad_loss, Tensor(a!) gradient, Tensor input, "
      "Tensor target, Tensor? cost_matrix, Tensor? weight, Tensor row_stats, Tensor total_weight, "
      "int ignore_index, str reduction, float label_smoothing, str cost_mode) -> ()");

  // Correlation losses of (batch, time, channels) sequences over the time axis, kind 'pearson' or 'concordance'.
  // Returns (loss, stats, total_weight, grad_input, grad_target): loss is (batch, channels) for
  // reduction='none', the input's shape with per_timestep, else a scalar; stats (batch, channels, 8) holds each
  // sequence's count, means (as shift + remainder) and centred sums (what the backward needs); total_weight is
  // the divisor of reduction='mean'. With write_input_gradient / write_target_gradient (a reduced loss only)
  // grad_input / grad_target is d loss / d input / target for grad_loss = 1, written by the forward, else an
  // empty (0,) tensor (common.h: schedules).
  m.def(
      "correlation_loss(Tensor input, Tensor target, Tensor? mask, str kind, str reduction, bool per_timestep, "
      "float eps, bool write_input_gradient, bool write_target_gradient) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_target); a gradient not requested is an empty tensor.
  m.def(
      "correlation_loss_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? mask, Tensor stats, "
      "Tensor total_weight, str kind, str reduction, bool per_timestep, float eps, bool input_requires_grad, "
      "bool target_requires_grad) -> (Tensor, Tensor)");
  // Turns the forward's gradients (grad_loss = 1) of the requested sides into the gradients for grad_loss, in
  // place: nothing to do when grad_loss is 1, else recomputed from the inputs. A side not requested is not
  // read (it may be an empty tensor).
  m.def(
      "correlation_loss_backward_inplace(Tensor grad_loss, Tensor(a!) grad_input, Tensor(b!) grad_target, "
      "Tensor input, Tensor target, Tensor? mask, Tensor stats, Tensor total_weight, str kind, str reduction, "
      "bool per_timestep, float eps, bool input_requires_grad, bool target_requires_grad) -> ()");
  // Exactly one of target (dense, the input's shape: float, bool or uint8) and positive_indices (sparse,
  // (N, K) int64 padded with -1, input (N, L)). Returns (loss, gradient): the loss has the input's shape for
  // reduction='none', else it is a scalar; with write_gradient (a reduced loss only) gradient is d loss / d
  // input for grad_loss = 1, written in the same pass, else an empty (0,) tensor (common.h: schedules).
  m.def(
      "weighted_bce_with_logits(Tensor input, Tensor? target, Tensor? positive_indices, Tensor? weight, "
      "Tensor? pos_weight, str reduction, float gamma_pos, float gamma_neg, float clip, bool write_gradient) "
      "-> (Tensor, Tensor)");
  m.def(
      "weighted_bce_with_logits_backward(Tensor grad_loss, Tensor input, Tensor? target, Tensor? positive_indices, "
      "Tensor? weight, Tensor? pos_weight, str reduction, float gamma_pos, float gamma_neg, float clip) -> Tensor");
  // Turns the forward's gradient (grad_loss = 1) into the gradient for grad_loss, in place: nothing to do when
  // grad_loss is 1, else recomputed from the inputs.
  m.def(
      "weighted_bce_with_logits_backward_inplace(Tensor grad_loss, Tensor(a!) gradient, Tensor input, "
      "Tensor? target, Tensor? positive_indices, Tensor? weight, Tensor? pos_weight, str reduction, "
      "float gamma_pos, float gamma_neg, float clip) -> ()");
}

}  // namespace fused_losses
