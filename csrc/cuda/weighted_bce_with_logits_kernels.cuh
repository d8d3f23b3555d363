#pragma once

// CUDA kernels of fused_losses::weighted_bce_with_logits, included by the file of each pass
// (weighted_bce_with_logits_{forward,forward_with_gradient,backward}.cu) and by the op's file
// (weighted_bce_with_logits.cu), which launches them.
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
// - flat: dense targets whose logits and target are contiguous and reach 16-byte alignment at the same element
//   (a shared misalignment peels a short head; outputs are fresh contiguous tensors, stored in 16-byte packs
//   when they are aligned at the head too, else all elements go one per thread). Each step of a thread handles
//   kFlatStepElements consecutive elements through 16-byte loads of the logits and of the target in its own dtype
//   (16 bool / uint8 targets per load; ASL steps 4 elements, with shorter loads), evaluated a sub-pack (one
//   16-byte pack of float weights) at a time.
//   Weights and per-element grad_loss are read in the (rows, L) view of the range, L the last merged dimension:
//   contiguous, periodic along the labels (a (L,) pos_weight), constant along them (an (N, 1) per-row weight) or
//   any row / label strides, in packs, one broadcast value or element by element (FlatForm). Compiled per
//   focusing (plain / focal / ASL) and weights (none / some). Grid-stride loop over a fixed grid (grid_size;
//   map_grid_size for the passes that sum nothing); the head and the tail after the last whole step take one
//   element per thread.
// - strided: every other dense layout (weights broadcast along a middle dimension, transposed inputs): a thread
//   takes a chunk of 8 elements of a row (4 with weights or for ASL), whose offsets come from one multiply-high
//   division per dimension; compiled per focusing and weights as the flat kernel.
// - sparse rows: a warp per row evaluates every element as a negative (16-byte loads when rows are aligned; no
//   label test), then patches the row's positives from its K indices: a label listed twice counts once, an
//   index outside [-1, L) makes the row NaN. Labels go in chunks of kChunkLabels, so any L and K fit.
#include "cuda/cuda_utils.cuh"
#include "weighted_bce_with_logits.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <bit>
#include <cstring>
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
// divisor for the gradient, as the backward's scale for grad_loss = 1: the same bits). `q` is the pos_weight,
// or UnitPosWeight in the kernels without one (bce_math.h); `Math` the elementary functions (the sparse kernel
// passes its own).
template <Pass pass, typename acc_t, typename Math = ElementMath<acc_t>, typename Q>
__device__ __forceinline__ ElementResult<acc_t> evaluate_element(const BceConfig<acc_t>& cfg, acc_t z, acc_t y,
                                                                 acc_t w, Q q, acc_t scale) {
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

// Only the backward has a per-element grad_loss (the forward scales by 1, the forward that writes the gradient
// by 1 / divisor): the weighted loops of the other passes hold no code for one.
template <Pass pass>
constexpr bool kReadsGradLoss = pass == Pass::Backward;

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

// The formulas a flat kernel holds: plain BCE, focal (gammas without a clip) or ASL (a clip, and gammas).
enum class Focusing { Plain, Focal, Asymmetric };

// Elements over which logits and target both reach 16-byte alignment: one 16-byte load of the narrower.
template <typename scalar_t, typename target_t>
constexpr int kFlatAlignmentElements =
    16 / (sizeof(scalar_t) < sizeof(target_t) ? sizeof(scalar_t) : sizeof(target_t));

// Elements per sub-pack: a step is evaluated a sub-pack at a time (one 16-byte pack of weights), so that only
// one sub-pack's weights, pos_weights and scales are live, not the whole step's.
template <typename scalar_t>
constexpr int kSubPackElements = kVecSize<acc_type<scalar_t>>;

// Elements per step of the flat kernel: kFlatAlignmentElements (16-byte loads of both), or one sub-pack for ASL,
// whose formulas hold the most registers per element: with 8-16 elements of a step in flight its kernels
// spilled at 64 registers (docs/design.md, "Weighted, focal and asymmetric BCE").
template <typename scalar_t, typename target_t, Focusing kFocusing>
constexpr int kFlatStepElements =
    kFocusing == Focusing::Asymmetric ? kSubPackElements<scalar_t> : kFlatAlignmentElements<scalar_t, target_t>;

// store_pack of 8 or 16 bytes as one store instruction (STG.64 / STG.128). The compiler splits the Pack copy of
// the flat BCE loop, whose pack is filled an element at a time across sub-packs, into 4-byte stores; this
// states the vector store. `ptr` is a global address aligned to the pack's size.
template <typename T, int N>
__device__ __forceinline__ void store_pack_global(T* ptr, const Pack<T, N>& pack) {
  static_assert(sizeof(pack) == 8 || sizeof(pack) == 16, "an 8- or 16-byte pack");
#ifdef FUSED_LOSSES_HOST_EMULATION
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
#else
  uint32_t words[sizeof(pack) / 4];
  memcpy(words, &pack, sizeof(words));
  if constexpr (sizeof(pack) == 16) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(ptr)), "r"(words[0]),
                 "r"(words[1]), "r"(words[2]), "r"(words[3])
                 : "memory");
  } else {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(ptr)), "r"(words[0]),
                 "r"(words[1])
                 : "memory");
  }
#endif
}

// Where an element sits in the (rows, L) view of the flat range, L the last merged dimension (the whole range
// when everything merges to one dimension).
struct FlatPosition {
  int64_t row, label;
};

// A fixed distance in elements as whole rows and remaining labels, so positions advance without a division.
struct FlatAdvance {
  int64_t rows, labels;
};

__device__ __forceinline__ void advance(FlatPosition& position, const FlatAdvance& by, int64_t num_labels) {
  position.row += by.rows;
  position.label += by.labels;
  if (position.label >= num_labels) {
    position.label -= num_labels;
    ++position.row;
  }
}

// How the flat kernel reads a sub-pack of an optional operand (docs/design.md, "Weighted, focal and asymmetric
// BCE"): absent; Packs, one aligned access (contiguous, or unit label stride with sub-packs inside rows);
// Broadcast, one value (constant along the labels, e.g. an (N, 1) per-row weight, sub-packs inside rows);
// Elements, one load per element (any other label / row strides).
enum class FlatForm : int { Absent, Packs, Broadcast, Elements };

// An operand whose element (row, label) is at data[row * row_stride + label * label_stride].
template <typename T>
struct FlatOperand {
  const T* data = nullptr;
  FlatForm form = FlatForm::Absent;
  int64_t row_stride = 0, label_stride = 0;
  int64_t wrap_step = 0;  // from a row's last label to the next row's first: row_stride - (L - 1) * label_stride

  __device__ __forceinline__ int64_t offset(const FlatPosition& at) const {
    return at.row * row_stride + at.label * label_stride;
  }

  // `Count` elements from `at` (a sub-pack), converted; `absent` when there is no operand.
  template <int Count, typename acc_t>
  __device__ __forceinline__ void load(const FlatPosition& at, int64_t num_labels, acc_t absent,
                                       acc_t (&out)[Count]) const {
    if (form == FlatForm::Packs) {
      using Run = Pack<T, Count>;  // aligned to its size: one access of Count elements
      const Run run = *reinterpret_cast<const Run*>(data + offset(at));
#pragma unroll
      for (int k = 0; k < Count; ++k) out[k] = static_cast<acc_t>(run.values[k]);
    } else if (form == FlatForm::Broadcast) {
      const acc_t value = static_cast<acc_t>(data[offset(at)]);
#pragma unroll
      for (int k = 0; k < Count; ++k) out[k] = value;
    } else if (form == FlatForm::Elements) {
      int64_t index = offset(at), label = at.label;
#pragma unroll
      for (int k = 0; k < Count; ++k) {
        out[k] = static_cast<acc_t>(data[index]);
        const bool row_ends = label + 1 == num_labels;
        index += row_ends ? wrap_step : label_stride;
        label = row_ends ? 0 : label + 1;
      }
    } else {
#pragma unroll
      for (int k = 0; k < Count; ++k) out[k] = absent;
    }
  }

  // One element (the peeled head and the tail).
  template <typename acc_t>
  __device__ __forceinline__ acc_t read(const FlatPosition& at, acc_t absent) const {
    return form == FlatForm::Absent ? absent : static_cast<acc_t>(data[offset(at)]);
  }
};

// The operands of the weighted flat kernels, with the layout's distances.
template <typename scalar_t>
struct FlatOperands {
  using acc_t = acc_type<scalar_t>;
  FlatOperand<acc_t> weight, pos_weight;
  FlatOperand<scalar_t> grad_loss;
  int64_t num_labels;        // L: the last merged dimension's size (the whole range for one dimension)
  FlatAdvance sub_pack;      // kSubPackElements elements
  FlatAdvance grid_step;     // the grid stride of a thread's steps, num_threads * kFlatStepElements elements
};

template <typename acc_t>
Focusing focusing_of(const BceConfig<acc_t>& cfg) {
  return cfg.clipped ? Focusing::Asymmetric : cfg.focusing ? Focusing::Focal : Focusing::Plain;
}

// The call's config with its focusing and clip flags fixed at compile time, so that a kernel's loop holds only
// its own formulas (the plain ones no focusing factor, the focal ones no clip).
template <Focusing kFocusing, typename acc_t>
__device__ __forceinline__ BceConfig<acc_t> kernel_config(const BceConfig<acc_t>& cfg) {
  BceConfig<acc_t> fixed{};
  if constexpr (kFocusing != Focusing::Plain) {
    fixed.gamma_pos = cfg.gamma_pos;
    fixed.gamma_neg = cfg.gamma_neg;
    fixed.focusing = true;
  }
  if constexpr (kFocusing == Focusing::Asymmetric) {
    fixed.clip = cfg.clip;
    fixed.clipped = true;
  }
  return fixed;
}

// Resident blocks the flat and strided kernels are compiled for: 4 (at most 64 registers at 256 threads) for
// the float paths (the flat kernel holds a sub-pack's operands at a time, not a step's; the strided one a chunk's
// logits and targets). The double paths are not limited.
template <typename scalar_t>
constexpr int kFlatMinBlocks = std::is_same_v<scalar_t, double> ? 1 : 4;

// kWeighted: some of weight, pos_weight and per-element grad_loss are present; without them the loop reads
// logits and target only. Elements [0, head) (a misaligned base peeled up to the first element where logits
// and target are 16-byte aligned) and the tail after the last whole step go one per thread. out_packed: the
// output is 16-byte aligned at the head too (else every element goes one per thread).
template <Pass pass, typename scalar_t, typename target_t, Focusing kFocusing, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, kFlatMinBlocks<scalar_t>)
    flat_kernel(PassArgs<scalar_t> args, const target_t* __restrict__ target, FlatOperands<scalar_t> operands,
                int64_t head, bool out_packed) {
  using acc_t = acc_type<scalar_t>;
  constexpr int E = kFlatStepElements<scalar_t, target_t, kFocusing>;
  constexpr int S = kSubPackElements<scalar_t>;
  // Values per load of logits (and store of the output) and of the target: 16 bytes, or the whole step.
  constexpr int kLogitsVec = std::min(E, kVecSize<scalar_t>), kTargetVec = std::min(E, kVecSize<target_t>);
  static_assert(E % S == 0 && (E % kLogitsVec) == 0 && (E % kTargetVec) == 0, "a step is whole packs");
  if (keeps_forward_gradient<pass>(args)) return;
  const BceConfig<acc_t> cfg = kernel_config<kFocusing>(args.cfg);
  const int64_t thread = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x;
  const int64_t num_threads = int64_t(gridDim.x) * kBlockThreads;
  const acc_t scale_all = uniform_scale<pass>(args);
  // An output misaligned from the logits (out_packed false) takes every element through the one-per-thread loop
  // below, so that the stepped loop holds 16-byte pack stores only (docs/design.md, "Weighted, focal and
  // asymmetric BCE").
  const int64_t steps = out_packed ? (args.numel - head) / E : 0;
  const int64_t num_labels = operands.num_labels;
  // The position of a thread's step, advanced by the grid stride without a division per step.
  FlatPosition step_position{0, 0};
  if constexpr (kWeighted) {
    const int64_t start = head + thread * E;
    step_position = {start / num_labels, start % num_labels};
  }
  acc_t sum = 0;
  // The head, then the tail: `edge` elements in all (all of them without steps). Before the stepped loop, so
  // that `thread` is not live across it.
  const int64_t tail_start = head + steps * E;
  const int64_t edge = head + (args.numel - tail_start);
  for (int64_t index = thread; index < edge; index += num_threads) {
    const int64_t flat = index < head ? index : tail_start + (index - head);
    const acc_t z = static_cast<acc_t>(args.logits[flat]);
    const acc_t y = element_as<acc_t>(target[flat]);
    const FlatPosition position = kWeighted ? FlatPosition{flat / num_labels, flat % num_labels} : FlatPosition{0, 0};
    const ElementResult<acc_t> result =
        kWeighted ? evaluate_element<pass>(cfg, z, y, operands.weight.read(position, acc_t(1)),
                                           operands.pos_weight.read(position, acc_t(1)),
                                           kReadsGradLoss<pass> ? operands.grad_loss.read(position, scale_all)
                                                                : scale_all)
                  : evaluate_element<pass>(cfg, z, y, acc_t(1), UnitPosWeight{}, scale_all);
    sum += result.summed;
    if (writes_output<pass>(args)) args.out[flat] = static_cast<scalar_t>(result.stored);
  }
  // The stepped loop, with or without the stores (`kStores`): two loops for the forward, which stores for 'none'
  // only, so that neither carries the other's code. A thread takes steps thread, thread + num_threads, ...:
  // `count` of them, counted in 32 bits (a tensor in device memory has fewer than 2^31 steps per thread), its
  // first element advanced by the grid stride; fewer 64-bit values live in the loop.
  const int count = thread < steps ? static_cast<int>((steps - 1 - thread) / num_threads) + 1 : 0;
  const int64_t grid_stride = num_threads * E;
  const auto sweep = [&](auto stores_tag) {
    constexpr bool kStores = decltype(stores_tag)::value;
    int64_t first = head + thread * E;
    // One step per iteration: the compiler would unroll the short plain float32 loops by 2 (the same work per
    // element, but a loop the SASS report reads as one step).
#pragma unroll 1
    for (int remaining = count; remaining > 0; --remaining, first += grid_stride) {
      // Logits and target as raw packs (a 16-byte bf16 pack holds 8 values in 4 registers); converted a
      // sub-pack at a time.
      Pack<scalar_t, kLogitsVec> logits[E / kLogitsVec];
      Pack<target_t, kTargetVec> targets[E / kTargetVec];
#pragma unroll
      for (int v = 0; v < E / kLogitsVec; ++v) {
        logits[v] = load_pack<scalar_t, kLogitsVec>(args.logits + first + v * kLogitsVec);
      }
#pragma unroll
      for (int v = 0; v < E / kTargetVec; ++v) {
        targets[v] = load_pack<target_t, kTargetVec>(target + first + v * kTargetVec);
      }
      Pack<scalar_t, kLogitsVec> stored;
      [[maybe_unused]] FlatPosition position = step_position;  // read by the weighted kernels only
#pragma unroll
      for (int j = 0; j < E / S; ++j) {
        acc_t w[S], q[S], scale[S];
        if constexpr (kWeighted) {
          operands.weight.load(position, num_labels, acc_t(1), w);
          operands.pos_weight.load(position, num_labels, acc_t(1), q);
          if constexpr (kReadsGradLoss<pass>) {
            operands.grad_loss.load(position, num_labels, scale_all, scale);
          } else {
            for (int k = 0; k < S; ++k) scale[k] = scale_all;
          }
          advance(position, operands.sub_pack, num_labels);
        }
#pragma unroll
        for (int k = 0; k < S; ++k) {
          const int e = j * S + k;
          const acc_t z = static_cast<acc_t>(logits[e / kLogitsVec].values[e % kLogitsVec]);
          const acc_t y = element_as<acc_t>(targets[e / kTargetVec].values[e % kTargetVec]);
          const ElementResult<acc_t> result =
              kWeighted ? evaluate_element<pass>(cfg, z, y, w[k], q[k], scale[k])
                        : evaluate_element<pass>(cfg, z, y, acc_t(1), UnitPosWeight{}, scale_all);
          sum += result.summed;
          stored.values[e % kLogitsVec] = static_cast<scalar_t>(result.stored);
          // A full pack of outputs goes out at once.
          if constexpr (kStores) {
            if ((e + 1) % kLogitsVec == 0) store_pack_global(args.out + first + e + 1 - kLogitsVec, stored);
          }
        }
      }
      if constexpr (kWeighted) advance(step_position, operands.grid_step, num_labels);
    }
  };
  if (writes_output<pass>(args)) {
    sweep(std::true_type{});
  } else if constexpr (pass == Pass::Forward) {
    sweep(std::false_type{});
  }
  store_partial_sum(args, sum);
}

// ------------------------------------------------------------------------------------------------- strided

// Elements of a row a thread of the strided kernel takes at once: their offsets come from one division per
// dimension, and their loads are in flight together. 8, or 4 with weight operands or for ASL (whose formulas
// hold the most registers per element): more spilled at 64 registers.
template <Focusing kFocusing, bool kWeighted>
constexpr int kStridedChunk = kFocusing == Focusing::Asymmetric || kWeighted ? 4 : 8;

// BceLayout (of at least one element) as the strided kernel walks it: rows of its innermost dimension (L
// elements, each operand its own stride along it) cut into chunks of kChunk elements; a chunk's row, and the
// row's offset in every operand, come from FastDivider divisions, whatever the number of elements. The outer
// dimensions a layout does not have cost a uniform branch each.
template <int kChunk>
struct StridedBceLayout {
  static constexpr int kMaxOuterDims = kMaxLayoutDims - 1;
  int outer_dims = 0;  // the dimensions before the innermost one
  FastDivider outer_sizes[kMaxOuterDims];
  int64_t outer_strides[kNumBceOperands][kMaxOuterDims] = {};
  int64_t inner_strides[kNumBceOperands] = {};
  int64_t row_length = 1;
  FastDivider chunks_per_row;
  int64_t num_chunks = 0;

  explicit StridedBceLayout(const BceLayout& layout)
      : outer_dims(std::max(layout.dims - 1, 0)),
        row_length(layout.inner_size()),
        chunks_per_row(static_cast<uint64_t>(ceil_div(layout.inner_size(), int64_t(kChunk)))) {
    for (int k = 0; k < kNumBceOperands; ++k) inner_strides[k] = layout.inner_stride(k);
    int64_t rows = 1;
    for (int d = 0; d < outer_dims; ++d) {
      outer_sizes[d] = FastDivider(static_cast<uint64_t>(layout.sizes[d]));
      for (int k = 0; k < kNumBceOperands; ++k) outer_strides[k][d] = layout.strides[k][d];
      rows *= layout.sizes[d];
    }
    num_chunks = rows * static_cast<int64_t>(chunks_per_row.divisor);
  }

  // The start of chunk `chunk`: its row-major element index `flat` and its offset in every operand; returns its
  // number of elements (kChunk but at a row's end).
  __device__ __forceinline__ int chunk_start(int64_t chunk, int64_t& flat, int64_t (&offsets)[kNumBceOperands]) const {
    const uint64_t row = chunks_per_row.divide(chunk);
    const int64_t first = (chunk - static_cast<int64_t>(row * chunks_per_row.divisor)) * kChunk;
    flat = static_cast<int64_t>(row) * row_length + first;
    for (int k = 0; k < kNumBceOperands; ++k) offsets[k] = first * inner_strides[k];
    uint64_t rest = row;
#pragma unroll
    for (int d = kMaxOuterDims - 1; d >= 0; --d) {
      if (d >= outer_dims) continue;
      const uint64_t outer = outer_sizes[d].divide(rest);
      const int64_t position = static_cast<int64_t>(rest - outer * outer_sizes[d].divisor);
      rest = outer;
      for (int k = 0; k < kNumBceOperands; ++k) offsets[k] += position * outer_strides[k][d];
    }
    return static_cast<int>(row_length - first < kChunk ? row_length - first : kChunk);
  }
};

// kFocusing and kWeighted as the flat kernel's: without weight, pos_weight and per-element grad_loss the kernel
// reads logits and target only, and takes the plain formula without pos_weight. A thread's chunks are chunk,
// chunk + num_threads, ...; a chunk's operands are loaded, then its elements evaluated in order (the sums' order
// is fixed). The last chunk of a row may be short: its loads beyond the row are predicated off and the loop over
// its elements stops at its count (uniform over a warp whose rows are all shorter than a chunk), so short rows
// cost no wasted math.
template <Pass pass, typename scalar_t, typename target_t, Focusing kFocusing, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, kFlatMinBlocks<scalar_t>)
    strided_kernel(PassArgs<scalar_t> args, const target_t* __restrict__ target,
                   StridedBceLayout<kStridedChunk<kFocusing, kWeighted>> layout) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kChunk = kStridedChunk<kFocusing, kWeighted>;
  if (keeps_forward_gradient<pass>(args)) return;
  const BceConfig<acc_t> cfg = kernel_config<kFocusing>(args.cfg);
  const int64_t num_threads = int64_t(gridDim.x) * kBlockThreads;
  const acc_t scale_all = uniform_scale<pass>(args);
  acc_t sum = 0;
  // With or without the stores, as the flat kernel's stepped loop.
  const auto sweep = [&](auto stores_tag) {
    constexpr bool kStores = decltype(stores_tag)::value;
    for (int64_t chunk = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x; chunk < layout.num_chunks;
         chunk += num_threads) {
      int64_t flat, offsets[kNumBceOperands];
      const int count = layout.chunk_start(chunk, flat, offsets);
      const auto at = [&](BceOperand operand, int e) { return offsets[operand] + e * layout.inner_strides[operand]; };
      // Logits and target through pointers stepped along the row: an add per element, not a multiply.
      const scalar_t* logits = args.logits + offsets[kLogits];
      const target_t* targets = target + offsets[kTarget];
      // Only the chunk's `count` elements are loaded and read.
      scalar_t z[kChunk];
      target_t y[kChunk];
      [[maybe_unused]] acc_t w[kChunk], q[kChunk], scale[kChunk];  // read by the weighted kernels only
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (e < count) {
          z[e] = *logits;
          y[e] = *targets;
          logits += layout.inner_strides[kLogits];
          targets += layout.inner_strides[kTarget];
          if constexpr (kWeighted) {
            w[e] = read_or(args.weight, at(kWeight, e), acc_t(1));
            q[e] = read_or(args.pos_weight, at(kPosWeight, e), acc_t(1));
            scale[e] = kReadsGradLoss<pass> ? read_or(args.grad_loss, at(kGradLoss, e), scale_all) : scale_all;
          }
        }
      }
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        if (e == count) break;
        const acc_t logit = static_cast<acc_t>(z[e]), label = element_as<acc_t>(y[e]);
        const ElementResult<acc_t> result =
            kWeighted ? evaluate_element<pass>(cfg, logit, label, w[e], q[e], scale[e])
                      : evaluate_element<pass>(cfg, logit, label, acc_t(1), UnitPosWeight{}, scale_all);
        sum += result.summed;
        if constexpr (kStores) args.out[flat + e] = static_cast<scalar_t>(result.stored);
      }
    }
  };
  if (writes_output<pass>(args)) {
    sweep(std::true_type{});
  } else if constexpr (pass == Pass::Forward) {
    sweep(std::false_type{});
  }
  store_partial_sum(args, sum);
}

// --------------------------------------------------------------------------------------------- sparse rows

constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
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

// An element as a negative (y = 0, no pos_weight), the sweep's and the patch's correction: bce_math.h's negative
// term without the positive one, which the general formula multiplies by y = 0, a product IEEE arithmetic keeps
// (it costs the positive's focusing factor and log-probability, and it is NaN where l_pos is infinite: z = -inf).
// The values are the general formula's, NaN at z = -inf included. Plain: the loss -log(1 - p) as
// (z - min(z, 0)) + log1p(e), whose z - min(z, 0) is NaN at z = -inf, and the gradient p. Focal / ASL: bce_math.h's
// terms with gamma_pos = 0 (l_pos = -log p: one product and one sum more than the negative term; ASL, whose
// terms use no log-probability, passes -min(z, 0) for it, with the same zeros and NaN); the gradient, NaN at
// z = -inf in the general formula when gamma_pos != 0, is set so.
template <Pass pass, Focusing kFocusing, typename Math, typename acc_t>
__device__ __forceinline__ ElementResult<acc_t> evaluate_negative(const BceConfig<acc_t>& cfg, acc_t z, acc_t w,
                                                                  acc_t scale) {
  acc_t loss = 0, grad = 0;
  if constexpr (kFocusing == Focusing::Plain) {
    if constexpr (pass != Pass::Backward) {
      const acc_t log1p_e = Math::log1p_unit_interval(Math::exp(-Math::abs(z)));
      loss = w * ((z - Math::min(z, acc_t(0))) + log1p_e);
    }
    if constexpr (pass != Pass::Forward) grad = w * sigmoid_parts<Math>(z, true, false).p;
  } else {
    constexpr bool kClipped = kFocusing == Focusing::Asymmetric;
    BceConfig<acc_t> negative_cfg = cfg;
    negative_cfg.gamma_pos = 0;
    SigmoidParts<acc_t> s = sigmoid_parts<Math>(z, kClipped || pass != Pass::Forward, !kClipped);
    if constexpr (kClipped) {
      s.log_p = Math::min(z, acc_t(0));
      s.log_one_minus_p = 0;
    }
    if constexpr (pass != Pass::Backward) loss = bce_loss_from_parts<Math>(negative_cfg, s, z, acc_t(0), w, acc_t(1));
    if constexpr (pass != Pass::Forward) {
      grad = bce_grad_from_parts<Math>(negative_cfg, s, acc_t(0), w, acc_t(1));
      if (cfg.gamma_pos != acc_t(0) && z == -std::numeric_limits<acc_t>::infinity()) {
        grad = std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  }
  // Scaled as evaluate_element scales.
  if constexpr (pass == Pass::Forward) return {loss * scale, loss * scale};
  else if constexpr (pass == Pass::Backward) return {grad * scale, grad * scale};
  else return {loss, grad * scale};
}

// Resident blocks the sparse kernels are compiled for: 4 (at most 64 registers at 256 threads) on the float
// paths; the double paths are not limited.
template <typename scalar_t>
constexpr int kSparseMinBlocks = std::is_same_v<scalar_t, double> ? 1 : 4;

// Packs per step of a lane's sweep: 2 for plain BCE without weight operands (the loop's addresses, count and
// branch shared by 16 elements in bf16 / fp16), else 1 (the registers hold one pack's evaluation).
template <Focusing kFocusing, bool kWeighted>
constexpr int kSweepPacks = kFocusing == Focusing::Plain && !kWeighted ? 2 : 1;

// How a sweep reads an optional operand: never (absent), without a null test (present), or testing for null
// (maybe: one loop for either, where a version per case would spill; a test per pack in the vectorized sweep).
enum class OperandRead { kAbsent, kPresent, kMaybe };
template <OperandRead mode>
using OperandReadTag = std::integral_constant<OperandRead, mode>;

template <OperandRead mode, typename T, typename acc_t>
__device__ __forceinline__ acc_t read_operand(const T* __restrict__ data, int64_t offset, acc_t absent) {
  if constexpr (mode == OperandRead::kAbsent) return absent;
  else if constexpr (mode == OperandRead::kPresent) return static_cast<acc_t>(data[offset]);
  else return read_or(data, offset, absent);
}

// `Count` consecutive labels of an optional operand from `at`, in a row whose labels are `stride` apart: a
// pointer step per element (not a 64-bit product of label and stride each). kMaybe tests for null once.
template <OperandRead mode, int Count, typename T, typename acc_t>
__device__ __forceinline__ void read_labels(const T* __restrict__ at, int64_t stride, acc_t absent,
                                            acc_t (&out)[Count]) {
  if (mode == OperandRead::kAbsent || (mode == OperandRead::kMaybe && at == nullptr)) {
#pragma unroll
    for (int k = 0; k < Count; ++k) out[k] = absent;
  } else {
#pragma unroll
    for (int k = 0; k < Count; ++k, at += stride) out[k] = static_cast<acc_t>(*at);
  }
}

// The `vec` logits of a 16-byte pack as acc_t. bf16 through the pack's 32-bit words: the lower value is the
// word shifted up, the upper one the word masked (one instruction each; converting the upper value as a bf16
// takes two).
template <typename scalar_t, typename acc_t, int vec>
__device__ __forceinline__ void load_logits(const scalar_t* logits, acc_t (&z)[vec]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const Pack<uint32_t, 4> words = *reinterpret_cast<const Pack<uint32_t, 4>*>(logits);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      z[2 * k] = std::bit_cast<float>(words.values[k] << 16);
      z[2 * k + 1] = std::bit_cast<float>(words.values[k] & 0xffff0000u);
    }
  } else {
    load_packs<vec>(logits, z);
  }
}

// `value`, which the compiler cannot trace back to its computation. The sparse kernel's row and chunk loops pass
// their variable through it: nvcc then computes what a row or chunk derives from it (offsets, bounds) from the
// value itself, and carries no induction variables of its own across the sweep (a step counter, row * 2), which
// spilled at the 64-register bound (docs/design.md, "Sparse targets").
__device__ __forceinline__ int64_t opaque_to_optimizer(int64_t value) {
#ifndef FUSED_LOSSES_HOST_EMULATION
  asm("" : "+l"(value));
#endif
  return value;
}

// A warp per row, in two steps per chunk of kChunkLabels labels (docs/design.md, "Sparse targets"): a dense
// sweep evaluates every element as a negative (y = 0, evaluate_negative): no label test in the loop, and no
// pos_weight; then, after a __syncwarp, the lanes walk the row's index list, kWarpSize positions at a time, and
// patch each positive label of the chunk once: the sum gets loss_pos - loss_neg, the stored value (loss or
// gradient) is overwritten with the positive one, computed directly. A row with an invalid index is NaN
// throughout. kFocusing: the formulas the kernel holds, as the flat kernel's; kWeighted: a weight or per-element
// grad_loss operand (pos_weight is read by the patches only). `layout` is exactly (N, L): row r, label c of
// operand k is at r * strides[k][0] + c * strides[k][1].
template <Pass pass, typename scalar_t, Focusing kFocusing, bool kWeighted>
__global__ void __launch_bounds__(kBlockThreads, kSparseMinBlocks<scalar_t>)
    sparse_rows_kernel(PassArgs<scalar_t> args, const int64_t* __restrict__ indices, int64_t max_positives,
                       BceLayout layout, bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  using Math = ElementMath<acc_t>;
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
  // (OperandReadTag) say; `stores` / `sums` (std::bool_constant): whether the pass stores per-element values and
  // adds up the losses (the forward does one of the two: 'none' or a reduction). The row, chunk and batch loops
  // are uniform over the warp, so every lane reaches every vote and __syncwarp.
  const auto all_rows = [&](auto weight_read, auto scale_read, auto stores, auto sums) {
    constexpr bool kStores = decltype(stores)::value, kSums = decltype(sums)::value;
    for (int64_t next_row = int64_t(blockIdx.x) * kWarpsPerBlock + warp; next_row < num_rows;
         next_row += int64_t(gridDim.x) * kWarpsPerBlock) {
      const int64_t row = opaque_to_optimizer(next_row);
      const int64_t* row_indices = indices + row * max_positives;
      const scalar_t* row_logits = args.logits + row * layout.strides[kLogits][0];
      scalar_t* row_out = kStores ? args.out + row * num_labels : nullptr;
      if (row_has_invalid_index(row_indices, max_positives, num_labels, lane)) {
        constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();  // never a silent number
        if constexpr (kSums) sum += kNaN;
        if constexpr (kStores) {
#pragma unroll 1  // a rare path: unrolled, its pointers are values held across the rows (spilled)
          for (int64_t label = lane; label < num_labels; label += kWarpSize) {
            row_out[label] = static_cast<scalar_t>(kNaN);
          }
        }
        continue;
      }
      const auto offset = [&](BceOperand operand, int64_t label) {
        return row * layout.strides[operand][0] + label * layout.strides[operand][1];
      };
      const auto weight_of = [&](int64_t label) {
        return read_operand<decltype(weight_read)::value>(args.weight, offset(kWeight, label), acc_t(1));
      };
      const auto scale_of = [&](int64_t label) {
        return read_operand<decltype(scale_read)::value>(args.grad_loss, offset(kGradLoss, label), scale_all);
      };
      const auto negative = [&](int64_t label, acc_t z) {
        return evaluate_negative<pass, kFocusing, Math>(cfg, z, weight_of(label), scale_of(label));
      };
      // The row's operands at label 0, for the packs (null when absent).
      const acc_t* row_weight = args.weight != nullptr ? args.weight + offset(kWeight, 0) : nullptr;
      const scalar_t* row_grad_loss = args.grad_loss != nullptr ? args.grad_loss + offset(kGradLoss, 0) : nullptr;
      for (int64_t next_chunk = 0; next_chunk < num_labels; next_chunk += kChunkLabels) {
        const int64_t chunk = opaque_to_optimizer(next_chunk);
        const int64_t chunk_end = std::min(num_labels, chunk + kChunkLabels);
        if (several_batches) {
          for (int word = lane; word < kChunkWords; word += kWarpSize) bitmap[word] = 0;
        }
        if (vectorized) {  // chunk and chunk_end are multiples of vec: packs never straddle a chunk
          // The lane's packs through pointers stepped by the warp's stride: a step's packs are at fixed distances
          // from them (immediate offsets), with no address arithmetic per pack.
          constexpr int kLanePacks = kWarpSize * vec;  // elements between a lane's consecutive packs
          constexpr int kPacks = kSweepPacks<kFocusing, kWeighted>;
          const scalar_t* logits = row_logits + chunk + lane * vec;
          scalar_t* out = kStores ? row_out + chunk + lane * vec : nullptr;
          // The operands at the label of `logits`, stepped with it (null when absent: its strides are 0).
          const int64_t weight_stride = layout.strides[kWeight][1], grad_loss_stride = layout.strides[kGradLoss][1];
          const acc_t* weight = row_weight != nullptr ? row_weight + (chunk + lane * vec) * weight_stride : nullptr;
          const scalar_t* grad_loss =
              row_grad_loss != nullptr ? row_grad_loss + (chunk + lane * vec) * grad_loss_stride : nullptr;
          // The lane's packs in the chunk (a 32-bit count: a chunk holds kChunkLabels labels).
          int packs_left = (static_cast<int>(chunk_end - chunk) - lane * vec + kLanePacks - 1) / kLanePacks;
          // `packs` (std::integral_constant) packs from the pointers.
          const auto sweep_packs = [&](auto packs) {
#pragma unroll
            for (int pack = 0; pack < decltype(packs)::value; ++pack) {
              acc_t z[vec], w[vec], scale[vec], value[vec];
              load_logits(logits + pack * kLanePacks, z);
              read_labels<decltype(weight_read)::value>(weight + pack * kLanePacks * weight_stride, weight_stride,
                                                        acc_t(1), w);
              read_labels<decltype(scale_read)::value>(grad_loss + pack * kLanePacks * grad_loss_stride,
                                                       grad_loss_stride, scale_all, scale);
#pragma unroll
              for (int k = 0; k < vec; ++k) {
                const ElementResult<acc_t> result =
                    evaluate_negative<pass, kFocusing, Math>(cfg, z[k], w[k], scale[k]);
                if constexpr (kSums) sum += result.summed;
                value[k] = result.stored;
              }
              if constexpr (kStores) store_packs<vec>(out + pack * kLanePacks, value);
            }
          };
          // kPacks packs per step, then at most one left (not a loop: the loop's cost stays per step).
          for (; packs_left >= kPacks; packs_left -= kPacks) {
            sweep_packs(std::integral_constant<int, kPacks>{});
            logits += kPacks * kLanePacks;
            if constexpr (kStores) out += kPacks * kLanePacks;
            if (decltype(weight_read)::value != OperandRead::kAbsent) weight += kPacks * kLanePacks * weight_stride;
            if (decltype(scale_read)::value != OperandRead::kAbsent) {
              grad_loss += kPacks * kLanePacks * grad_loss_stride;
            }
          }
          if (kPacks > 1 && packs_left > 0) sweep_packs(std::integral_constant<int, 1>{});
        } else {
          for (int64_t label = chunk + lane; label < chunk_end; label += kWarpSize) {
            const ElementResult<acc_t> result = negative(label, static_cast<acc_t>(row_logits[label * logit_stride]));
            if constexpr (kSums) sum += result.summed;
            if constexpr (kStores) row_out[label] = static_cast<scalar_t>(result.stored);
          }
        }
        __syncwarp();  // the sweep's stores (and the cleared bitmap) are visible before the patches
        for (int64_t base = 0; base < max_positives; base += kWarpSize) {
          const int64_t position = base + lane;
          const int64_t label = position < max_positives ? row_indices[position] : int64_t(-1);
          if (first_in_chunk(label, chunk, chunk_end, bitmap, several_batches, lane)) {
            const acc_t z = static_cast<acc_t>(row_logits[label * logit_stride]);
            const acc_t w = weight_of(label), scale = scale_of(label);
            const acc_t q = read_or(args.pos_weight, offset(kPosWeight, label), acc_t(1));
            const ElementResult<acc_t> positive = evaluate_element<pass, acc_t, Math>(cfg, z, acc_t(1), w, q, scale);
            if constexpr (kStores) row_out[label] = static_cast<scalar_t>(positive.stored);
            // The sum only: loss_pos - loss_neg (docs/design.md, "Sparse targets": its rounding).
            if constexpr (kSums) {
              sum += positive.summed - evaluate_negative<pass, kFocusing, Math>(cfg, z, w, scale).summed;
            }
          }
          if (several_batches) __syncwarp();  // the batch's bits are set before the next batch tests them
        }
      }
    }
  };
  using Absent = OperandReadTag<OperandRead::kAbsent>;
  using Present = OperandReadTag<OperandRead::kPresent>;
  using Maybe = OperandReadTag<OperandRead::kMaybe>;
  constexpr std::bool_constant<pass != Pass::Forward> kGradientStores{};
  constexpr std::bool_constant<pass != Pass::Backward> kGradientSums{};
  if constexpr (pass == Pass::Forward) {  // 'none' stores the losses, a reduction sums them
    using WeightRead = std::conditional_t<kWeighted, Present, Absent>;  // the forward's operand is a weight
    if (args.out != nullptr) all_rows(WeightRead{}, Absent{}, std::true_type{}, std::false_type{});
    else all_rows(WeightRead{}, Absent{}, std::false_type{}, std::true_type{});
  } else if constexpr (pass == Pass::Backward && kWeighted) {  // a weight, a per-element grad_loss or both
    all_rows(Maybe{}, Maybe{}, kGradientStores, kGradientSums);  // one loop (a version per case spills)
  } else {  // only the backward has a per-element grad_loss
    all_rows(std::conditional_t<kWeighted, Present, Absent>{}, Absent{}, kGradientStores, kGradientSums);
  }
  store_partial_sum(args, sum);
}

// ------------------------------------------------------------------------------------------------ launches

inline bool operand_is_contiguous(const BceLayout& layout, int operand) {
  int64_t expected = 1;
  for (int d = layout.dims - 1; d >= 0; --d) {
    if (layout.strides[operand][d] != expected) return false;
    expected *= layout.sizes[d];
  }
  return true;
}

// How the flat kernel reads a weight or grad_loss operand whose steps start at elements ≡ `head` (mod the
// step): as (row, label) strides of the (rows, L) view; nullopt when its outer dimensions do not collapse to
// one row stride (e.g. a weight broadcast along a middle dimension).
template <int S, typename T>
std::optional<FlatOperand<T>> as_flat_operand(const BceLayout& layout, int operand, const T* data, int64_t head) {
  FlatOperand<T> flat;
  if (data == nullptr) return flat;
  flat.data = data;
  const int last = layout.dims - 1;
  const int64_t num_labels = layout.inner_size();
  flat.label_stride = layout.inner_stride(operand);
  flat.row_stride = last >= 1 ? layout.strides[operand][last - 1] : 0;
  // Row r of the outer dimensions must be at r * row_stride.
  int64_t rows_inside = 1;
  for (int d = last - 1; d >= 0; --d) {
    if (layout.strides[operand][d] != flat.row_stride * rows_inside) return std::nullopt;
    rows_inside *= layout.sizes[d];
  }
  flat.wrap_step = flat.row_stride - (num_labels - 1) * flat.label_stride;
  // Sub-packs start at elements ≡ head (mod S); they stay inside one row when rows are whole sub-packs.
  const bool sub_packs_in_rows = last <= 0 || (head % S == 0 && num_labels % S == 0);
  const size_t run_bytes = S * sizeof(T);
  if (operand_is_contiguous(layout, operand)) {
    flat.form = is_aligned_to(data + head, run_bytes) ? FlatForm::Packs : FlatForm::Elements;
  } else if (flat.label_stride == 1 && sub_packs_in_rows && flat.row_stride % S == 0 && is_aligned_to(data, run_bytes)) {
    flat.form = FlatForm::Packs;
  } else if (flat.label_stride == 0 && sub_packs_in_rows) {
    flat.form = FlatForm::Broadcast;
  } else {
    flat.form = FlatForm::Elements;
  }
  return flat;
}

inline FlatAdvance flat_advance(int64_t elements, int64_t num_labels) {
  return {elements / num_labels, elements % num_labels};
}

// The first element (below kFlatAlignmentElements, at most numel) where logits and target are both 16-byte
// aligned: a base misaligned by the same number of elements in each peels a short head. nullopt when there is none.
// (The output, a fresh tensor, is stored in packs when it is aligned at the head too, else one element per thread.)
template <typename scalar_t, typename target_t>
std::optional<int64_t> flat_head(const PassArgs<scalar_t>& args, const target_t* target) {
  for (int64_t head = 0; head < kFlatAlignmentElements<scalar_t, target_t>; ++head) {
    if (is_aligned_16(args.logits + head) && is_aligned_16(target + head)) return std::min(head, args.numel);
  }
  return std::nullopt;
}

// Calls f(focusing, weighted) with both as compile-time constants (std::integral_constant): one kernel
// instantiation each.
template <typename F>
void with_kernel_variant(Focusing focusing, bool weighted, const F& f) {
  const auto with_weighted = [&](auto focusing_tag) {
    if (weighted) f(focusing_tag, std::true_type{});
    else f(focusing_tag, std::false_type{});
  };
  switch (focusing) {
    case Focusing::Plain: with_weighted(std::integral_constant<Focusing, Focusing::Plain>{}); break;
    case Focusing::Focal: with_weighted(std::integral_constant<Focusing, Focusing::Focal>{}); break;
    case Focusing::Asymmetric: with_weighted(std::integral_constant<Focusing, Focusing::Asymmetric>{}); break;
  }
}

// Launches one pass over every element. For a reduced forward, `partials` receives the (blocks,) per-block
// sums; returns the number of blocks.
template <Pass pass, typename scalar_t, typename target_t>
int64_t launch_pass(const BceProblem& p, PassArgs<scalar_t> args, at::Tensor* partials, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  // A pass that sums per block needs the device-independent grid; the others (gradients, 'none') do not.
  const auto grid_for = [&](auto kernel, int64_t work_items, int64_t items_per_block) {
    return partials != nullptr ? grid_size(work_items, items_per_block)
                               : map_grid_size(kernel, work_items, items_per_block);
  };
  const auto allocate_partials = [&](int64_t blocks) {
    if (partials == nullptr) return;
    *partials = at::empty({blocks}, p.input.options().dtype(acc_scalar_type(p.input.scalar_type())));
    args.partials = partials->data_ptr<acc_t>();
  };
  TORCH_INTERNAL_ASSERT(kReadsGradLoss<pass> || args.grad_loss == nullptr,
                        "weighted_bce_with_logits: a per-element grad_loss outside the backward");
  if constexpr (std::is_same_v<target_t, SparseTargets>) {
    constexpr int vec = kVecSize<scalar_t>;
    const bool vectorized = p.layout.strides[kLogits][1] == 1 && p.layout.strides[kLogits][0] % vec == 0 &&
                            p.num_labels % vec == 0 && is_aligned_16(args.logits) &&
                            (args.out == nullptr || is_aligned_16(args.out));
    int64_t blocks = 0;
    with_kernel_variant(focusing_of(args.cfg), args.weight != nullptr || args.grad_loss != nullptr,
                        [&](auto focusing, auto weighted) {
                          constexpr Focusing kFocusing = decltype(focusing)::value;
                          constexpr bool kWeighted = decltype(weighted)::value;
                          const auto kernel = sparse_rows_kernel<pass, scalar_t, kFocusing, kWeighted>;
                          blocks = grid_for(kernel, p.num_rows(), kWarpsPerBlock);
                          allocate_partials(blocks);
                          launch_kernel(kernel, blocks, stream, args, p.positive_indices->const_data_ptr<int64_t>(),
                                        p.max_positives, p.layout, vectorized);
                        });
    return blocks;
  } else {
    const target_t* target = p.data<target_t>(kTarget);
    // Which kernel variant reads weight operands (a per-element grad_loss counts as one), flat or strided.
    const bool weighted = args.weight != nullptr || args.pos_weight != nullptr || args.grad_loss != nullptr;
    const std::optional<int64_t> head =
        operand_is_contiguous(p.layout, kLogits) && operand_is_contiguous(p.layout, kTarget)
            ? flat_head(args, target)
            : std::nullopt;
    if (head) {
      constexpr int S = kSubPackElements<scalar_t>;
      const auto weight = as_flat_operand<S>(p.layout, kWeight, args.weight, *head);
      const auto pos_weight = as_flat_operand<S>(p.layout, kPosWeight, args.pos_weight, *head);
      const auto grad_loss = as_flat_operand<S>(p.layout, kGradLoss, args.grad_loss, *head);
      if (weight && pos_weight && grad_loss) {
        const int64_t num_labels = p.layout.inner_size();
        // The outputs are fresh tensors, 16-byte aligned at element 0: whether their packs are aligned from the
        // head depends on the layout alone, so every pass (a reduced forward without an output too) splits the
        // elements between the stepped and the one-per-thread loop alike, and both schedules add the losses in
        // one order. (A gradient passed in from outside that is misaligned anyway goes element by element.)
        const bool out_packed =
            (*head * sizeof(scalar_t)) % 16 == 0 && (args.out == nullptr || is_aligned_16(args.out + *head));
        int64_t blocks = 0;
        with_kernel_variant(focusing_of(args.cfg), weighted, [&](auto focusing, auto weighted_tag) {
          constexpr Focusing kFocusing = decltype(focusing)::value;
          constexpr int E = kFlatStepElements<scalar_t, target_t, kFocusing>;
          const auto kernel = flat_kernel<pass, scalar_t, target_t, kFocusing, decltype(weighted_tag)::value>;
          blocks = grid_for(kernel, (p.numel - *head) / E, kBlockThreads);
          allocate_partials(blocks);
          const FlatOperands<scalar_t> operands{*weight, *pos_weight, *grad_loss, num_labels,
                                                flat_advance(S, num_labels),
                                                flat_advance(blocks * kBlockThreads * E, num_labels)};
          launch_kernel(kernel, blocks, stream, args, target, operands, *head, out_packed);
        });
        return blocks;
      }
    }
    int64_t blocks = 0;
    with_kernel_variant(focusing_of(args.cfg), weighted, [&](auto focusing, auto weighted_tag) {
      constexpr Focusing kFocusing = decltype(focusing)::value;
      constexpr bool kWeighted = decltype(weighted_tag)::value;
      const auto kernel = strided_kernel<pass, scalar_t, target_t, kFocusing, kWeighted>;
      const StridedBceLayout<kStridedChunk<kFocusing, kWeighted>> layout(p.layout);
      blocks = grid_for(kernel, layout.num_chunks, kBlockThreads);
      allocate_partials(blocks);
      launch_kernel(kernel, blocks, stream, args, target, layout);
    });
    return blocks;
  }
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

// One pass over every element of the problem: its kernel for the layout, the dtype and the target form. `out`:
// the per-element losses ('none') or the gradient, nullptr for a reduced forward without the gradient;
// `partials` receives the per-block sums of a reduced forward (else nullptr). Returns the number of blocks.
template <Pass pass>
int64_t launch_problem_pass(const BceProblem& p, at::Tensor* out, at::Tensor* partials, bool skip_unit_grad_loss,
                            cudaStream_t stream) {
  int64_t blocks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits", [&] {
    PassArgs<scalar_t> args = make_pass_args<scalar_t>(p);
    args.out = out != nullptr ? out->data_ptr<scalar_t>() : nullptr;
    args.skip_unit_grad_loss = skip_unit_grad_loss;
    dispatch_bce_target<scalar_t>(p, [&](auto target_tag) {
      blocks = launch_pass<pass, scalar_t, decltype(target_tag)>(p, args, partials, stream);
    });
  });
  return blocks;
}

}  // namespace

// The passes, each compiled in a file of its own (weighted_bce_with_logits_<pass>.cu) so that nvcc builds
// their kernels in parallel; arguments as launch_problem_pass's.
int64_t launch_bce_forward(const BceProblem& p, at::Tensor* out, at::Tensor* partials, cudaStream_t stream);
int64_t launch_bce_forward_with_gradient(const BceProblem& p, at::Tensor& gradient, at::Tensor* partials,
                                         cudaStream_t stream);
void launch_bce_backward(const BceProblem& p, at::Tensor& grad_input, bool skip_unit_grad_loss, cudaStream_t stream);

}  // namespace fused_losses::cuda
