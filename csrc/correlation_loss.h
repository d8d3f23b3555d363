// Host-side argument checking and problem set-up of the correlation losses (Pearson and CCC), shared by the
// CPU and CUDA implementations. The operators take (B, T) or (B, T, D) views with the time axis at 1 (Python
// moves the user's time axis there by a view; a (B, T) input is one channel, taken as it is so that a small loss
// pays for no view with an autograd node); every kernel is stride-aware, nothing is copied.
#pragma once

#include "common.h"
#include "correlation_math.h"
#include "row_layout.h"

#include <optional>
#include <string_view>
#include <vector>

namespace fused_losses {

inline CorrelationKind parse_correlation_kind(std::string_view kind) {
  if (kind == "pearson") return CorrelationKind::Pearson;
  if (kind == "concordance") return CorrelationKind::Concordance;
  TORCH_CHECK_VALUE(false, "kind must be 'pearson' or 'concordance', got '", kind, "'");
}

// A (B, T, D) tensor as rows (sequences) s = b * D + d of T steps `class_stride` apart; a (B, T) tensor is one
// channel, and a (B, T) mask is shared by the D channels (inner stride 0 either way).
inline RowLayout sequence_layout(const at::Tensor& t, int64_t channels) {
  RowLayout layout{};
  layout.inner = channels;
  layout.outer_stride = t.stride(0);
  layout.class_stride = t.stride(1);
  layout.inner_stride = t.dim() > 2 ? t.stride(2) : 0;
  return layout;
}

// Everything a kernel needs about one call, after checking the arguments.
struct CorrelationProblem {
  at::Tensor input, target;     // (B, T, D) or (B, T) (D = 1), any strides
  std::optional<at::Tensor> mask;  // (B, T) bool, any strides
  int64_t batch = 0, time = 0, channels = 0;
  RowLayout input_layout{}, target_layout{}, mask_layout{};
  Reduction reduction = Reduction::Mean;
  CorrelationKind kind = CorrelationKind::Pearson;
  bool per_timestep = false;
  double eps = 0;

  int64_t sequences() const { return batch * channels; }
  // The shape of per-sequence values: (B, D), or (B,) for a (B, T) input.
  std::vector<int64_t> sequence_shape() const {
    return input.dim() == 3 ? std::vector<int64_t>{batch, channels} : std::vector<int64_t>{batch};
  }
  // The loss holds one value per step (reduction 'none' with per_timestep).
  bool per_step_output() const { return reduction == Reduction::None && per_timestep; }

  template <typename acc_t>
  CorrelationConfig<acc_t> config() const {
    return {kind, static_cast<acc_t>(eps), per_timestep};
  }
};

inline CorrelationProblem make_correlation_problem(const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& mask, std::string_view kind,
                                                   std::string_view reduction, bool per_timestep, double eps) {
  CorrelationProblem p;
  check_floating_input(input, "input");
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3,
                    "input must have shape (batch, time) or (batch, time, channels), got ", input.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), "target must have the input's dtype (",
                   input.scalar_type(), "), got ", target.scalar_type());
  check_same_device(input, "input", target, "target");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "target must have the input's shape ", input.sizes(), ", got ",
                    target.sizes());
  p.batch = input.size(0);
  p.time = input.size(1);
  p.channels = input.dim() == 3 ? input.size(2) : 1;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor (True = valid step), got ",
                     mask->scalar_type());
    check_same_device(input, "input", *mask, "mask");
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == p.batch && mask->size(1) == p.time,
                      "mask must have shape (batch, time) = (", p.batch, ", ", p.time, "), got ", mask->sizes());
    p.mask = *mask;
    p.mask_layout = sequence_layout(*mask, p.channels);
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  p.kind = parse_correlation_kind(kind);
  p.reduction = parse_reduction(reduction);
  p.per_timestep = per_timestep;
  p.eps = eps;
  p.input = input;
  p.target = target;
  p.input_layout = sequence_layout(input, p.channels);
  p.target_layout = sequence_layout(target, p.channels);
  return p;
}

// Outputs of the forward: the loss (sequence_shape() per sequence, the input's layout per step, or a scalar), the
// per-sequence Moments (B, D, 8) and the total weight of the reduction, both in the accumulation dtype.
inline at::Tensor allocate_correlation_loss(const CorrelationProblem& p) {
  if (p.reduction != Reduction::None) return at::empty({}, p.input.options());
  return p.per_timestep ? at::empty_like(p.input) : at::empty(p.sequence_shape(), p.input.options());
}

inline at::Tensor allocate_moments(const CorrelationProblem& p) {
  return at::empty({p.batch, p.channels, Moments<float>::kWidth},
                   p.input.options().dtype(acc_scalar_type(p.input.scalar_type())));
}

// A requested gradient has its tensor's shape and (dense) strides; one not requested is an empty tensor.
inline at::Tensor allocate_gradient(const at::Tensor& like, bool requested) {
  return requested ? at::empty_like(like) : at::empty({0}, like.options());
}

// The tensors the backward receives back from the forward must be the ones it produced.
inline void check_correlation_backward_arguments(const CorrelationProblem& p, const at::Tensor& grad_loss,
                                                 const at::Tensor& moments, const at::Tensor& total_weight) {
  check_same_device(p.input, "input", grad_loss, "grad_loss");
  check_same_device(p.input, "input", moments, "stats");
  check_same_device(p.input, "input", total_weight, "total_weight");
  if (p.per_step_output()) {
    TORCH_CHECK_VALUE(grad_loss.sizes() == p.input.sizes(), "grad_loss must have the input's shape ",
                      p.input.sizes(), " for reduction='none' with per_timestep, got ", grad_loss.sizes());
  } else if (p.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.sizes() == at::IntArrayRef(p.sequence_shape()), "grad_loss must have shape ",
                      at::IntArrayRef(p.sequence_shape()), " for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  }
  const auto acc = acc_scalar_type(p.input.scalar_type());
  TORCH_CHECK_VALUE(moments.scalar_type() == acc && moments.dim() == 3 && moments.size(0) == p.batch &&
                        moments.size(1) == p.channels && moments.size(2) == Moments<float>::kWidth,
                    "stats must be the (", p.batch, ", ", p.channels, ", ", Moments<float>::kWidth, ") ", acc,
                    " tensor saved by the forward, got ", moments.sizes(), " ", moments.scalar_type());
  TORCH_CHECK_VALUE(total_weight.scalar_type() == acc && total_weight.numel() == 1,
                    "total_weight must be the scalar saved by the forward");
}

// One side (input or target) of the in-place backward: the forward's gradient `gradient` (the argument `name`)
// when that side is requested, else an empty tensor, which the kernels skip.
inline at::Tensor requested_forward_gradient(const at::Tensor& gradient, const char* name, const at::Tensor& like,
                                             const char* like_name, bool requested, Reduction reduction) {
  if (!requested) return at::empty({0}, like.options());
  check_forward_gradient(gradient, name, like, like_name, reduction);
  return gradient;
}

// The checked arguments of the in-place backward: the problem, and the gradients to recompute (sharing the
// storage of the forward's, empty for a side not requested).
struct InplaceBackwardArguments {
  CorrelationProblem problem;
  at::Tensor grad_input, grad_target;
};

inline InplaceBackwardArguments check_inplace_backward_arguments(
    const at::Tensor& grad_loss, const at::Tensor& grad_input, const at::Tensor& grad_target, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& mask, const at::Tensor& stats,
    const at::Tensor& total_weight, std::string_view kind, std::string_view reduction, bool per_timestep, double eps,
    bool input_requires_grad, bool target_requires_grad) {
  InplaceBackwardArguments args{make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps)};
  const CorrelationProblem& p = args.problem;
  check_correlation_backward_arguments(p, grad_loss, stats, total_weight);
  args.grad_input = requested_forward_gradient(grad_input, "grad_input", p.input, "input", input_requires_grad,
                                               p.reduction);
  args.grad_target = requested_forward_gradient(grad_target, "grad_target", p.target, "target",
                                                target_requires_grad, p.reduction);
  return args;
}

// grad_loss in the input's dtype: per sequence it is small and made contiguous; per step it keeps its strides
// (an expanded gradient is read in place).
inline at::Tensor upstream_gradient(const CorrelationProblem& p, const at::Tensor& grad_loss) {
  const at::Tensor grad = grad_loss.to(p.input.scalar_type());
  return p.per_step_output() ? grad : grad.contiguous();
}

}  // namespace fused_losses
