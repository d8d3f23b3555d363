// CUDA kernels of fused_losses::cost_sensitive_cross_entropy.
//
// Schedule (3 passes over the logits' bytes): the forward reads each row once (online softmax, argmax,
// expected cost and smoothing sums in one sweep), writes O(rows) statistics and one partial sum per block;
// a one-block kernel adds the partials in a fixed order. The backward re-reads each row and writes the
// gradient once. A group of G lanes owns a row: G = 1 for tiny or strided rows (consecutive threads read
// consecutive memory), 4 for small C, a whole warp for C in the hundreds and beyond.
#include "cost_sensitive_cross_entropy.h"
#include "cuda/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fused_losses::cuda {
namespace {

// Lanes per row for a row of `units` loads (16-byte vectors or single elements).
int lanes_per_row(int64_t units, bool strided) {
  if (strided || units <= 4) return 1;
  return units <= 64 ? 4 : kWarpSize;
}

template <typename F>
void dispatch_lanes_per_row(int lanes, const F& f) {
  switch (lanes) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, kWarpSize>{});
  }
}

// How a kernel reads rows: vectorised when every row starts 16-byte aligned and holds whole vectors.
template <typename scalar_t>
bool rows_vectorizable(const void* base, const RowLayout& layout, int64_t num_classes) {
  constexpr int vec = kVecSize<scalar_t>;
  return layout.inner == 1 && layout.class_stride == 1 && num_classes % vec == 0 && layout.outer_stride % vec == 0 &&
         is_aligned_16(base);
}

template <typename scalar_t, int Group>
__device__ void scan_lane_elements(RowScan<acc_type<scalar_t>>& scan, const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                   const scalar_t* __restrict__ row, int64_t class_stride, bool vectorized,
                                   const acc_type<scalar_t>* cost_row, int lane) {
  using acc_t = acc_type<scalar_t>;
  const bool read_weights = cfg.label_smoothing != acc_t(0) && cfg.class_weight != nullptr;
  auto add = [&](acc_t z, int64_t j) {
    scan.add(z, j, cost_row != nullptr ? cost_row[j] : acc_t(0), read_weights ? cfg.class_weight[j] : acc_t(1));
  };
  const int64_t C = cfg.num_classes;
  if (vectorized) {
    constexpr int vec = kVecSize<scalar_t>;
    for (int64_t v = lane; v < C / vec; v += Group) {
      const auto pack = load_pack(row + v * vec);
#pragma unroll
      for (int k = 0; k < vec; ++k) add(static_cast<acc_t>(pack.values[k]), v * vec + k);
    }
  } else {
    for (int64_t j = lane; j < C; j += Group) add(static_cast<acc_t>(row[j * class_stride]), j);
  }
}

template <int Group, typename acc_t>
__device__ void merge_group(RowScan<acc_t>& scan) {
  for (int offset = Group / 2; offset > 0; offset /= 2) {
    RowScan<acc_t> other;
    other.max = group_xor<Group>(scan.max, offset);
    other.sum_exp = group_xor<Group>(scan.sum_exp, offset);
    other.cost_exp = group_xor<Group>(scan.cost_exp, offset);
    other.weighted_logit_sum = group_xor<Group>(scan.weighted_logit_sum, offset);
    other.best_value = group_xor<Group>(scan.best_value, offset);
    other.best_index = group_xor<Group>(scan.best_index, offset);
    scan.merge(other);
  }
}

template <typename scalar_t, int Group>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, RowLayout layout,
                   int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> cfg, bool vectorized, int num_stats,
                   acc_type<scalar_t>* __restrict__ stats, scalar_t* __restrict__ row_losses,
                   acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  const int lane = threadIdx.x % Group;
  const int64_t C = cfg.num_classes;
  acc_t sums[2] = {0, 0};  // loss, class weight of the counted rows
  // Every thread runs the same number of iterations, so the group shuffles below never diverge.
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerIteration; first < num_rows;
       first += int64_t(gridDim.x) * kRowsPerIteration) {
    const int64_t row = first + threadIdx.x / Group;
    const bool in_range = row < num_rows;
    const int64_t y = in_range ? target[row] : cfg.ignore_index;
    const TargetKind kind = classify_target(y, C, cfg.ignore_index);
    const scalar_t* row_ptr = input + (in_range ? layout.row_offset(row) : 0);
    RowScan<acc_t> scan;
    if (kind == TargetKind::Valid) {
      const acc_t* cost_row = cfg.cost != nullptr && cfg.mode == CostMode::Expected ? cfg.cost + y * C : nullptr;
      scan_lane_elements<scalar_t, Group>(scan, cfg, row_ptr, layout.class_stride, vectorized, cost_row, lane);
    }
    merge_group<Group>(scan);
    if (lane != 0 || !in_range) continue;
    acc_t row_loss = 0;
    RowLoss<acc_t> result{};  // ignored and invalid rows save zeros (the backward does not read them)
    if (kind == TargetKind::Valid) {
      result = finish_row(cfg, scan, y, static_cast<acc_t>(row_ptr[y * layout.class_stride]));
      row_loss = result.loss();
      sums[1] += class_weight_of(cfg, y);
    } else if (kind == TargetKind::Invalid) {
      row_loss = std::numeric_limits<acc_t>::quiet_NaN();  // never a silent number for a bad label
    }
    store_row_stats(stats + row * num_stats, num_stats, result);
    sums[0] += row_loss;
    if (row_losses != nullptr) row_losses[row] = static_cast<scalar_t>(row_loss);
  }
  block_sum<acc_t, 2>(sums);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 2] = sums[0];
    partials[blockIdx.x * 2 + 1] = sums[1];
  }
}

template <typename scalar_t, int Group>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, RowLayout layout,
                    RowLayout grad_layout, int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> cfg,
                    bool vectorized, int num_stats, const acc_type<scalar_t>* __restrict__ stats,
                    const scalar_t* __restrict__ grad_loss, Reduction reduction,
                    const acc_type<scalar_t>* __restrict__ total_weight, scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  constexpr int vec = kVecSize<scalar_t>;
  const int lane = threadIdx.x % Group;
  const int64_t C = cfg.num_classes;
  acc_t uniform_scale = 0;
  if (reduction != Reduction::None) {
    uniform_scale = static_cast<acc_t>(grad_loss[0]);
    if (reduction == Reduction::Mean) uniform_scale /= *total_weight;
  }
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerIteration + threadIdx.x / Group; row < num_rows;
       row += int64_t(gridDim.x) * kRowsPerIteration) {
    const int64_t y = target[row];
    const scalar_t* in_row = input + layout.row_offset(row);
    scalar_t* out_row = grad + grad_layout.row_offset(row);
    const TargetKind kind = classify_target(y, C, cfg.ignore_index);
    if (kind != TargetKind::Valid) {
      const scalar_t fill = static_cast<scalar_t>(kind == TargetKind::Ignored ? acc_t(0)
                                                                              : std::numeric_limits<acc_t>::quiet_NaN());
      for (int64_t j = lane; j < C; j += Group) out_row[j * grad_layout.class_stride] = fill;
      continue;
    }
    const acc_t scale = reduction == Reduction::None ? static_cast<acc_t>(grad_loss[row]) : uniform_scale;
    const auto k = make_gradient_coefficients(cfg, stats + row * num_stats, num_stats, y, scale);
    const acc_t* cost_row = k.b != acc_t(0) ? cfg.cost + y * C : nullptr;
    if (vectorized) {
      for (int64_t v = lane; v < C / vec; v += Group) {
        auto pack = load_pack(in_row + v * vec);
#pragma unroll
        for (int e = 0; e < vec; ++e) {
          const int64_t j = v * vec + e;
          pack.values[e] = static_cast<scalar_t>(
              gradient_element(k, cfg, cost_row, static_cast<acc_t>(pack.values[e]), j, y));
        }
        store_pack(out_row + v * vec, pack);
      }
    } else {
      for (int64_t j = lane; j < C; j += Group) {
        const acc_t z = static_cast<acc_t>(in_row[j * layout.class_stride]);
        out_row[j * grad_layout.class_stride] = static_cast<scalar_t>(gradient_element(k, cfg, cost_row, z, j, y));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& cost_matrix,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, c10::string_view reduction,
                                                            double label_smoothing, c10::string_view cost_mode) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  at::Tensor loss = allocate_loss(p);
  at::Tensor row_stats = allocate_row_stats(p);
  at::Tensor total_weight = at::empty({}, row_stats.options());
  if (p.num_rows == 0) {
    fill_empty_reduction(loss, total_weight, p.reduction);
    return {loss, row_stats, total_weight};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cost_sensitive_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto cfg = make_config<acc_t>(p, ignore_index, label_smoothing);
    const scalar_t* in = p.input.const_data_ptr<scalar_t>();
    const bool vectorized = rows_vectorizable<scalar_t>(in, p.layout, p.num_classes);
    const int64_t units = vectorized ? p.num_classes / kVecSize<scalar_t> : p.num_classes;
    dispatch_lanes_per_row(lanes_per_row(units, p.layout.class_stride != 1), [&](auto lanes) {
      constexpr int Group = decltype(lanes)::value;
      const int64_t blocks = grid_size(p.num_rows, kBlockThreads / Group);
      at::Tensor partials = at::empty({blocks, 2}, row_stats.options());
      forward_kernel<scalar_t, Group><<<blocks, kBlockThreads, 0, stream>>>(
          in, p.target.const_data_ptr<int64_t>(), p.layout, p.num_rows, cfg, vectorized, p.num_stats,
          row_stats.data_ptr<acc_t>(), p.reduction == Reduction::None ? loss.data_ptr<scalar_t>() : nullptr,
          partials.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const ReducedLossEpilogue<scalar_t> epilogue{p.reduction == Reduction::None ? nullptr : loss.data_ptr<scalar_t>(),
                                               total_weight.data_ptr<acc_t>(), p.reduction == Reduction::Mean};
      launch_reduce_partials<acc_t, 2>(partials.const_data_ptr<acc_t>(), blocks, epilogue, stream);
    });
  });
  return {loss, row_stats, total_weight};
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& cost_matrix, const std::optional<at::Tensor>& weight,
                         const at::Tensor& row_stats, const at::Tensor& total_weight, int64_t ignore_index,
                         c10::string_view reduction, double label_smoothing, c10::string_view cost_mode) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor grad = grad_loss.to(p.input.scalar_type()).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const RowLayout grad_layout = contiguous_row_layout(grad_input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "cost_sensitive_cross_entropy_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto cfg = make_config<acc_t>(p, ignore_index, label_smoothing);
    const scalar_t* in = p.input.const_data_ptr<scalar_t>();
    const bool vectorized = rows_vectorizable<scalar_t>(in, p.layout, p.num_classes) &&
                            rows_vectorizable<scalar_t>(grad_input.const_data_ptr<scalar_t>(), grad_layout,
                                                        p.num_classes);
    const int64_t units = vectorized ? p.num_classes / kVecSize<scalar_t> : p.num_classes;
    dispatch_lanes_per_row(lanes_per_row(units, p.layout.class_stride != 1), [&](auto lanes) {
      constexpr int Group = decltype(lanes)::value;
      const int64_t blocks = grid_size(p.num_rows, kBlockThreads / Group);
      backward_kernel<scalar_t, Group><<<blocks, kBlockThreads, 0, stream>>>(
          in, p.target.const_data_ptr<int64_t>(), p.layout, grad_layout, p.num_rows, cfg, vectorized, p.num_stats,
          stats.const_data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(), p.reduction,
          total_weight.const_data_ptr<acc_t>(), grad_input.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("cost_sensitive_cross_entropy", &forward_cuda);
  m.impl("cost_sensitive_cross_entropy_backward", &backward_cuda);
}

}  // namespace fused_losses::cuda
