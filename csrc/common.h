// Helpers shared by every op and device: accumulation types, argument parsing and checks,
// and a deterministic parallel sum for the CPU kernels.
#pragma once

#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <optional>
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

// The reduced loss of a forward over nothing: unless the reduction is 'none', NaN for 'mean' (0 / 0, as
// torch.mean of nothing) or 0 for 'sum'.
inline void fill_empty_reduction(at::Tensor& loss, Reduction reduction) {
  if (reduction != Reduction::None) loss.fill_(reduction == Reduction::Mean ? NAN : 0.0);
}

// The same for a forward that also outputs the total weight (0).
inline void fill_empty_reduction(at::Tensor& loss, at::Tensor& total_weight, Reduction reduction) {
  total_weight.zero_();
  fill_empty_reduction(loss, reduction);
}

// ----------------------------------------------------------------------------------------------------------
// Schedules of a reduced loss (docs/design.md, "Schedules and bytes").
//
// 3-pass: the forward reads the inputs and saves O(rows); the backward re-reads them and writes the gradient.
// 2-pass: when an input requires grad (Python passes write_gradient, or one flag per differentiable input),
// the forward also writes its gradient for grad_loss = 1 into a tensor of that input's shape. The backward's
// in-place op then leaves that tensor as it is when grad_loss is 1 (compared where grad_loss lives: on the
// device for CUDA, no host synchronisation) and otherwise recomputes it from the inputs for the actual
// grad_loss, exactly as the 3-pass backward would. Autograd hands that tensor out once; a second backward
// (retain_graph) takes the 3-pass backward (fused_losses/_registrations.py).

// A forward's gradient output for `like` (the tensor it differentiates): like's shape (contiguous) when the
// flag named `flag_name` asks for it, else an empty (0,) tensor.
inline at::Tensor allocate_forward_gradient(const at::Tensor& like, const char* flag_name, bool write_gradient,
                                            Reduction reduction) {
  TORCH_CHECK_VALUE(!write_gradient || reduction != Reduction::None, flag_name,
                    " needs a reduced loss (reduction='mean' or 'sum'): with reduction='none' the backward must read "
                    "grad_loss for every element anyway");
  return write_gradient ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
}

// The gradient argument `name` of an in-place backward: what allocate_forward_gradient wrote for `like` (the
// argument `like_name`).
inline void check_forward_gradient(const at::Tensor& gradient, const char* name, const at::Tensor& like,
                                   const char* like_name, Reduction reduction) {
  TORCH_CHECK_VALUE(reduction != Reduction::None, "the in-place backward needs a reduced loss, got reduction='none'");
  TORCH_CHECK_VALUE(gradient.sizes() == like.sizes() && gradient.is_contiguous(), name,
                    " must be a contiguous tensor of the ", like_name, "'s shape ", like.sizes(), ", got shape ",
                    gradient.sizes());
  TORCH_CHECK_TYPE(gradient.scalar_type() == like.scalar_type(), name, " must have the ", like_name, "'s dtype ",
                   like.scalar_type(), ", got ", gradient.scalar_type());
  TORCH_CHECK_VALUE(gradient.device() == like.device(), name, " must be on the ", like_name, "'s device ",
                    like.device(), ", got ", gradient.device());
}

// Whether the in-place backward keeps the forward's gradient: grad_loss (a CPU scalar) is 1.
inline bool is_unit_grad_loss_cpu(const at::Tensor& grad_loss) { return grad_loss.item<double>() == 1.0; }

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of the CPU's parallel loops and deterministic sums for a problem of `num_elements`: blocks of about
// kBlockElements; a problem of fewer than kMinBlocks such blocks is cut into a power of two of blocks, at most
// kMinBlocks of at least kMinBlockElements, so that 2, 4 or 8 threads share it evenly (4096 rows of 10 classes
// were a block of 3276 rows and one of 820: one of two threads did 80% of the work). A function of the problem's
// size alone: the blocks, hence the sums, are the same for any thread count.
constexpr int64_t kBlockElements = 32768, kMinBlockElements = 8192, kMinBlocks = 8;

inline int64_t num_blocks_for(int64_t num_elements) {
  if (num_elements >= kMinBlocks * kBlockElements) return ceil_div(num_elements, kBlockElements);
  int64_t blocks = 1;
  while (blocks < kMinBlocks && 2 * blocks * kMinBlockElements <= num_elements) blocks *= 2;
  return blocks;
}

// Deterministic parallel sum of `Width` quantities over `count` items: the items are cut into fixed blocks of
// `block_size` (independent of the thread count), `block_sum(begin, end)` sums one block (an array of `Width`
// float or double sums: a block whose items are many, millions of rows over a few blocks, sums in double), and the
// block sums are added in block order, in double, then rounded to acc_t once: a float total of millions of
// terms drifted by 1e-4 (torch's own sums are cascaded). The result is bitwise identical for any number of
// threads.
template <typename acc_t, size_t Width, typename BlockSum>
std::array<acc_t, Width> deterministic_parallel_sum(int64_t count, int64_t block_size, const BlockSum& block_sum) {
  using Partial = decltype(block_sum(int64_t(0), int64_t(0)));
  std::array<acc_t, Width> result{};
  if (count <= 0) return result;
  const int64_t num_blocks = ceil_div(count, block_size);
  std::vector<Partial> partials(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t begin = block * block_size;
      partials[block] = block_sum(begin, std::min(count, begin + block_size));
    }
  });
  std::array<double, Width> total{};
  for (const auto& partial : partials)
    for (size_t k = 0; k < Width; ++k) total[k] += static_cast<double>(partial[k]);
  for (size_t k = 0; k < Width; ++k) result[k] = static_cast<acc_t>(total[k]);
  return result;
}

// Items per block for `num_items` items of `item_size` elements each: num_blocks_for's count of blocks, the items
// spread evenly over them.
inline int64_t items_per_block(int64_t item_size, int64_t num_items) {
  const int64_t size = std::max<int64_t>(1, item_size);
  return std::max<int64_t>(1, ceil_div(num_items, num_blocks_for(size * num_items)));
}

// ----------------------------------------------------------------------------------------------------------
// Elementwise operands: broadcasting checks and strided layouts.
//
// An elementwise op reads several operands of one logical shape (the input's), some of them broadcast views
// with stride 0. StridedLayout describes them after merging adjacent dimensions that every operand can
// address as one, so a contiguous problem becomes one dimension and a per-last-dim vector two; kernels then
// map a flat (row-major) element index to each operand's offset without any operand being copied.

// `tensor` viewed with `shape` (stride 0 along broadcast dimensions), or a clear error naming `name`.
inline at::Tensor expand_operand(const at::Tensor& tensor, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(at::is_expandable_to(tensor.sizes(), shape), name, " of shape ", tensor.sizes(),
                    " is not broadcastable to the input's shape ", shape);
  return tensor.expand(shape);
}

constexpr int kMaxLayoutDims = 8;

template <int NumOperands>
struct StridedLayout {
  int dims = 0;
  int64_t sizes[kMaxLayoutDims] = {};
  int64_t strides[NumOperands][kMaxLayoutDims] = {};  // in elements; all 0 for an absent operand

  C10_HOST_DEVICE int64_t inner_size() const { return dims > 0 ? sizes[dims - 1] : 1; }
  C10_HOST_DEVICE int64_t inner_stride(int operand) const { return dims > 0 ? strides[operand][dims - 1] : 1; }

  // Offsets of the element with row-major index `flat` in every operand.
  C10_HOST_DEVICE void offsets(int64_t flat, int64_t (&out)[NumOperands]) const {
    for (int k = 0; k < NumOperands; ++k) out[k] = 0;
    for (int d = dims - 1; d >= 0; --d) {
      const int64_t index = flat % sizes[d];
      flat /= sizes[d];
      for (int k = 0; k < NumOperands; ++k) out[k] += index * strides[k][d];
    }
  }
};

// The layout of `operands` (nullptr: absent), each of exactly `shape`. With `coalesce`, dimensions of size 1
// are dropped and neighbours merged where every operand allows it; without, the dimensions stay as they are
// (kernels that walk rows need them). nullopt when more than kMaxLayoutDims dimensions remain: the caller
// then makes its operands contiguous.
template <int NumOperands>
std::optional<StridedLayout<NumOperands>> make_strided_layout(at::IntArrayRef shape,
                                                              const std::array<const at::Tensor*, NumOperands>& operands,
                                                              bool coalesce) {
  struct Dim {
    int64_t size;
    std::array<int64_t, NumOperands> strides;
  };
  std::vector<Dim> dims;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (coalesce && shape[d] == 1) continue;
    Dim dim{shape[d], {}};
    for (int k = 0; k < NumOperands; ++k) dim.strides[k] = operands[k] != nullptr ? operands[k]->stride(d) : 0;
    const bool merges_into_previous =
        coalesce && !dims.empty() && [&] {
          for (int k = 0; k < NumOperands; ++k) {
            if (dims.back().strides[k] != dim.strides[k] * dim.size) return false;
          }
          return true;
        }();
    if (merges_into_previous) {
      dims.back().size *= dim.size;
      dims.back().strides = dim.strides;
    } else {
      dims.push_back(dim);
    }
  }
  if (dims.size() > static_cast<size_t>(kMaxLayoutDims)) return std::nullopt;
  StridedLayout<NumOperands> layout;
  layout.dims = static_cast<int>(dims.size());
  for (int d = 0; d < layout.dims; ++d) {
    layout.sizes[d] = dims[d].size;
    for (int k = 0; k < NumOperands; ++k) layout.strides[k][d] = dims[d].strides[k];
  }
  return layout;
}

}  // namespace fused_losses
