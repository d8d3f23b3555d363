// CUDA kernels of fused_losses::weighted_bce_with_logits.
//
// Schedules (common.h): the forward reads the logits and the target once and writes the per-element losses
// for reduction='none', otherwise one partial sum per block that a one-block kernel adds in a fixed order (no
// float atomics: bitwise reproducible). With write_gradient (a reduced loss whose input requires grad) the
// same pass also writes the gradient for grad_loss = 1, and the in-place backward does nothing when grad_loss
// is 1 — read on the device, no host synchronisation — so forward + backward move the bytes once (2-pass).
// Otherwise the backward re-reads logits and target and writes the gradient once (3-pass). Either way any
// grad_output, retain_graph, torch.compile and CUDA graphs are correct.
//
// Three kernels, chosen on the host:
// - flat: dense targets whose logits, target and output are contiguous and reach 16-byte alignment at the same
//   element (a shared misalignment peels a short head). Each step of a thread handles kFlatElements
//   consecutive elements through 16-byte loads of the logits and of the target in its own dtype (16 bool /
//   uint8 targets per load). Weights are either contiguous (16-byte loads when aligned at the head, else
//   element loads) or vary along the last merged dimension only (a (L,) pos_weight): those are read through
//   the element's label. Compiled per focusing (plain / focal-ASL) and weights (none / some). Grid-stride loop
//   over a fixed grid (grid_size); the head and the numel % kFlatElements tail take one element per thread.
// - strided: every other dense layout (stride-0 broadcast views, transposed inputs), one element per step.
// - sparse rows: a warp per row evaluates every element as a negative (16-byte loads when rows are aligned; no
//   label test), then patches the row's positives from its K indices: a label listed twice counts once, an
//   index outside [-1, L) makes the row NaN. Labels go in chunks of kChunkLabels, so any L and K fit.
#include "cuda/cuda_utils.cuh"
#include "weighted_bce_with_logits.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace fused_losses::cuda {
namespace {

// Forward: sums (and for 'none' stores) the losses. Backward: stores the gradient. ForwardWithGradient: sums
// the losses and stores the gradient for grad_loss = 1.
enum class Pass { Forward, Backward, ForwardWithGradient };

// One element's contribution to the block's sum and the value stored for it.
template <typename acc_t>
struct ElementResult {
  acc_t summed, stored;
};

// The elementary functions of the kernels: fast approximate ones for float accumulation (error bounds in
// docs/design.md, "Fast float32 math"), the exact ones for double.
template <typename acc_t>
using ElementMath =
    std::conditional_t<std::is_same_v<acc_t, float>, FastFloatMath<FastFloatPrimitives>, ScalarMath<acc_t>>;

// `scale` multiplies what the pass stores: grad_loss (over the divisor) or, in the forward, 1 (over the
// divisor for the gradient, as the backward's scale for grad_loss = 1: the same bits).
template <Pass pass, typename acc_t>
__device__ __forceinline__ ElementResult<acc_t> evaluate_element(const BceConfig<acc_t>& cfg, acc_t z, acc_t y,
                                                                 acc_t w, acc_t q, acc_t scale) {
  using Math = ElementMath<acc_t>;
  if constexpr (pass == Pass::Forward) {
    const acc_t loss = bce_element_loss<Math>(cfg, z, y, w, q) * scale;
    return {loss, loss};
  } else if constexpr (pass == Pass::Backward) {
    const acc_t grad = bce_element_grad<Math>(cfg, z, y, w, q) * scale;
    return {grad, grad};
  } else {
    const LossAndGrad<acc_t> both = bce_element_loss_and_grad<Math>(cfg, z, y, w, q);
    return {both.loss, both.grad * scale};
  }
}

// An optional element-shaped operand at `offset`, or `absent` when there is none.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t read_or(const T* __restrict__ data, int64_t offset, acc_t absent) {
  return data != nullptr ? static_cast<acc_t>(data[offset]) : absent;
}

// What every kernel gets besides its layout.
template <typename scalar_t>
struct PassArgs {
  using acc_t = acc_type<scalar_t>;
  BceConfig<acc_t> cfg;
  int64_t numel;
  const scalar_t* logits;
  const acc_t* weight;               // nullptr when absent
  const acc_t* pos_weight;           // nullptr when absent
  const scalar_t* grad_loss;         // backward of 'none': one scale per element; else nullptr
  const scalar_t* grad_loss_scalar;  // backward of 'mean' / 'sum': the scale, read on the device; else nullptr
  bool skip_unit_grad_loss;          // in-place backward: the forward's gradient stands when grad_loss is 1
  acc_t divisor;                     // numel for 'mean', else 1
  scalar_t* out;                     // contiguous per-element losses ('none') or gradient; else nullptr
  acc_t* partials;                   // forward with a reduction: one partial sum per block; else nullptr
};

// The scale of elements without a grad_loss of their own.
template <Pass pass, typename scalar_t>
__device__ acc_type<scalar_t> uniform_scale(const PassArgs<scalar_t>& args) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (pass == Pass::Forward) return acc_t(1);
  if constexpr (pass == Pass::ForwardWithGradient) return acc_t(1) / args.divisor;
  return args.grad_loss_scalar != nullptr ? static_cast<acc_t>(*args.grad_loss_scalar) / args.divisor : acc_t(1);
}

// True in every thread of an in-place backward whose grad_loss is 1: the forward's gradient is the answer.
template <Pass pass, typename scalar_t>
__device__ bool keeps_forward_gradient(const PassArgs<scalar_t>& args) {
  return pass == Pass::Backward && args.skip_unit_grad_loss &&
         static_cast<acc_type<scalar_t>>(*args.grad_loss_scalar) == acc_type<scalar_t>(1);
}

// Whether the pass stores per-element values: always with the gradient, in the forward for 'none' only.
// Known at compile time outside the forward, so those loops have no version without the stores.
template <Pass pass, typename scalar_t>
__device__ __forceinline__ bool writes_output(const PassArgs<scalar_t>& args) {
  return pass != Pass::Forward || args.out != nullptr;
}

// The thread's sum into the block's partial. Uniform over the grid, so all threads of a block call it or none.
template <typename scalar_t>
__device__ void store_partial_sum(const PassArgs<scalar_t>& args, acc_type<scalar_t> sum) {
  if (args.partials == nullptr) return;
  acc_type<scalar_t> values[1] = {sum};
  store_block_partials<acc_type<scalar_t>, 1>(values, args.partials);
}

// ---------------------------------------------------------------------------------------------------- flat

// Elements per step: one 16-byte load of the narrower of logits and target.
template <typename scalar_t, typename target_t>
constexpr int kFlatElements = 16 / (sizeof(scalar_t) < sizeof(target_t) ? sizeof(scalar_t) : sizeof(target_t));

// A weight (or grad_loss) as the flat kernel reads it: absent (data is nullptr), contiguous (element `flat` at
// data[flat]) or periodic along the flat range (element at data[label * stride], label = flat % period);
// `packed`: a step's values are consecutive and 16-byte aligned (contiguous and aligned at the peeled head, or
// periodic with unit stride, a period that is a multiple of the step and an aligned base).
template <typename T>
struct FlatOperand {
  const T* data = nullptr;
  bool periodic = false;
  bool packed = false;
  int64_t stride = 0;

  template <typename acc_t>
  __device__ __forceinline__ acc_t read(int64_t flat, int64_t label, acc_t absent) const {
    return read_or(data, periodic ? label * stride : flat, absent);
  }
};

// `Count` elements of an operand from element `first`, whose label is `label`.
template <int Count, typename T, typename acc_t>
__device__ __forceinline__ void load_flat(const FlatOperand<T>& operand, int64_t first, int64_t label, int64_t period,
                                          acc_t absent, acc_t (&out)[Count]) {
  if (operand.packed) {
    load_packs<Count>(operand.data + (operand.periodic ? label : first), out);
    return;
  }
#pragma unroll
  for (int k = 0; k < Count; ++k) {
    out[k] = operand.read(first + k, label, absent);
    label = label + 1 == period ? 0 : label + 1;
  }
}

// The call's config; in the plain kernels focusing is off at compile time, so their loops hold only the plain
// formulas.
template <bool kFocusing, typename acc_t>
__device__ __forceinline__ BceConfig<acc_t> kernel_config(const BceConfig<acc_t>& cfg) {
  if constexpr (kFocusing) {
    return cfg;
  } else {
    return BceConfig<acc_t>{};
  }
}

// Resident blocks the flat kernels are compiled for: 4 (at most 64 registers at 256 threads) for the float
// paths without weight operands; the weighted ones hold a step's weight, pos_weight and scale too (3 x 16
// values with a one-byte target), which spill under 64 registers: 2. The double paths are not limited.
template <typename scalar_t, bool kWeighted>
constexpr int kFlatMinBlocks = std::is_same_v<scalar_t, double> ? 1 : kWeighted ? 2 : 4;

// kWeighted: some of weight, pos_weight and per-element grad_loss are present; without them the loop reads
// logits and target only. Elements [0, head) (a misaligned base peeled up to the first element where logits,
// target and output are 16-byte aligned) and the tail after the last whole step go one per thread.
template <Pass pass, typename scalar_t, typename target_t, bool kFocusing, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, kFlatMinBlocks<scalar_t, kWeighted>)
    flat_kernel(PassArgs<scalar_t> args, const target_t* __restrict__ target,
                FlatOperand<acc_type<scalar_t>> weight, FlatOperand<acc_type<scalar_t>> pos_weight,
                FlatOperand<scalar_t> grad_loss, int64_t period, int64_t head) {
  using acc_t = acc_type<scalar_t>;
  constexpr int E = kFlatElements<scalar_t, target_t>;
  if (keeps_forward_gradient<pass>(args)) return;
  const BceConfig<acc_t> cfg = kernel_config<kFocusing>(args.cfg);
  const int64_t thread = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
  const int64_t num_threads = int64_t(gridDim.x) * kBlockThreads;
  const acc_t scale_all = uniform_scale<pass>(args);
  const int64_t steps = (args.numel - head) / E;
  // The label of a step's first element, advanced by the grid stride without a division per step.
  const int64_t label_advance = kWeighted ? num_threads * E % period : 0;
  int64_t label = kWeighted ? (head + thread * E) % period : 0;
  acc_t sum = 0;
  for (int64_t step = thread; step < steps; step += num_threads) {
    const int64_t first = head + step * E;
    acc_t z[E], y[E], value[E];
    load_packs<E>(args.logits + first, z);
    load_packs<E>(target + first, y);
    if constexpr (kWeighted) {
      acc_t w[E], q[E], scale[E];
      load_flat<E>(weight, first, label, period, acc_t(1), w);
      load_flat<E>(pos_weight, first, label, period, acc_t(1), q);
      load_flat<E>(grad_loss, first, label, period, scale_all, scale);
      label += label_advance;
      label = label >= period ? label - period : label;
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const ElementResult<acc_t> result = evaluate_element<pass>(cfg, z[k], y[k], w[k], q[k], scale[k]);
        sum += result.summed;
        value[k] = result.stored;
      }
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const ElementResult<acc_t> result = evaluate_element<pass>(cfg, z[k], y[k], acc_t(1), acc_t(1), scale_all);
        sum += result.summed;
        value[k] = result.stored;
      }
    }
    if (writes_output<pass>(args)) store_packs<E>(args.out + first, value);
  }
  // The head, then the tail: `edge` elements in all.
  const int64_t tail_start = head + steps * E;
  const int64_t edge = head + (args.numel - tail_start);
  for (int64_t index = thread; index < edge; index += num_threads) {
    const int64_t flat = index < head ? index : tail_start + (index - head);
    const int64_t element_label = kWeighted ? flat % period : 0;
    const ElementResult<acc_t> result = evaluate_element<pass>(
        cfg, static_cast<acc_t>(args.logits[flat]), element_as<acc_t>(target[flat]),
        weight.read(flat, element_label, acc_t(1)), pos_weight.read(flat, element_label, acc_t(1)),
        grad_loss.read(flat, element_label, scale_all));
    sum += result.summed;
    if (writes_output<pass>(args)) args.out[flat] = static_cast<scalar_t>(result.stored);
  }
  store_partial_sum(args, sum);
}

// ------------------------------------------------------------------------------------------------- strided

template <Pass pass, typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kBlockThreads)
    strided_kernel(PassArgs<scalar_t> args, const target_t* __restrict__ target, BceLayout layout) {
  using acc_t = acc_type<scalar_t>;
  if (keeps_forward_gradient<pass>(args)) return;
  const int64_t num_threads = int64_t(gridDim.x) * kBlockThreads;
  const acc_t scale_all = uniform_scale<pass>(args);
  acc_t sum = 0;
  for (int64_t flat = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x; flat < args.numel; flat += num_threads) {
    int64_t offsets[kNumBceOperands];
    layout.offsets(flat, offsets);
    const ElementResult<acc_t> result = evaluate_element<pass>(
        args.cfg, static_cast<acc_t>(args.logits[offsets[kLogits]]), element_as<acc_t>(target[offsets[kTarget]]),
        read_or(args.weight, offsets[kWeight], acc_t(1)), read_or(args.pos_weight, offsets[kPosWeight], acc_t(1)),
        read_or(args.grad_loss, offsets[kGradLoss], scale_all));
    sum += result.summed;
    if (args.out != nullptr) args.out[flat] = static_cast<scalar_t>(result.stored);
  }
  store_partial_sum(args, sum);
}

// --------------------------------------------------------------------------------------------- sparse rows

constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;
#ifdef FUSED_LOSSES_SMALL_LIMITS
constexpr int64_t kChunkLabels = 64;  // the emulation's small-limit build: several chunks per test row
#else
constexpr int64_t kChunkLabels = 4096;  // labels per chunk: a 512-byte shared-memory bitmap per warp
#endif
constexpr int kChunkWords = kChunkLabels / 32;

// True in every lane when an index of the row is outside [-1, L): the row is then NaN. A vote per batch of
// kWarpSize positions (no flag carried through the loop).
__device__ __forceinline__ bool row_has_invalid_index(const int64_t* __restrict__ row_indices, int64_t max_positives,
                                                      int64_t num_labels, int lane) {
  for (int64_t base = 0; base < max_positives; base += kWarpSize) {
    const int64_t label = base + lane < max_positives ? row_indices[base + lane] : int64_t(-1);
    if (__any_sync(kFullWarp, label < -1 || label >= num_labels)) return true;
  }
  return false;
}

// Whether the lane's index, `label` at position base + lane of the row's list, is the first position of the
// list holding that label, among the labels of the chunk [chunk, chunk_end): a lower lane of the same batch of
// kWarpSize positions (__match_any_sync), or an earlier batch, whose first positions have set the label's bit
// in `bitmap` (cleared before the first batch; with one batch, no bitmap). Deterministic: which position counts
// depends on the list only. Every lane must call it, and a __syncwarp must separate two batches.
__device__ __forceinline__ bool first_in_chunk(int64_t label, int64_t chunk, int64_t chunk_end, uint32_t* bitmap,
                                               bool several_batches, int lane) {
  const bool in_chunk = label >= chunk && label < chunk_end;
  const unsigned same_label = __match_any_sync(kFullWarp, static_cast<unsigned long long>(in_chunk ? label : -1));
  if (!in_chunk || (same_label & ((1u << lane) - 1)) != 0) return false;
  if (!several_batches) return true;
  const int64_t bit = label - chunk;
  const uint32_t mask = 1u << (bit % 32);
  return (atomicOr(&bitmap[bit / 32], mask) & mask) == 0;  // no other lane of the batch sets this bit
}

// Resident blocks the sparse kernels are compiled for: 4 (at most 64 registers at 256 threads) on the float
// paths, but 2 for the focusing backward with weight / grad_loss operands (a pack's weights, scales and the
// focusing terms spill under 64 registers); the double paths are not limited.
template <Pass pass, typename scalar_t, bool kFocusing, bool kWeighted>
constexpr int kSparseMinBlocks =
    std::is_same_v<scalar_t, double> ? 1 : (pass == Pass::Backward && kFocusing && kWeighted ? 2 : 4);

// How a sweep reads an optional operand: never (absent), without a null test (present), or testing for null
// per element (maybe: one loop for either, where versions per case would not fit the registers).
enum class OperandRead { kAbsent, kPresent, kMaybe };
template <OperandRead mode>
using OperandReadTag = std::integral_constant<OperandRead, mode>;

template <OperandRead mode, typename T, typename acc_t>
__device__ __forceinline__ acc_t read_operand(const T* __restrict__ data, int64_t offset, acc_t absent) {
  if constexpr (mode == OperandRead::kAbsent) return absent;
  else if constexpr (mode == OperandRead::kPresent) return static_cast<acc_t>(data[offset]);
  else return read_or(data, offset, absent);
}

// A warp per row, in two steps per chunk of kChunkLabels labels (docs/design.md, "Sparse targets"): a dense
// sweep evaluates every element as a negative (y = 0): no label test in the loop, and no pos_weight; then,
// after a __syncwarp, the lanes walk the row's index list, kWarpSize positions at a time, and patch each
// positive label of the chunk once: the sum gets loss_pos - loss_neg, the stored value (loss or gradient) is
// overwritten with the positive one, computed directly. A row with an invalid index is NaN throughout.
// kFocusing: gamma or clip non-zero (else the plain formulas only); kWeighted: a weight or per-element grad_loss
// operand (pos_weight is read by the patches only). `layout` is exactly (N, L): row r, label c of operand k is
// at r * strides[k][0] + c * strides[k][1].
template <Pass pass, typename scalar_t, bool kFocusing, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, kSparseMinBlocks<pass, scalar_t, kFocusing, kWeighted>)
    sparse_rows_kernel(PassArgs<scalar_t> args, const int64_t* __restrict__ indices, int64_t max_positives,
                       BceLayout layout, bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  if (keeps_forward_gradient<pass>(args)) return;
  __shared__ uint32_t bitmaps[kWarpsPerBlock][kChunkWords];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  uint32_t* bitmap = bitmaps[warp];
  const BceConfig<acc_t> cfg = kernel_config<kFocusing>(args.cfg);
  const int64_t num_rows = layout.sizes[0], num_labels = layout.sizes[1];
  const int64_t logit_stride = layout.strides[kLogits][1];
  const bool several_batches = max_positives > kWarpSize;
  const acc_t scale_all = uniform_scale<pass>(args);
  acc_t sum = 0;
  // Every row, reading the weight and the per-element grad_loss as `weight_read` / `scale_read`
  // (OperandReadTag) say. The row, chunk and batch loops are uniform over the warp, so every lane reaches every
  // vote and __syncwarp.
  const auto all_rows = [&](auto weight_read, auto scale_read) {
    for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp; row < num_rows;
         row += int64_t(gridDim.x) * kWarpsPerBlock) {
      const int64_t* row_indices = indices + row * max_positives;
      const scalar_t* row_logits = args.logits + row * layout.strides[kLogits][0];
      scalar_t* row_out = args.out != nullptr ? args.out + row * num_labels : nullptr;
      if (row_has_invalid_index(row_indices, max_positives, num_labels, lane)) {
        constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();  // never a silent number
        sum += kNaN;
        if (writes_output<pass>(args)) {
          for (int64_t label = lane; label < num_labels; label += kWarpSize) {
            row_out[label] = static_cast<scalar_t>(kNaN);
          }
        }
        continue;
      }
      const auto offset = [&](BceOperand operand, int64_t label) {
        return row * layout.strides[operand][0] + label * layout.strides[operand][1];
      };
      // Label `label` of the row as a negative (y = 0, no pos_weight) or a positive.
      const auto element = [&](int64_t label, acc_t z, bool positive) {
        const acc_t w = read_operand<decltype(weight_read)::value>(args.weight, offset(kWeight, label), acc_t(1));
        const acc_t q = positive ? read_or(args.pos_weight, offset(kPosWeight, label), acc_t(1)) : acc_t(1);
        const acc_t scale =
            read_operand<decltype(scale_read)::value>(args.grad_loss, offset(kGradLoss, label), scale_all);
        return evaluate_element<pass>(cfg, z, positive ? acc_t(1) : acc_t(0), w, q, scale);
      };
      for (int64_t chunk = 0; chunk < num_labels; chunk += kChunkLabels) {
        const int64_t chunk_end = std::min(num_labels, chunk + kChunkLabels);
        if (several_batches) {
          for (int word = lane; word < kChunkWords; word += kWarpSize) bitmap[word] = 0;
        }
        if (vectorized) {  // chunk and chunk_end are multiples of vec: packs never straddle a chunk
          for (int64_t first = chunk + lane * vec; first < chunk_end; first += kWarpSize * vec) {
            acc_t z[vec], value[vec];
            load_packs<vec>(row_logits + first, z);
#pragma unroll
            for (int k = 0; k < vec; ++k) {
              const ElementResult<acc_t> result = element(first + k, z[k], false);
              sum += result.summed;
              value[k] = result.stored;
            }
            if (writes_output<pass>(args)) store_packs<vec>(row_out + first, value);
          }
        } else {
          for (int64_t label = chunk + lane; label < chunk_end; label += kWarpSize) {
            const ElementResult<acc_t> result =
                element(label, static_cast<acc_t>(row_logits[label * logit_stride]), false);
            sum += result.summed;
            if (writes_output<pass>(args)) row_out[label] = static_cast<scalar_t>(result.stored);
          }
        }
        __syncwarp();  // the sweep's stores (and the cleared bitmap) are visible before the patches
        for (int64_t base = 0; base < max_positives; base += kWarpSize) {
          const int64_t position = base + lane;
          const int64_t label = position < max_positives ? row_indices[position] : int64_t(-1);
          if (first_in_chunk(label, chunk, chunk_end, bitmap, several_batches, lane)) {
            const acc_t z = static_cast<acc_t>(row_logits[label * logit_stride]);
            const ElementResult<acc_t> positive = element(label, z, true);
            if (writes_output<pass>(args)) row_out[label] = static_cast<scalar_t>(positive.stored);
            // The sum only: loss_pos - loss_neg (docs/design.md, "Sparse targets": its rounding).
            if constexpr (pass != Pass::Backward) sum += positive.summed - element(label, z, false).summed;
          }
          if (several_batches) __syncwarp();  // the batch's bits are set before the next batch tests them
        }
      }
    }
  };
  using Absent = OperandReadTag<OperandRead::kAbsent>;
  using Present = OperandReadTag<OperandRead::kPresent>;
  using Maybe = OperandReadTag<OperandRead::kMaybe>;
  if constexpr (pass == Pass::Backward && kWeighted && kFocusing) {  // a weight, a per-element grad_loss or both
    if (args.weight == nullptr) all_rows(Absent{}, Present{});
    else if (args.grad_loss == nullptr) all_rows(Present{}, Absent{});
    else all_rows(Present{}, Present{});
  } else if constexpr (pass == Pass::Backward && kWeighted) {
    all_rows(Maybe{}, Maybe{});  // three plain versions need more than 64 registers (spills around the rows)
  } else {  // only the backward has a per-element grad_loss: a weighted forward has a weight
    all_rows(std::conditional_t<kWeighted, Present, Absent>{}, Absent{});
  }
  store_partial_sum(args, sum);
}

// ------------------------------------------------------------------------------------------------ launches

bool operand_is_contiguous(const BceLayout& layout, int operand) {
  int64_t expected = 1;
  for (int d = layout.dims - 1; d >= 0; --d) {
    if (layout.strides[operand][d] != expected) return false;
    expected *= layout.sizes[d];
  }
  return true;
}

// How the flat kernel reads a weight or grad_loss operand whose step starts at elements ≡ `head` (mod `E`);
// nullopt when it cannot (a stride-0 dimension other than the last).
template <int E, typename T>
std::optional<FlatOperand<T>> as_flat_operand(const BceLayout& layout, int operand, const T* data, int64_t head) {
  FlatOperand<T> flat;
  flat.data = data;
  if (data == nullptr) return flat;
  if (operand_is_contiguous(layout, operand)) {
    flat.packed = is_aligned_16(data + head);
    return flat;
  }
  for (int d = 0; d + 1 < layout.dims; ++d) {
    if (layout.strides[operand][d] != 0) return std::nullopt;
  }
  flat.periodic = true;
  flat.stride = layout.inner_stride(operand);
  flat.packed = head == 0 && flat.stride == 1 && layout.inner_size() % E == 0 && is_aligned_16(data);
  return flat;
}

// The first element (below kFlatElements, at most numel) where logits, target and output are all 16-byte
// aligned: a base misaligned by the same number of elements in each (outputs are allocated that way,
// empty_with_alignment_of) peels a short head. nullopt when there is none.
template <typename scalar_t, typename target_t>
std::optional<int64_t> flat_head(const PassArgs<scalar_t>& args, const target_t* target) {
  constexpr int E = kFlatElements<scalar_t, target_t>;
  for (int64_t head = 0; head < E; ++head) {
    if (is_aligned_16(args.logits + head) && is_aligned_16(target + head) &&
        (args.out == nullptr || is_aligned_16(args.out + head))) {
      return std::min(head, args.numel);
    }
  }
  return std::nullopt;
}

// Calls f(kFocusing, kWeighted) with the two flags as std::bool_constant: one kernel instantiation each.
template <typename F>
void with_kernel_variant(bool focusing, bool weighted, const F& f) {
  if (focusing && weighted) f(std::true_type{}, std::true_type{});
  else if (focusing) f(std::true_type{}, std::false_type{});
  else if (weighted) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

// Launches one pass over every element. For a reduced forward, `partials` receives the (blocks,) per-block
// sums; returns the number of blocks.
template <Pass pass, typename scalar_t, typename target_t>
int64_t launch_pass(const BceProblem& p, PassArgs<scalar_t> args, at::Tensor* partials, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const auto allocate_partials = [&](int64_t blocks) {
    if (partials == nullptr) return;
    *partials = at::empty({blocks}, p.input.options().dtype(acc_scalar_type(p.input.scalar_type())));
    args.partials = partials->data_ptr<acc_t>();
  };
  if constexpr (std::is_same_v<target_t, SparseTargets>) {
    constexpr int vec = kVecSize<scalar_t>;
    const bool vectorized = p.layout.strides[kLogits][1] == 1 && p.layout.strides[kLogits][0] % vec == 0 &&
                            p.num_labels % vec == 0 && is_aligned_16(args.logits) &&
                            (args.out == nullptr || is_aligned_16(args.out));
    const int64_t blocks = grid_size(p.num_rows(), kWarpsPerBlock);
    allocate_partials(blocks);
    with_kernel_variant(args.cfg.focusing, args.weight != nullptr || args.grad_loss != nullptr,
                        [&](auto focusing, auto weighted) {
                          constexpr bool kFocusing = decltype(focusing)::value, kWeighted = decltype(weighted)::value;
                          launch_kernel(sparse_rows_kernel<pass, scalar_t, kFocusing, kWeighted>, blocks, stream, args,
                                        p.positive_indices->const_data_ptr<int64_t>(), p.max_positives, p.layout,
                                        vectorized);
                        });
    return blocks;
  } else {
    constexpr int E = kFlatElements<scalar_t, target_t>;
    const target_t* target = p.data<target_t>(kTarget);
    const std::optional<int64_t> head =
        operand_is_contiguous(p.layout, kLogits) && operand_is_contiguous(p.layout, kTarget)
            ? flat_head(args, target)
            : std::nullopt;
    if (head) {
      const auto weight = as_flat_operand<E>(p.layout, kWeight, args.weight, *head);
      const auto pos_weight = as_flat_operand<E>(p.layout, kPosWeight, args.pos_weight, *head);
      const auto grad_loss = as_flat_operand<E>(p.layout, kGradLoss, args.grad_loss, *head);
      if (weight && pos_weight && grad_loss) {
        const int64_t blocks = grid_size((p.numel - *head) / E, kBlockThreads);
        allocate_partials(blocks);
        const bool weighted = weight->data != nullptr || pos_weight->data != nullptr || grad_loss->data != nullptr;
        const auto launch = [&](auto focusing, auto weighted_tag) {
          launch_kernel(flat_kernel<pass, scalar_t, target_t, decltype(focusing)::value, decltype(weighted_tag)::value>,
                        blocks, stream, args, target, *weight, *pos_weight, *grad_loss, p.layout.inner_size(), *head);
        };
        const bool focusing = args.cfg.focusing;
        if (focusing && weighted) launch(std::true_type{}, std::true_type{});
        else if (focusing) launch(std::true_type{}, std::false_type{});
        else if (weighted) launch(std::false_type{}, std::true_type{});
        else launch(std::false_type{}, std::false_type{});
        return blocks;
      }
    }
    const int64_t blocks = grid_size(p.numel, kBlockThreads);
    allocate_partials(blocks);
    launch_kernel(strided_kernel<pass, scalar_t, target_t>, blocks, stream, args, target, p.layout);
    return blocks;
  }
}

// An uninitialised tensor of the input's shape and dtype, contiguous, whose address is as far (in elements)
// from 16-byte alignment as the input's: the flat kernel then peels the same head from both.
at::Tensor empty_with_alignment_of(const at::Tensor& input) {
  const int64_t offset = reinterpret_cast<uintptr_t>(input.const_data_ptr()) % 16 / input.element_size();
  if (offset == 0) return at::empty(input.sizes(), input.options());
  return at::empty({input.numel() + offset}, input.options()).narrow(0, offset, input.numel()).view(input.sizes());
}

template <typename scalar_t>
PassArgs<scalar_t> make_pass_args(const BceProblem& p) {
  using acc_t = acc_type<scalar_t>;
  PassArgs<scalar_t> args{};
  args.cfg = p.config<acc_t>();
  args.numel = p.numel;
  args.logits = p.data<scalar_t>(kLogits);
  args.weight = p.data<acc_t>(kWeight);
  args.pos_weight = p.data<acc_t>(kPosWeight);
  args.grad_loss = p.data<scalar_t>(kGradLoss);
  args.grad_loss_scalar = p.grad_loss_scalar.has_value() ? p.grad_loss_scalar->const_data_ptr<scalar_t>() : nullptr;
  args.divisor = static_cast<acc_t>(bce_reduction_divisor(p));
  return args;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                                const std::optional<at::Tensor>& positive_indices,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, c10::string_view reduction,
                                                double gamma_pos, double gamma_neg, double clip, bool write_gradient) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p =
      make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos, gamma_neg, clip);
  const bool reduced = p.reduction != Reduction::None;
  at::Tensor loss = reduced ? allocate_bce_loss(p) : empty_with_alignment_of(p.input);
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  if (write_gradient && !is_aligned_16(p.input.const_data_ptr())) gradient = empty_with_alignment_of(p.input);
  if (p.numel == 0) {
    fill_empty_reduction(loss, p.reduction);
    return {loss, gradient};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits", [&] {
    using acc_t = acc_type<scalar_t>;
    PassArgs<scalar_t> args = make_pass_args<scalar_t>(p);
    args.out = write_gradient ? gradient.data_ptr<scalar_t>() : reduced ? nullptr : loss.data_ptr<scalar_t>();
    dispatch_bce_target<scalar_t>(p, [&](auto target_tag) {
      using target_t = decltype(target_tag);
      at::Tensor partials;
      at::Tensor* reduced_partials = reduced ? &partials : nullptr;
      const int64_t blocks =
          write_gradient
              ? launch_pass<Pass::ForwardWithGradient, scalar_t, target_t>(p, args, reduced_partials, stream)
              : launch_pass<Pass::Forward, scalar_t, target_t>(p, args, reduced_partials, stream);
      if (!reduced) return;
      launch_reduce_partials<acc_t, 1>(partials.const_data_ptr<acc_t>(), blocks,
                                       FixedDivisorLossEpilogue<scalar_t>{loss.data_ptr<scalar_t>(), args.divisor},
                                       stream);
    });
  });
  return {loss, gradient};
}

// Writes the gradient for grad_loss into `grad_input`; with `skip_unit_grad_loss`, nothing when grad_loss is 1.
void backward_into(const BceProblem& p, at::Tensor& grad_input, bool skip_unit_grad_loss) {
  if (p.numel == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits_backward",
                                  [&] {
                                    PassArgs<scalar_t> args = make_pass_args<scalar_t>(p);
                                    args.out = grad_input.data_ptr<scalar_t>();
                                    args.skip_unit_grad_loss = skip_unit_grad_loss;
                                    dispatch_bce_target<scalar_t>(p, [&](auto target_tag) {
                                      launch_pass<Pass::Backward, scalar_t, decltype(target_tag)>(p, args, nullptr,
                                                                                                  stream);
                                    });
                                  });
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& positive_indices, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pos_weight, c10::string_view reduction, double gamma_pos,
                         double gamma_neg, double clip) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  at::Tensor grad_input = empty_with_alignment_of(p.input);
  backward_into(p, grad_input, /*skip_unit_grad_loss=*/false);
  return grad_input;
}

void backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                           const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& positive_indices,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                           c10::string_view reduction, double gamma_pos, double gamma_neg, double clip) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  backward_into(p, gradient, /*skip_unit_grad_loss=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("weighted_bce_with_logits", &forward_cuda);
  m.impl("weighted_bce_with_logits_backward", &backward_cuda);
  m.impl("weighted_bce_with_logits_backward_inplace", &backward_inplace_cuda);
}

}  // namespace fused_losses::cuda
