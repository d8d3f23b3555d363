// Host-side argument checking and problem set-up of the cost-sensitive cross-entropy, shared by the
// CPU and CUDA implementations.
#pragma once

#include "common.h"
#include <ATen/Dispatch.h>
#include "cross_entropy_math.h"

#include <optional>
#include <string_view>

namespace fused_losses {

inline CostMode parse_cost_mode(std::string_view cost_mode) {
  if (cost_mode == "argmax") return CostMode::Argmax;
  if (cost_mode == "expected") return CostMode::Expected;
  TORCH_CHECK_VALUE(false, "cost_mode must be 'argmax' or 'expected', got '", cost_mode, "'");
}

// Everything a kernel needs about one call, after checking the arguments.
struct CrossEntropyProblem {
  at::Tensor input;   // possibly made contiguous when its spatial dims could not be viewed as one
  at::Tensor target;  // contiguous int64, one entry per row
  std::optional<at::Tensor> cost;          // (C, C) contiguous, accumulation dtype
  std::optional<at::Tensor> class_weight;  // (C,) contiguous, accumulation dtype
  std::optional<at::Tensor> class_weight_sum;  // 0-dim, accumulation dtype (computed on the device)
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  RowLayout layout{};
  Reduction reduction = Reduction::Mean;
  CostMode mode = CostMode::Argmax;
  int num_stats = 1;
};

// True when dims [first, dim) of `t` can be addressed as one dimension with stride t.stride(dim - 1).
inline bool dims_collapse(const at::Tensor& t, int64_t first) {
  for (int64_t d = first; d + 1 < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return false;
  }
  return true;
}

inline CrossEntropyProblem make_cross_entropy_problem(const at::Tensor& input, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& cost_matrix,
                                                      const std::optional<at::Tensor>& weight, std::string_view reduction,
                                                      double label_smoothing, std::string_view cost_mode) {
  CrossEntropyProblem p;
  check_floating_input(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 2, "input must have shape (N, C) or (N, C, d1, ..., dk), got ", input.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64 class indices, got ",
                   target.scalar_type());
  check_same_device(input, "input", target, "target");
  std::vector<int64_t> expected_target_shape(input.sizes().begin(), input.sizes().end());
  expected_target_shape.erase(expected_target_shape.begin() + 1);
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected_target_shape), "target must have shape ",
                    at::IntArrayRef(expected_target_shape), " for input of shape ", input.sizes(), ", got ",
                    target.sizes());
  p.num_classes = input.size(1);
  check_optional_parameter(cost_matrix, "cost_matrix", input, {p.num_classes, p.num_classes});
  check_optional_parameter(weight, "weight", input, {p.num_classes});
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  p.reduction = parse_reduction(reduction);
  p.mode = parse_cost_mode(cost_mode);

  const auto acc = acc_scalar_type(input.scalar_type());
  if (cost_matrix.has_value()) p.cost = cost_matrix->to(acc).contiguous();
  if (weight.has_value()) {
    p.class_weight = weight->to(acc).contiguous();
    p.class_weight_sum = p.class_weight->sum();
  }
  p.num_stats = num_row_stats(p.cost.has_value(), p.mode);

  p.input = (input.dim() > 2 && !dims_collapse(input, 2)) ? input.contiguous() : input;
  p.target = target.contiguous();
  p.num_rows = target.numel();
  const int64_t inner = p.input.numel() == 0 ? 1 : p.num_rows / std::max<int64_t>(1, p.input.size(0));
  p.layout.inner = std::max<int64_t>(1, inner);
  p.layout.outer_stride = p.input.stride(0);
  p.layout.class_stride = p.input.stride(1);
  p.layout.inner_stride = p.input.dim() > 2 ? p.input.stride(p.input.dim() - 1) : 0;
  return p;
}

// Cost entries must be finite and non-negative (a negative cost would reward a mistake). Reads the values,
// so the CPU kernel calls it on every call (a plain loop over C x C values, no tensor ops) and CUDA only
// through FUSED_LOSSES_CHECK=1 (in Python).
inline void check_cost_values(const CrossEntropyProblem& p) {
  if (!p.cost.has_value()) return;
  AT_DISPATCH_FLOATING_TYPES(p.cost->scalar_type(), "check_cost_values", [&] {
    const scalar_t* cost = p.cost->const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < p.cost->numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(cost[i]), "cost_matrix must contain only finite values");
      TORCH_CHECK_VALUE(cost[i] >= 0, "cost_matrix must be non-negative: a negative cost would reward a misclassification");
    }
  });
}

// Layout of the (contiguous) gradient we allocate with the input's shape.
inline RowLayout contiguous_row_layout(const at::Tensor& t) {
  RowLayout layout{};
  const int64_t inner = t.dim() > 2 ? t.numel() / std::max<int64_t>(1, t.size(0) * t.size(1)) : 1;
  layout.inner = std::max<int64_t>(1, inner);
  layout.class_stride = layout.inner;
  layout.outer_stride = t.size(1) * layout.inner;
  layout.inner_stride = 1;
  return layout;
}

// The tensors the backward receives back from the forward must be the ones it produced.
inline void check_backward_arguments(const CrossEntropyProblem& p, const at::Tensor& grad_loss,
                                     const at::Tensor& row_stats, const at::Tensor& total_weight) {
  check_same_device(p.input, "input", grad_loss, "grad_loss");
  if (p.reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad_loss.sizes() == p.target.sizes(), "grad_loss must have the target's shape ",
                      p.target.sizes(), " for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  }
  const auto acc = acc_scalar_type(p.input.scalar_type());
  TORCH_CHECK_VALUE(row_stats.scalar_type() == acc && row_stats.dim() == 2 && row_stats.size(0) == p.num_rows &&
                        row_stats.size(1) == p.num_stats,
                    "row_stats must be the (", p.num_rows, ", ", p.num_stats, ") ", acc,
                    " tensor saved by the forward, got ", row_stats.sizes(), " ", row_stats.scalar_type());
  TORCH_CHECK_VALUE(total_weight.scalar_type() == acc && total_weight.numel() == 1,
                    "total_weight must be the scalar saved by the forward");
  check_same_device(p.input, "input", row_stats, "row_stats");
  check_same_device(p.input, "input", total_weight, "total_weight");
}

template <typename acc_t>
CrossEntropyConfig<acc_t> make_config(const CrossEntropyProblem& p, int64_t ignore_index, double label_smoothing) {
  CrossEntropyConfig<acc_t> cfg;
  cfg.num_classes = p.num_classes;
  cfg.ignore_index = ignore_index;
  cfg.label_smoothing = static_cast<acc_t>(label_smoothing);
  cfg.smoothing_per_class = p.num_classes > 0 ? cfg.label_smoothing / static_cast<acc_t>(p.num_classes) : acc_t(0);
  cfg.class_weight_sum = p.class_weight_sum.has_value() ? p.class_weight_sum->data_ptr<acc_t>() : nullptr;
  cfg.mode = p.mode;
  cfg.cost = p.cost.has_value() ? p.cost->data_ptr<acc_t>() : nullptr;
  cfg.class_weight = p.class_weight.has_value() ? p.class_weight->data_ptr<acc_t>() : nullptr;
  return cfg;
}

// Output shapes: per-row losses for 'none' (the target's shape), else a scalar.
inline at::Tensor allocate_loss(const CrossEntropyProblem& p) {
  return p.reduction == Reduction::None ? at::empty(p.target.sizes(), p.input.options())
                                        : at::empty({}, p.input.options());
}

inline at::Tensor allocate_row_stats(const CrossEntropyProblem& p) {
  return at::empty({p.num_rows, p.num_stats}, p.input.options().dtype(acc_scalar_type(p.input.scalar_type())));
}

}  // namespace fused_losses
