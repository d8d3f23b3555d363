// Host-side argument checking and problem set-up of the weighted / focal / asymmetric BCE with logits,
// shared by the CPU and CUDA implementations.
#pragma once

#include "bce_math.h"
#include "common.h"

#include <cmath>
#include <optional>
#include <string_view>

namespace fused_losses {

// The element-shaped operands of the op, in the order of StridedLayout's strides.
enum BceOperand : int { kLogits = 0, kTarget, kWeight, kPosWeight, kGradLoss, kNumBceOperands };

using BceLayout = StridedLayout<kNumBceOperands>;

// Everything a kernel needs about one call, after checking the arguments.
struct BceProblem {
  at::Tensor input;
  std::optional<at::Tensor> target;            // dense: the input's shape, its own dtype (soft, bool or uint8)
  std::optional<at::Tensor> positive_indices;  // sparse: (N, K) contiguous int64, -1 = padding
  std::optional<at::Tensor> weight;            // accumulation dtype, broadcast views of the input's shape
  std::optional<at::Tensor> pos_weight;
  std::optional<at::Tensor> grad_loss;  // backward of reduction='none': the input's shape and dtype
  std::optional<at::Tensor> grad_loss_scalar;  // backward of 'mean' / 'sum': 0-dim, the input's dtype
  int64_t numel = 0;
  int64_t num_labels = 1;     // size of the last dimension (1 for a 0-dim input)
  int64_t max_positives = 0;  // K
  Reduction reduction = Reduction::Mean;
  double gamma_pos = 0, gamma_neg = 0, clip = 0;
  // Dense: merged dimensions. Sparse: exactly (N, L), so that kernels can walk rows.
  BceLayout layout;

  bool sparse() const { return positive_indices.has_value(); }
  int64_t num_rows() const { return numel / std::max<int64_t>(1, num_labels); }
  template <typename acc_t>
  BceConfig<acc_t> config() const {
    return make_bce_config<acc_t>(gamma_pos, gamma_neg, clip);
  }
  template <typename T>
  const T* data(BceOperand operand) const {
    const std::optional<at::Tensor>* tensors[] = {nullptr, &target, &weight, &pos_weight, &grad_loss};
    if (operand == kLogits) return input.const_data_ptr<T>();
    const auto& tensor = *tensors[operand];
    return tensor.has_value() ? tensor->const_data_ptr<T>() : nullptr;
  }
};

inline void check_dense_target(const at::Tensor& input, const at::Tensor& target) {
  const auto type = target.scalar_type();
  TORCH_CHECK_TYPE(type == input.scalar_type() || type == at::kFloat || type == at::kBool || type == at::kByte,
                   "target must be a float tensor of the input's dtype (", input.scalar_type(),
                   ") or float32, bool or uint8 (for label indices pass positive_indices), got ", type);
  check_same_device(input, "input", target, "target");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "target must have the input's shape ", input.sizes(), ", got ",
                    target.sizes());
}

inline void check_positive_indices(const at::Tensor& input, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(input.dim() == 2, "input must have shape (N, L) when positive_indices is given, got ",
                    input.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "positive_indices must be int64 label indices, got ",
                   indices.scalar_type());
  check_same_device(input, "input", indices, "positive_indices");
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == input.size(0),
                    "positive_indices must have shape (N, K) = (", input.size(0), ", K), padded with -1, got ",
                    indices.sizes());
}

// A weight given to the op: floating point, on the input's device, broadcastable to the input's shape.
// Converted to the accumulation dtype before it is expanded (a no-op for float32, a small copy for a (L,)
// weight of another dtype), then expanded as a stride-0 view: a broadcast is never materialised.
inline std::optional<at::Tensor> prepare_broadcast_weight(const std::optional<at::Tensor>& tensor, const char* name,
                                                          const at::Tensor& input) {
  if (!tensor.has_value()) return std::nullopt;
  check_floating_input(*tensor, name);
  check_same_device(input, "input", *tensor, name);
  return expand_operand(tensor->to(acc_scalar_type(input.scalar_type())), name, input.sizes());
}

inline BceLayout make_bce_layout(BceProblem& p) {
  const std::array<const at::Tensor*, kNumBceOperands> operands = {
      &p.input, p.target ? &*p.target : nullptr, p.weight ? &*p.weight : nullptr,
      p.pos_weight ? &*p.pos_weight : nullptr, p.grad_loss ? &*p.grad_loss : nullptr};
  if (auto layout = make_strided_layout<kNumBceOperands>(p.input.sizes(), operands, /*coalesce=*/!p.sparse())) return *layout;
  // Too many dimensions that cannot be merged (rare): copy every operand to a contiguous one, which merges.
  for (std::optional<at::Tensor>* tensor : {&p.target, &p.weight, &p.pos_weight, &p.grad_loss}) {
    if (tensor->has_value()) **tensor = (*tensor)->contiguous();
  }
  p.input = p.input.contiguous();
  return make_bce_layout(p);
}

// `grad_loss` is given for the backward only.
inline BceProblem make_bce_problem(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& positive_indices,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                                   std::string_view reduction, double gamma_pos, double gamma_neg, double clip,
                                   const std::optional<at::Tensor>& grad_loss = std::nullopt) {
  BceProblem p;
  check_floating_input(input, "input");
  TORCH_CHECK_VALUE(target.has_value() != positive_indices.has_value(),
                    "pass exactly one of target (dense) and positive_indices (sparse), got ",
                    target.has_value() ? "both" : "neither");
  p.reduction = parse_reduction(reduction);
  // An infinite exponent would turn the focusing factor's derivative into inf * 0 = NaN.
  TORCH_CHECK_VALUE(std::isfinite(gamma_pos) && std::isfinite(gamma_neg) && gamma_pos >= 0.0 && gamma_neg >= 0.0,
                    "gamma_pos and gamma_neg must be finite numbers >= 0, got ", gamma_pos, " and ", gamma_neg);
  TORCH_CHECK_VALUE(clip >= 0.0 && clip < 1.0, "clip must be in [0, 1), got ", clip);
  p.gamma_pos = gamma_pos;
  p.gamma_neg = gamma_neg;
  p.clip = clip;

  p.input = input;
  p.numel = input.numel();
  p.num_labels = input.dim() > 0 ? input.size(-1) : 1;
  if (target.has_value()) {
    check_dense_target(input, *target);
    p.target = *target;
  } else {
    check_positive_indices(input, *positive_indices);
    p.positive_indices = positive_indices->contiguous();
    p.max_positives = positive_indices->size(1);
  }
  p.weight = prepare_broadcast_weight(weight, "weight", input);
  p.pos_weight = prepare_broadcast_weight(pos_weight, "pos_weight", input);
  if (grad_loss.has_value()) {
    check_same_device(input, "input", *grad_loss, "grad_loss");
    if (p.reduction == Reduction::None) {
      TORCH_CHECK_VALUE(grad_loss->sizes() == input.sizes(), "grad_loss must have the input's shape ",
                        input.sizes(), " for reduction='none', got ", grad_loss->sizes());
      p.grad_loss = grad_loss->to(input.scalar_type());
    } else {
      TORCH_CHECK_VALUE(grad_loss->numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss->sizes());
      p.grad_loss_scalar = grad_loss->to(input.scalar_type()).reshape({});
    }
  }
  p.layout = make_bce_layout(p);
  return p;
}

// Every index must be a label in [0, L) or the padding -1. Reads the values, so the CPU op calls it on every
// call and CUDA only through FUSED_LOSSES_CHECK=1 (in Python); unchecked CUDA rows give NaN.
inline void check_positive_index_values(const BceProblem& p) {
  if (!p.sparse()) return;
  const int64_t* indices = p.positive_indices->const_data_ptr<int64_t>();
  const int64_t count = p.positive_indices->numel();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(indices[i] >= -1 && indices[i] < p.num_labels, "positive_indices contains ", indices[i],
                      " (row ", i / std::max<int64_t>(1, p.max_positives), "), outside [0, ", p.num_labels,
                      ") and not the padding value -1");
  }
}

// Tag type of the sparse target form for dispatch_bce_target.
struct SparseTargets {};

// Calls f(tag) with a value of the type the kernels read the target as: the dense target's own dtype (the
// input's, float32, bool or uint8: never converted) or SparseTargets.
template <typename scalar_t, typename F>
void dispatch_bce_target(const BceProblem& p, const F& f) {
  if (p.sparse()) return f(SparseTargets{});
  switch (p.target->scalar_type()) {
    case at::kBool: return f(bool{});
    case at::kByte: return f(uint8_t{});
    case at::kFloat: return f(float{});
    default: return f(scalar_t{});  // the input's dtype (check_dense_target allows nothing else)
  }
}

// The output of the forward: per-element losses (contiguous, the input's shape) or a scalar.
inline at::Tensor allocate_bce_loss(const BceProblem& p) {
  return p.reduction == Reduction::None ? at::empty(p.input.sizes(), p.input.options())
                                        : at::empty({}, p.input.options());
}

// Divides the summed loss (and its gradient) for 'mean': the mean over all elements, as PyTorch.
inline double bce_reduction_divisor(const BceProblem& p) {
  return p.reduction == Reduction::Mean ? static_cast<double>(p.numel) : 1.0;
}

}  // namespace fused_losses
