// CUDA kernels of fused_losses::cost_sensitive_cross_entropy.
//
// Schedules (common.h): the forward reads each row once (online softmax, argmax, expected cost and smoothing
// sums in one sweep), writes O(rows) statistics and one partial sum per block; a one-block kernel adds the
// partials in a fixed order. The backward re-reads each row and writes the gradient once (3-pass). With
// write_gradient (a reduced loss whose input requires grad) a pre-pass over the targets first sums their
// class weights exactly as the forward does (same rows per thread, block sums and final reduce: the same
// bits) into total_weight, which the forward reads on the device for the scale of 'mean'; after its scan a
// row's group sweeps the row again (from L1/L2) and writes its gradient for grad_loss = 1 with the backward's
// coefficients and element code. The in-place backward then returns at once in every thread when grad_loss,
// read on the device, is 1 (no host synchronisation), and otherwise recomputes as the 3-pass backward (2-pass).
// A group of G lanes owns a row: G = 1 for tiny or strided rows (consecutive threads read consecutive
// memory), 4 for small C, a whole warp for C in the hundreds and beyond.
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

// Lane 0's result of the row in every lane of the group; every lane of the warp must call it.
template <int Group, typename acc_t>
__device__ RowLoss<acc_t> broadcast_row_loss(const RowLoss<acc_t>& row) {
  RowLoss<acc_t> all;
  all.max = group_broadcast<Group>(row.max);
  all.log_sum = group_broadcast<Group>(row.log_sum);
  all.cost_factor = group_broadcast<Group>(row.cost_factor);
  all.cross_entropy = group_broadcast<Group>(row.cross_entropy);
  return all;
}

// The lanes of a group write one row's gradient: zeros for an ignored row, NaN for an invalid one, else
// d loss / d z for `scale` (grad_loss, over the total weight for 'mean') from the row's statistics.
// `vectorized`: the input and the output rows are both vectorizable.
template <typename scalar_t, int Group>
__device__ void store_row_gradient(const CrossEntropyConfig<acc_type<scalar_t>>& cfg, TargetKind kind, int64_t y,
                                   const acc_type<scalar_t>* row_stats, int num_stats, acc_type<scalar_t> scale,
                                   const scalar_t* __restrict__ in_row, int64_t in_class_stride,
                                   scalar_t* __restrict__ out_row, int64_t out_class_stride, bool vectorized,
                                   int lane) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  const int64_t C = cfg.num_classes;
  if (kind != TargetKind::Valid) {
    const scalar_t fill = static_cast<scalar_t>(kind == TargetKind::Ignored ? acc_t(0)
                                                                            : std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t j = lane; j < C; j += Group) out_row[j * out_class_stride] = fill;
    return;
  }
  const auto k = make_gradient_coefficients(cfg, row_stats, num_stats, y, scale);
  const acc_t* cost_row = k.b != acc_t(0) ? cfg.cost + y * C : nullptr;
  if (vectorized) {
    for (int64_t v = lane; v < C / vec; v += Group) {
      auto pack = load_pack(in_row + v * vec);
#pragma unroll
      for (int e = 0; e < vec; ++e) {
        const int64_t j = v * vec + e;
        pack.values[e] =
            static_cast<scalar_t>(gradient_element(k, cfg, cost_row, static_cast<acc_t>(pack.values[e]), j, y));
      }
      store_pack(out_row + v * vec, pack);
    }
  } else {
    for (int64_t j = lane; j < C; j += Group) {
      const acc_t z = static_cast<acc_t>(in_row[j * in_class_stride]);
      out_row[j * out_class_stride] = static_cast<scalar_t>(gradient_element(k, cfg, cost_row, z, j, y));
    }
  }
}

// Where the forward that also writes the gradient (for grad_loss = 1) puts it.
template <typename scalar_t>
struct ForwardGradientArgs {
  scalar_t* out = nullptr;  // contiguous, the input's shape
  RowLayout layout{};       // of out
  bool vectorized = false;  // the input and the output rows are both vectorizable
  bool mean = false;
  const acc_type<scalar_t>* total_weight = nullptr;  // written by target_weight_kernel, read on the device
};

// The pre-pass of the forward that writes the gradient: the class weights of the valid targets, added with
// forward_kernel's rows per thread and block sum (its sums[1]), so that launch_reduce_partials turns the
// partials into bitwise the total weight the forward outputs.
template <int Group, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    target_weight_kernel(const int64_t* __restrict__ target, int64_t num_rows, CrossEntropyConfig<acc_t> cfg,
                         acc_t* __restrict__ partials) {
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  acc_t weight[1] = {0};
  if (threadIdx.x % Group == 0) {  // in the forward, a row's lane 0 counts it
    for (int64_t row = int64_t(blockIdx.x) * kRowsPerIteration + threadIdx.x / Group; row < num_rows;
         row += int64_t(gridDim.x) * kRowsPerIteration) {
      const int64_t y = target[row];
      if (classify_target(y, cfg.num_classes, cfg.ignore_index) == TargetKind::Valid) {
        weight[0] += class_weight_of(cfg, y);
      }
    }
  }
  store_block_partials<acc_t, 1>(weight, partials);
}

template <typename scalar_t, int Group, bool kWriteGradient>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, RowLayout layout,
                   int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> cfg, bool vectorized, int num_stats,
                   acc_type<scalar_t>* __restrict__ stats, scalar_t* __restrict__ row_losses,
                   acc_type<scalar_t>* __restrict__ partials, ForwardGradientArgs<scalar_t> gradient) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  const int lane = threadIdx.x % Group;
  const int64_t C = cfg.num_classes;
  acc_t sums[2] = {0, 0};  // loss, class weight of the counted rows
  // The backward's scale for grad_loss = 1.
  const acc_t gradient_scale =
      kWriteGradient ? reduced_gradient_scale(acc_t(1), gradient.mean, *gradient.total_weight) : acc_t(0);
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
    RowLoss<acc_t> result{};  // ignored and invalid rows save zeros (the backward does not read them)
    if (lane == 0 && in_range) {
      acc_t row_loss = 0;
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
    if constexpr (kWriteGradient) {
      // The group's second sweep over the row (in L1/L2), from the statistics the backward would read.
      acc_t row_stats[kMaxRowStats];
      store_row_stats(row_stats, num_stats, broadcast_row_loss<Group>(result));
      if (in_range) {
        store_row_gradient<scalar_t, Group>(cfg, kind, y, row_stats, num_stats, gradient_scale, row_ptr,
                                            layout.class_stride, gradient.out + gradient.layout.row_offset(row),
                                            gradient.layout.class_stride, gradient.vectorized, lane);
      }
    }
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
                    const acc_type<scalar_t>* __restrict__ total_weight, bool skip_unit_grad_loss,
                    scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  // In-place backward with grad_loss 1: the forward's gradient stands (every thread returns).
  if (skip_unit_grad_loss && static_cast<acc_t>(grad_loss[0]) == acc_t(1)) return;
  const int lane = threadIdx.x % Group;
  const acc_t uniform_scale =
      reduction == Reduction::None
          ? acc_t(0)
          : reduced_gradient_scale(static_cast<acc_t>(grad_loss[0]), reduction == Reduction::Mean, *total_weight);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerIteration + threadIdx.x / Group; row < num_rows;
       row += int64_t(gridDim.x) * kRowsPerIteration) {
    const int64_t y = target[row];
    const TargetKind kind = classify_target(y, cfg.num_classes, cfg.ignore_index);
    const acc_t scale = reduction == Reduction::None ? static_cast<acc_t>(grad_loss[row]) : uniform_scale;
    store_row_gradient<scalar_t, Group>(cfg, kind, y, stats + row * num_stats, num_stats, scale,
                                        input + layout.row_offset(row), layout.class_stride,
                                        grad + grad_layout.row_offset(row), grad_layout.class_stride, vectorized,
                                        lane);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, c10::string_view cost_mode, bool write_gradient) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  at::Tensor loss = allocate_loss(p);
  at::Tensor row_stats = allocate_row_stats(p);
  at::Tensor total_weight = at::empty({}, row_stats.options());
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  if (p.num_rows == 0) {
    fill_empty_reduction(loss, total_weight, p.reduction);
    return {loss, row_stats, total_weight, gradient};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cost_sensitive_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto cfg = make_config<acc_t>(p, ignore_index, label_smoothing);
    const scalar_t* in = p.input.const_data_ptr<scalar_t>();
    const bool vectorized = rows_vectorizable<scalar_t>(in, p.layout, p.num_classes);
    ForwardGradientArgs<scalar_t> gradient_args;
    if (write_gradient) {
      gradient_args.out = gradient.data_ptr<scalar_t>();
      gradient_args.layout = contiguous_row_layout(gradient);
      gradient_args.vectorized =
          vectorized && rows_vectorizable<scalar_t>(gradient_args.out, gradient_args.layout, p.num_classes);
      gradient_args.mean = p.reduction == Reduction::Mean;
      gradient_args.total_weight = total_weight.const_data_ptr<acc_t>();
    }
    const int64_t units = vectorized ? p.num_classes / kVecSize<scalar_t> : p.num_classes;
    dispatch_lanes_per_row(lanes_per_row(units, p.layout.class_stride != 1), [&](auto lanes) {
      constexpr int Group = decltype(lanes)::value;
      const int64_t blocks = grid_size(p.num_rows, kBlockThreads / Group);
      const auto launch_forward = [&](auto write_gradient_tag, acc_t* partials) {
        launch_kernel(forward_kernel<scalar_t, Group, decltype(write_gradient_tag)::value>, blocks, stream,
            in, p.target.const_data_ptr<int64_t>(), p.layout, p.num_rows, cfg, vectorized, p.num_stats,
            row_stats.data_ptr<acc_t>(), p.reduction == Reduction::None ? loss.data_ptr<scalar_t>() : nullptr,
            partials, gradient_args);
      };
      at::Tensor partials = at::empty({blocks, 2}, row_stats.options());
      if (write_gradient) {
        // The pre-pass: total_weight first, as the final reduce below writes it again (the same bits).
        at::Tensor weight_partials = at::empty({blocks}, row_stats.options());
        launch_kernel(target_weight_kernel<Group, acc_t>, blocks, stream,
            p.target.const_data_ptr<int64_t>(), p.num_rows, cfg, weight_partials.data_ptr<acc_t>());
        launch_reduce_partials<acc_t, 1>(weight_partials.const_data_ptr<acc_t>(), blocks,
                                         StoreTotalEpilogue<acc_t>{total_weight.data_ptr<acc_t>()}, stream);
        launch_forward(std::true_type{}, partials.data_ptr<acc_t>());
      } else {
        launch_forward(std::false_type{}, partials.data_ptr<acc_t>());
      }
      const ReducedLossEpilogue<scalar_t> epilogue{p.reduction == Reduction::None ? nullptr : loss.data_ptr<scalar_t>(),
                                               total_weight.data_ptr<acc_t>(), p.reduction == Reduction::Mean};
      launch_reduce_partials<acc_t, 2>(partials.const_data_ptr<acc_t>(), blocks, epilogue, stream);
    });
  });
  return {loss, row_stats, total_weight, gradient};
}

// Writes the gradient for grad_loss into `grad_input` (contiguous, the input's shape); with
// `skip_unit_grad_loss`, nothing when grad_loss is 1 (checked on the device).
void backward_into(const CrossEntropyProblem& p, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                   const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                   bool skip_unit_grad_loss, at::Tensor& grad_input) {
  if (grad_input.numel() == 0) return;
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
      launch_kernel(backward_kernel<scalar_t, Group>, blocks, stream,
          in, p.target.const_data_ptr<int64_t>(), p.layout, grad_layout, p.num_rows, cfg, vectorized, p.num_stats,
          stats.const_data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(), p.reduction,
          total_weight.const_data_ptr<acc_t>(), skip_unit_grad_loss, grad_input.data_ptr<scalar_t>());
    });
  });
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
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing,
                /*skip_unit_grad_loss=*/false, grad_input);
  return grad_input;
}

void backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                           const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
                           const std::optional<at::Tensor>& weight, const at::Tensor& row_stats,
                           const at::Tensor& total_weight, int64_t ignore_index, c10::string_view reduction,
                           double label_smoothing, c10::string_view cost_mode) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing,
                /*skip_unit_grad_loss=*/true, gradient);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("cost_sensitive_cross_entropy", &forward_cuda);
  m.impl("cost_sensitive_cross_entropy_backward", &backward_cuda);
  m.impl("cost_sensitive_cross_entropy_backward_inplace", &backward_inplace_cuda);
}

}  // namespace fused_losses::cuda
