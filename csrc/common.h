// Helpers shared by every op and device: accumulation types, argument parsing and checks,
// and a deterministic parallel sum for the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <vector>

namespace fused_losses {

// Accumulate in float32, or float64 for double inputs (at::acc_type<float, /*is_cuda=*/false> is double,
// which would make the CPU and CUDA kernels disagree).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_scalar_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK_VALUE(false, "reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
}

// The reduced outputs of a forward over nothing: total weight 0 and, unless the reduction is 'none', a loss of
// NaN for 'mean' (0 / 0, as torch.mean of nothing) or 0 for 'sum'.
inline void fill_empty_reduction(at::Tensor& loss, at::Tensor& total_weight, Reduction reduction) {
  total_weight.zero_();
  if (reduction != Reduction::None) loss.fill_(reduction == Reduction::Mean ? NAN : 0.0);
}

inline void check_floating_input(const at::Tensor& tensor, const char* name) {
  const auto type = tensor.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble, name,
                   " must be float32, float16, bfloat16 or float64, got ", type);
}

inline void check_same_device(const at::Tensor& reference, const char* reference_name, const at::Tensor& other,
                              const char* other_name) {
  TORCH_CHECK_VALUE(other.device() == reference.device(), other_name, " must be on the same device as ",
                    reference_name, " (", reference.device(), "), got ", other.device());
}

// An optional per-class vector or matrix: floating point, on the input's device, of the given shape.
inline void check_optional_parameter(const std::optional<at::Tensor>& tensor, const char* name,
                                     const at::Tensor& input, at::IntArrayRef expected_shape) {
  if (!tensor.has_value()) return;
  check_floating_input(*tensor, name);
  check_same_device(input, "input", *tensor, name);
  TORCH_CHECK_VALUE(tensor->sizes() == expected_shape, name, " must have shape ", expected_shape, ", got ",
                    tensor->sizes());
}

// Deterministic parallel sum of `Width` quantities over `count` items: the items are cut into fixed blocks of
// `block_size` (independent of the thread count), `block_sum(begin, end)` sums one block, and the block sums
// are added in block order. The result is therefore bitwise identical for any number of threads.
template <typename acc_t, size_t Width, typename BlockSum>
std::array<acc_t, Width> deterministic_parallel_sum(int64_t count, int64_t block_size, const BlockSum& block_sum) {
  std::array<acc_t, Width> total{};
  if (count <= 0) return total;
  const int64_t num_blocks = (count + block_size - 1) / block_size;
  std::vector<std::array<acc_t, Width>> partials(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t begin = block * block_size;
      partials[block] = block_sum(begin, std::min(count, begin + block_size));
    }
  });
  for (const auto& partial : partials)
    for (size_t k = 0; k < Width; ++k) total[k] += partial[k];
  return total;
}

// Number of items per block for deterministic_parallel_sum, so that a block holds about `work_per_block`
// elements of `item_size` each.
inline int64_t items_per_block(int64_t item_size, int64_t work_per_block = 32768) {
  return std::max<int64_t>(1, work_per_block / std::max<int64_t>(1, item_size));
}

}  // namespace fused_losses
