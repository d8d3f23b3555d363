// CUDA kernels of fused_losses::correlation_loss (Pearson and CCC).
//
// Schedules (common.h), with no host synchronisation anywhere (CUDA graphs capture every path):
// - 3-pass: the forward reads x, y (and the mask) once and saves O(B D) Moments per sequence; the backward
//   re-reads x, y and writes the gradient(s).
// - 2-pass, with write_input_gradient / write_target_gradient (a reduced loss): the forward also writes the
//   gradient for grad_loss = 1. When each sequence is one chunk, the group that computed a sequence's moments
//   sweeps it again right away (the rows come back from L1/L2) and writes the gradient; for 'mean' the divisor
//   is known on the host without a mask, else a pre-pass over the mask sums it exactly as the forward does.
//   When sequences are cut into chunks, the moments need the cross-chunk merge first, so the forward runs the
//   backward's gradient kernel after them. The in-place backward returns at once when grad_loss (read on the
//   device) is 1, else it recomputes the gradient exactly as the 3-pass backward.
// Both schedules evaluate the same coefficient code (correlation_math.h), so they give the same bits.
//
// Work is split into items = (sequence, chunk of steps), each owned by a group of G lanes:
//   G = 1 when steps are strided (consecutive threads read consecutive sequences) or very short,
//   G = 4 for a few hundred bytes per sequence (B = 65536, T = 100), a warp up to a few KB,
//   G = the block beyond (T = 4096 fp32),
// and long sequences that would leave the GPU idle (B = 256, T = 262144) are cut into several chunks whose
// partial Moments (Chan-mergeable) a second kernel merges in chunk order. All reductions run in a fixed order
// and the split depends on the problem only, so results are bitwise reproducible.
// Steps are read as 16-byte packs when every operand has unit time stride and the same alignment at every
// sequence start (the mask's bytes of a pack then one word); the sweep peels the unaligned head and tail of each
// chunk element by element. The kernels' register budget (64, 4 blocks per SM): docs/design.md, "Registers
// (issue 15)".
#include "correlation_loss.h"
#include "cuda/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace fused_losses::cuda {
namespace {

// ----------------------------------------------------------------------------- operands and rows

// One sequence's row of a (B, T, D) operand. load/store<N> move the N steps from t on: N = 1 at any stride, or
// one aligned 16-byte pack (N = kVecSize, unit stride; the sweep guarantees both).
template <typename T>
struct Row {
  T* ptr;
  int64_t stride;

  // The vectorised sweep's operands have unit stride (packs_line_up): with the constant in place of the field,
  // the compiler keeps no stride register through that sweep.
  __device__ void assume_unit_stride() { stride = 1; }

  template <int N, typename acc_t>
  __device__ void load(int64_t t, acc_t (&out)[N]) const {
    if constexpr (N == 1) {
      out[0] = static_cast<acc_t>(ptr[t * stride]);
    } else {
      static_assert(N == kVecSize<std::remove_const_t<T>>, "a pack is one 16-byte load");
      const auto pack = load_pack(ptr + t);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(pack.values[i]);
    }
  }

  template <int N, typename acc_t>
  __device__ void store(int64_t t, const acc_t (&values)[N]) const {
    if constexpr (N == 1) {
      ptr[t * stride] = static_cast<T>(values[0]);
    } else {
      static_assert(N == kVecSize<T>, "a pack is one 16-byte store");
      Pack<T, N> pack;
#pragma unroll
      for (int i = 0; i < N; ++i) pack.values[i] = static_cast<T>(values[i]);
      store_pack(ptr + t, pack);
    }
  }
};

// An unsigned integer of N bytes (N = 2, 4, 8): the mask bytes of one pack of steps.
template <int N>
using MaskWord = std::conditional_t<N == 8, uint64_t, std::conditional_t<N == 4, uint32_t, uint16_t>>;

// The mask row of a sequence (nullptr: every step is valid); any non-zero byte is a valid step. One step (N = 1)
// is read at the row's stride; the N steps of a pack as one N-byte word (unit stride and an address that is a
// multiple of N: packs_line_up checks both), which takes one register where N byte loads took N.
struct MaskRow {
  const bool* ptr;
  int64_t stride;

  template <int N>
  __device__ void load(int64_t t, bool (&out)[N]) const {
    if constexpr (N == 1) {
      out[0] = ptr == nullptr || element_as<int>(ptr[t * stride]) != 0;
    } else {
      const MaskWord<N> word = ptr == nullptr ? MaskWord<N>(0) : *reinterpret_cast<const MaskWord<N>*>(ptr + t);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = ptr == nullptr || ((word >> (8 * i)) & 0xff) != 0;  // little-endian
    }
  }
  __device__ void assume_unit_stride() { stride = 1; }
};

// A (B, T, D) tensor (or a (B, T) mask) on the device with its layout; data nullptr for an absent one, whose
// rows are null too.
template <typename T>
struct Operand {
  T* data = nullptr;
  RowLayout layout{};
  __device__ Row<T> row(int64_t seq) const {
    if (data == nullptr) return {nullptr, 0};
    return {data + layout.row_offset(seq), layout.class_stride};
  }
};

// An operand as the host sees it when choosing the sweep.
struct OperandView {
  const void* data;
  RowLayout layout;
};

template <typename T>
OperandView view_of(const Operand<T>& operand) {
  return {operand.data, operand.layout};
}

template <typename T>
Operand<T> make_operand(T* data, const at::Tensor& t, int64_t channels) {
  return {data, sequence_layout(t, channels)};
}

// x, y and the mask: what every kernel reads.
template <typename scalar_t>
struct Inputs {
  Operand<const scalar_t> x, y;
  Operand<const bool> mask;  // data nullptr without a mask
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const CorrelationProblem& p) {
  Inputs<scalar_t> in;
  in.x = make_operand(p.input.const_data_ptr<scalar_t>(), p.input, p.channels);
  in.y = make_operand(p.target.const_data_ptr<scalar_t>(), p.target, p.channels);
  if (p.mask.has_value()) in.mask = {p.mask->const_data_ptr<bool>(), p.mask_layout};
  return in;
}

// The steps of one sequence: x, y and validity, loaded together.
template <typename scalar_t>
struct StepReader {
  using acc_t = acc_type<scalar_t>;
  Row<const scalar_t> x, y;
  MaskRow valid;

  __device__ StepReader(const Inputs<scalar_t>& in, int64_t seq) : x(in.x.row(seq)), y(in.y.row(seq)) {
    const Row<const bool> mask = in.mask.row(seq);
    valid = {mask.ptr, mask.stride};
  }

  template <int N>
  __device__ void load(int64_t t, acc_t (&xs)[N], acc_t (&ys)[N], bool (&ok)[N]) const {
    x.template load<N>(t, xs);
    y.template load<N>(t, ys);
    valid.template load<N>(t, ok);
  }

  // Steps from the start of x's row to the next 16-byte boundary, modulo a pack (the same for every operand
  // when the sweep is vectorised).
  __device__ int misalignment() const {
    return static_cast<int>((reinterpret_cast<uintptr_t>(x.ptr) / sizeof(scalar_t)) % kVecSize<scalar_t>);
  }

  __device__ void assume_unit_stride() {
    x.assume_unit_stride();
    y.assume_unit_stride();
    valid.assume_unit_stride();
  }
};

// The steps of one sequence as deviations from its saved centres: what every pass after the statistics reads.
// Visitors derive from it (and so share misalignment()).
template <typename scalar_t>
struct CentredSteps {
  using acc_t = acc_type<scalar_t>;
  StepReader<scalar_t> steps;
  Centre<acc_t> centre_x, centre_y;

  __device__ CentredSteps(const Inputs<scalar_t>& in, int64_t seq, const Moments<acc_t>& m)
      : steps(in, seq), centre_x(m.centre_x()), centre_y(m.centre_y()) {}

  // Deviations of the N steps from t (0 on steps that are not valid).
  template <int N>
  __device__ void load_deviations(int64_t t, acc_t (&dx)[N], acc_t (&dy)[N], bool (&ok)[N]) const {
    steps.template load<N>(t, dx, dy, ok);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      dx[i] = ok[i] ? centre_x.deviation(dx[i]) : acc_t(0);
      dy[i] = ok[i] ? centre_y.deviation(dy[i]) : acc_t(0);
    }
  }

  __device__ int misalignment() const { return steps.misalignment(); }
  __device__ void assume_unit_stride() { steps.assume_unit_stride(); }
  __device__ void end_run() {}  // these sweeps need no break between runs
};

template <typename acc_t>
__device__ Moments<acc_t> saved_moments(const acc_t* stats, int64_t seq) {
  return Moments<acc_t>::load(stats + seq * Moments<acc_t>::kWidth);
}

// True when x, y and the other operands of a sweep have unit time stride and the same address modulo 16 bytes
// at every sequence start, so one head peel aligns them all, and the mask (if any) has unit time stride and
// holds the validity bytes of each aligned pack at an address that is a multiple of the pack (MaskRow::load).
template <typename scalar_t>
bool packs_line_up(const Inputs<scalar_t>& in, c10::ArrayRef<OperandView> others = {}) {
  constexpr int64_t kPack = kVecSize<scalar_t>;
  const OperandView first = view_of(in.x);
  if (reinterpret_cast<uintptr_t>(first.data) % sizeof(scalar_t) != 0) return false;
  const auto same_modulo_16 = [](int64_t a, int64_t b) { return (a - b) * int64_t(sizeof(scalar_t)) % 16 == 0; };
  std::vector<OperandView> operands{first, view_of(in.y)};
  operands.insert(operands.end(), others.begin(), others.end());
  for (const OperandView& operand : operands) {
    const auto byte_gap = reinterpret_cast<intptr_t>(operand.data) - reinterpret_cast<intptr_t>(first.data);
    if (operand.layout.class_stride != 1 || byte_gap % 16 != 0 ||
        !same_modulo_16(operand.layout.outer_stride, first.layout.outer_stride) ||
        (operand.layout.inner > 1 && !same_modulo_16(operand.layout.inner_stride, first.layout.inner_stride))) {
      return false;
    }
  }
  if (in.mask.data == nullptr) return true;
  // Mask byte of step t at (x's address in elements + t) modulo the pack, at every sequence start.
  const RowLayout& mask = in.mask.layout;
  const auto mask_gap = reinterpret_cast<intptr_t>(in.mask.data) -
                        reinterpret_cast<intptr_t>(first.data) / static_cast<intptr_t>(sizeof(scalar_t));
  return mask.class_stride == 1 && mask_gap % kPack == 0 &&
         (mask.outer_stride - first.layout.outer_stride) % kPack == 0 &&
         (mask.inner <= 1 || (mask.inner_stride - first.layout.inner_stride) % kPack == 0);
}

// ----------------------------------------------------------------------------- work split

// Items are (sequence, chunk) pairs, item = chunk * sequences + sequence, so that consecutive threads of a
// G = 1 launch read consecutive sequences.
struct ChunkPlan {
  int64_t sequences, steps, chunk_steps, chunks;
  int lanes;           // G, lanes per item
  int64_t item_count;  // sequences * chunks, kept so that the kernels read it instead of holding the product

  __host__ __device__ int64_t items() const { return item_count; }
  __device__ int64_t sequence(int64_t item) const { return item % sequences; }
  __device__ int64_t chunk_begin(int64_t item) const { return (item / sequences) * chunk_steps; }
  __device__ int64_t chunk_end(int64_t item) const {
    const int64_t end = chunk_begin(item) + chunk_steps;
    return end < steps ? end : steps;
  }
};

// Enough threads to keep a large GPU's memory system busy. A constant, not a device query: the split (and so
// the rounding of the results) depends on the problem only.
constexpr int64_t kTargetThreads = int64_t(1) << 19;
// A chunk gives each lane at least kMinLoadsPerLane loads and has at least kMinChunkSteps steps (strided rows).
// A lane visits its loads in runs of kRunLoads (sweep_chunk), after which the moments sweep folds its sums.
#ifdef FUSED_LOSSES_SMALL_LIMITS
constexpr int64_t kMinLoadsPerLane = 2, kMinChunkSteps = 8, kRunLoads = 2;
#else
constexpr int64_t kMinLoadsPerLane = 32, kMinChunkSteps = 512, kRunLoads = 16;
#endif

ChunkPlan make_chunk_plan(int64_t sequences, int64_t steps, bool time_contiguous, int pack) {
  const int64_t units = ceil_div(steps, pack);  // loads per input and sequence
  ChunkPlan plan{sequences, steps, std::max<int64_t>(steps, 1), 1, 1, sequences};
  if (!time_contiguous || units <= 4) {
    plan.lanes = 1;
  } else if (units <= 64) {
    plan.lanes = 4;
  } else if (units <= 512) {
    plan.lanes = kWarpSize;
  } else {
    plan.lanes = kBlockThreads;
  }
  const int64_t min_chunk_steps = std::max<int64_t>(kMinLoadsPerLane * plan.lanes * pack, kMinChunkSteps);
  const int64_t threads = sequences * plan.lanes;
  if (threads >= kTargetThreads || steps < 2 * min_chunk_steps) return plan;
  const int64_t wanted = std::min(ceil_div(steps, min_chunk_steps), ceil_div(kTargetThreads, threads));
  const int64_t granule = int64_t(plan.lanes) * pack;  // chunks of whole packs, the same number per lane
  plan.chunk_steps = ceil_div(ceil_div(steps, wanted), granule) * granule;
  plan.chunks = ceil_div(steps, plan.chunk_steps);
  plan.item_count = plan.sequences * plan.chunks;
  return plan;
}

// The split of one launch: packs of 16 bytes when the operands allow them (packs_line_up), single steps else.
template <typename scalar_t>
ChunkPlan plan_sweep(const CorrelationProblem& p, bool vectorized) {
  const bool time_contiguous = p.input_layout.class_stride == 1 && p.target_layout.class_stride == 1;
  return make_chunk_plan(p.sequences(), p.time, time_contiguous, vectorized ? kVecSize<scalar_t> : 1);
}

template <typename F>
void dispatch_lanes(int lanes, const F& f) {
  switch (lanes) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case kWarpSize: return f(std::integral_constant<int, kWarpSize>{});
    default: return f(std::integral_constant<int, kBlockThreads>{});
  }
}

// Calls visit(i) for i = lane, lane + Group, ... below count, and visitor.end_run() after each run of
// kRunLoads of them (and after the last, shorter run): the moments sweep folds its plain sums there, outside
// the loop over the loads.
template <int Group, typename Visitor, typename Visit>
__device__ void visit_in_runs(Visitor& visitor, int64_t count, int lane, const Visit& visit) {
  constexpr int64_t kRunSpan = Group * kRunLoads;
  for (int64_t run = 0; run < count; run += kRunSpan) {
    const int64_t run_end = run + kRunSpan < count ? run + kRunSpan : count;
    for (int64_t i = run + lane; i < run_end; i += Group) visit(i);
    visitor.end_run();
  }
}

// Visits steps [begin, end) of one item: lane `lane` of the group takes every Group-th step (scalar sweep) or
// pack (vectorised sweep, after the head up to the first 16-byte boundary). Calls visitor.at<N>(t), and
// visitor.end_run() between runs of steps or packs (visit_in_runs). The head and tail peels are shorter than a
// pack, so they are not unrolled (an unrolled peel held the most registers of the kernel).
template <int Group, int Pack, typename Visitor>
__device__ void sweep_chunk(Visitor& visitor, int64_t begin, int64_t end, bool vectorized, int lane) {
  if (Pack == 1 || !vectorized) {  // packs of one step (SequenceWeightTask: a mask byte) are the scalar sweep
    visit_in_runs<Group>(visitor, end - begin, lane, [&](int64_t i) { visitor.template at<1>(begin + i); });
    return;
  }
  visitor.assume_unit_stride();
  const int64_t head = (Pack - (visitor.misalignment() + begin) % Pack) % Pack;
  const int64_t aligned_begin = begin + head < end ? begin + head : end;
  const int64_t packs = (end - aligned_begin) / Pack;
  const int64_t tail_begin = aligned_begin + packs * Pack;
#pragma unroll 1
  for (int64_t t = begin + lane; t < aligned_begin; t += Group) visitor.template at<1>(t);
  visit_in_runs<Group>(visitor, packs, lane,
                       [&](int64_t i) { visitor.template at<Pack>(aligned_begin + i * Pack); });
#pragma unroll 1
  for (int64_t t = tail_begin + lane; t < end; t += Group) visitor.template at<1>(t);
}

// ----------------------------------------------------------------------------- generic kernels

// A thread's own Width values in a block's shared memory: values that change rarely (once per run or per
// sequence) wait there so that their registers serve the sweep; volatile, so that the compiler reloads them at
// each use instead of carrying them in registers after all. The block's slots are laid out [Width][threads],
// value k of consecutive threads in consecutive words, so a warp's access to value k touches 32 different
// banks; a [threads][Width] layout put lanes Width values apart, and lanes t and t + 32 / gcd(Width, 32) on one
// bank (docs/design.md, "Registers (issue 15)").
template <typename T, int Width>
struct ThreadSlots {
  using Block = T[Width][kBlockThreads];  // declared __shared__ by the user, one per purpose
  volatile T* first;                      // this thread's value 0; value k lies k * kBlockThreads further on

  __device__ static ThreadSlots of(Block& block) { return {&block[0][threadIdx.x]}; }
  __device__ volatile T& operator[](int k) const { return first[k * kBlockThreads]; }
};

// Resident blocks per SM that a task's sweep kernel is compiled for (Task::kMinBlocksPerSM, __launch_bounds__):
// `wanted` on the float32 / half paths, whose rows stream fastest (4: at most 64 registers at 256 threads);
// float64 keeps the compiler's choice.
template <typename acc_t>
constexpr int min_blocks_per_sm(int wanted) {
  return std::is_same_v<acc_t, double> ? 1 : wanted;
}

// Reduces every item into a Task::State: the group sweeps its item (each lane's visitor gives its part as a
// State through result()), merges across its lanes, and the first
// lane either finishes the sequence (one chunk per sequence; the task may add to the block's (weighted loss,
// weight) sums) or stores the chunk's partial state for combine_chunks_kernel. A task with kSecondSweep may
// then sweep each finished sequence again with the whole group (task.sweeps_again, set by the host for
// one-chunk plans only), from a visitor built on the sequence's state.
template <int Group, typename Task>
__global__ void __launch_bounds__(kBlockThreads, Task::kMinBlocksPerSM)
    reduce_items_kernel(Task task, ChunkPlan plan, bool vectorized, typename Task::State::value_type* chunk_states,
                        typename Task::State::value_type* block_sums) {
  using State = typename Task::State;
  using acc_t = typename State::value_type;
  constexpr int kItemsPerIteration = kBlockThreads / Group;
  const int lane = threadIdx.x % Group;
  // The thread's (weighted loss, weight) sums change once per finished sequence: they wait in shared memory,
  // which leaves their registers to the sweeps.
  __shared__ typename ThreadSlots<acc_t, 2>::Block thread_sums;
  const auto finished_sums = ThreadSlots<acc_t, 2>::of(thread_sums);
  finished_sums[0] = acc_t(0);
  finished_sums[1] = acc_t(0);
  // Every thread runs the same number of iterations, so the group merges never diverge.
  for (int64_t first = int64_t(blockIdx.x) * kItemsPerIteration; first < plan.items();
       first += int64_t(gridDim.x) * kItemsPerIteration) {
    const int64_t item = first + threadIdx.x / Group;
    const bool in_range = item < plan.items();
    State state{};
    if (in_range) {
      auto visitor = task.visitor(plan.sequence(item));
      sweep_chunk<Group, Task::kPack>(visitor, plan.chunk_begin(item), plan.chunk_end(item), vectorized, lane);
      state = visitor.result();
    }
    merge_group<Group>(state);
    if (lane == 0 && in_range) {
      if (plan.chunks == 1) {
        acc_t sums[2] = {finished_sums[0], finished_sums[1]};
        task.finish(plan.sequence(item), state, sums);
        finished_sums[0] = sums[0];
        finished_sums[1] = sums[1];
      } else {
        state.store(chunk_states + item * State::kWidth);
      }
    }
    if constexpr (Task::kSecondSweep) {
      if (task.sweeps_again) {  // a kernel argument: uniform, so every thread broadcasts
        broadcast_group<Group>(state);
        if (in_range) {
          auto visitor = task.second_visitor(plan.sequence(item), state);
          sweep_chunk<Group, Task::kPack>(visitor, plan.chunk_begin(item), plan.chunk_end(item),
                                          task.second_sweep_vectorized, lane);
        }
      }
    }
  }
  if (block_sums != nullptr) {
    acc_t sums[2] = {finished_sums[0], finished_sums[1]};
    block_sum<acc_t, 2>(sums);
    if (threadIdx.x == 0) {
      block_sums[blockIdx.x * 2] = sums[0];
      block_sums[blockIdx.x * 2 + 1] = sums[1];
    }
  }
}

// Merges each sequence's chunk states in chunk order (one thread per sequence) and finishes it.
template <typename Task>
__global__ void __launch_bounds__(kBlockThreads)
    combine_chunks_kernel(Task task, ChunkPlan plan, const typename Task::State::value_type* chunk_states,
                          typename Task::State::value_type* block_sums) {
  using State = typename Task::State;
  using acc_t = typename State::value_type;
  acc_t sums[2] = {0, 0};
  for (int64_t seq = int64_t(blockIdx.x) * kBlockThreads + threadIdx.x; seq < plan.sequences;
       seq += int64_t(gridDim.x) * kBlockThreads) {
    State state{};
    for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
      state.merge(State::load(chunk_states + (chunk * plan.sequences + seq) * State::kWidth));
    }
    task.finish(seq, state, sums);
  }
  if (block_sums != nullptr) {
    block_sum<acc_t, 2>(sums);
    if (threadIdx.x == 0) {
      block_sums[blockIdx.x * 2] = sums[0];
      block_sums[blockIdx.x * 2 + 1] = sums[1];
    }
  }
}

// Element-wise pass: every group sweeps its item, the visitor writes the outputs; nothing when the task says
// its outputs already hold the result.
template <int Group, typename Task>
__global__ void __launch_bounds__(kBlockThreads, Task::kMinBlocksPerSM)
    map_items_kernel(Task task, ChunkPlan plan, bool vectorized) {
  if (task.done_already()) return;
  constexpr int kItemsPerIteration = kBlockThreads / Group;
  const int lane = threadIdx.x % Group;
  for (int64_t item = int64_t(blockIdx.x) * kItemsPerIteration + threadIdx.x / Group; item < plan.items();
       item += int64_t(gridDim.x) * kItemsPerIteration) {
    auto visitor = task.visitor(plan.sequence(item));
    sweep_chunk<Group, Task::kPack>(visitor, plan.chunk_begin(item), plan.chunk_end(item), vectorized, lane);
  }
}

// Runs a reduction task over all items: one kernel when each sequence is one chunk, else a kernel for the
// chunk states and one that merges them. Returns the per-block (weighted loss, weight) sums of the finished
// sequences when `with_sums` (an undefined tensor otherwise).
template <typename Task>
at::Tensor run_reduction(const Task& task, const ChunkPlan& plan, bool vectorized, bool with_sums,
                         const at::TensorOptions& acc_options, cudaStream_t stream) {
  using State = typename Task::State;
  using acc_t = typename State::value_type;
  at::Tensor sums;
  dispatch_lanes(plan.lanes, [&](auto lanes) {
    constexpr int Group = decltype(lanes)::value;
    const int64_t blocks = grid_size(plan.items(), kBlockThreads / Group);
    if (plan.chunks == 1) {
      if (with_sums) sums = at::empty({blocks, 2}, acc_options);
      launch_kernel(reduce_items_kernel<Group, Task>, blocks, stream,
          task, plan, vectorized, nullptr, with_sums ? sums.data_ptr<acc_t>() : nullptr);
      return;
    }
    at::Tensor chunk_states = at::empty({plan.items(), State::kWidth}, acc_options);
    launch_kernel(reduce_items_kernel<Group, Task>, blocks, stream, task, plan, vectorized,
                                                                           chunk_states.data_ptr<acc_t>(), nullptr);
    const int64_t combine_blocks = grid_size(plan.sequences, kBlockThreads);
    if (with_sums) sums = at::empty({combine_blocks, 2}, acc_options);
    launch_kernel(combine_chunks_kernel<Task>, combine_blocks, stream,
        task, plan, chunk_states.const_data_ptr<acc_t>(), with_sums ? sums.data_ptr<acc_t>() : nullptr);
  });
  return sums;
}

template <typename Task>
void run_map(const Task& task, const ChunkPlan& plan, bool vectorized, cudaStream_t stream) {
  dispatch_lanes(plan.lanes, [&](auto lanes) {
    constexpr int Group = decltype(lanes)::value;
    const auto kernel = map_items_kernel<Group, Task>;
    launch_kernel(kernel, map_grid_size(kernel, plan.items(), kBlockThreads / Group), stream, task, plan, vectorized);
  });
}

// ----------------------------------------------------------------------------- correlation tasks

// Where a gradient visitor keeps its sequence's GradientCoefficients between steps (the centres stay in
// CentredSteps): in registers, or with kParked in the thread's ThreadSlots, read back at every step or pack. The
// sweep with a per-step upstream parks them: its upstream row leaves them no room under 64 registers
// (docs/design.md, "Registers (issue 15)").
template <typename acc_t, bool kParked>
struct SequenceCoefficients {
  GradientCoefficients<acc_t> held;
  __device__ explicit SequenceCoefficients(const GradientCoefficients<acc_t>& coef) : held(coef) {}
  __device__ const GradientCoefficients<acc_t>& read() const { return held; }
};

template <typename acc_t>
struct SequenceCoefficients<acc_t, true> {
  static constexpr int kWidth = 6;  // ax, ay, b, c, ex, ey
  ThreadSlots<acc_t, kWidth> parked;
  __device__ explicit SequenceCoefficients(const GradientCoefficients<acc_t>& coef) {
    __shared__ typename ThreadSlots<acc_t, kWidth>::Block slots;
    parked = ThreadSlots<acc_t, kWidth>::of(slots);
    const acc_t values[kWidth] = {coef.ax, coef.ay, coef.b, coef.c, coef.ex, coef.ey};
#pragma unroll
    for (int k = 0; k < kWidth; ++k) parked[k] = values[k];
  }
  // The centres are left unset: the visitor's CentredSteps holds them.
  __device__ GradientCoefficients<acc_t> read() const {
    return {{}, {}, parked[0], parked[1], parked[2], parked[3], parked[4], parked[5]};
  }
};

// Gradient: d loss / d x and / or d loss / d y of every step, for the backward's grad_loss or, in the forward
// that writes the gradient, for grad_loss = 1. kPerStepUpstream (reduction='none' with per_timestep, backward
// only) compiles the per-step upstream row in, and parks the coefficients in shared memory to make room for it
// (six rows in the strided sweep): both variants fit the 64 registers of 4 blocks per SM.
template <typename scalar_t, bool kPerStepUpstream>
struct GradientTask {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kPack = kVecSize<scalar_t>;
  static constexpr int kMinBlocksPerSM = min_blocks_per_sm<acc_t>(4);
  Inputs<scalar_t> in;
  CorrelationConfig<acc_t> cfg;
  const acc_t* stats;
  const scalar_t* grad_loss;  // (B, D) contiguous, or a scalar; nullptr: 1 (the forward); unused per step
  bool per_sequence_upstream, mean;
  bool keeps_unit_gradient;          // in-place backward: the forward's gradient stands when grad_loss is 1
  const acc_t* total_weight;         // read for 'mean' only
  Operand<const scalar_t> upstream;  // per-step grad_output (kPerStepUpstream)
  const acc_t* upstream_sums;        // (B D, 3) of that upstream (kPerStepUpstream)
  Operand<scalar_t> grad_x, grad_y;  // data nullptr when not requested

  struct Visitor : CentredSteps<scalar_t> {
    Row<const scalar_t> g;  // the per-step upstream (kPerStepUpstream)
    Row<scalar_t> gx, gy;   // ptr nullptr when not requested
    SequenceCoefficients<acc_t, kPerStepUpstream> coefficients;
    template <int N>
    __device__ void at(int64_t t) {
      const GradientCoefficients<acc_t>& coef = coefficients.read();  // parked: a copy for this step or pack
      acc_t dx[N], dy[N], cross[N];
      bool valid[N];
      this->template load_deviations<N>(t, dx, dy, valid);
      if constexpr (kPerStepUpstream) {
        g.template load<N>(t, cross);
        // Both gradients of a step together, so that its deviations and upstream die at once (a loop over the
        // pack per gradient keeps them all live until the second: the half-precision sweeps spilled at 64
        // registers). The gradient not requested costs instructions, not bandwidth.
        acc_t out_x[N], out_y[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          cross[i] = coef.cross(cross[i]);
          out_x[i] = valid[i] ? coef.input_gradient(dx[i], dy[i], cross[i]) : acc_t(0);
          out_y[i] = valid[i] ? coef.target_gradient(dx[i], dy[i], cross[i]) : acc_t(0);
        }
        if (gx.ptr != nullptr) gx.template store<N>(t, out_x);
        if (gy.ptr != nullptr) gy.template store<N>(t, out_y);
      } else {  // one gradient at a time: computing both spills in the forward's second sweep (MomentsTask)
        acc_t out[N];
#pragma unroll
        for (int i = 0; i < N; ++i) cross[i] = coef.b;
        if (gx.ptr != nullptr) {
#pragma unroll
          for (int i = 0; i < N; ++i) out[i] = valid[i] ? coef.input_gradient(dx[i], dy[i], cross[i]) : acc_t(0);
          gx.template store<N>(t, out);
        }
        if (gy.ptr != nullptr) {
#pragma unroll
          for (int i = 0; i < N; ++i) out[i] = valid[i] ? coef.target_gradient(dx[i], dy[i], cross[i]) : acc_t(0);
          gy.template store<N>(t, out);
        }
      }
    }
    __device__ void assume_unit_stride() {
      CentredSteps<scalar_t>::assume_unit_stride();
      g.assume_unit_stride();
      gx.assume_unit_stride();
      gy.assume_unit_stride();
    }
  };

  // Read on the device, so the in-place backward needs no host synchronisation.
  __device__ bool done_already() const { return keeps_unit_gradient && static_cast<acc_t>(*grad_loss) == acc_t(1); }

  __device__ Visitor visitor(int64_t seq) const { return visitor_for(seq, saved_moments(stats, seq)); }

  // The visitor of sequence `seq` whose moments are `m` (saved, or just computed by the forward).
  __device__ Visitor visitor_for(int64_t seq, const Moments<acc_t>& m) const {
    GradientCoefficients<acc_t> coef;
    if constexpr (kPerStepUpstream) {
      const UpstreamSums<acc_t> sums = UpstreamSums<acc_t>::load(upstream_sums + seq * UpstreamSums<acc_t>::kWidth);
      coef = make_gradient_coefficients(cfg, m, acc_t(0), &sums);
    } else {
      const acc_t value =
          grad_loss != nullptr ? static_cast<acc_t>(grad_loss[per_sequence_upstream ? seq : 0]) : acc_t(1);
      coef = sequence_gradient_coefficients(cfg, m, per_sequence_upstream, mean, value,
                                            mean ? *total_weight : acc_t(1));
    }
    return {CentredSteps<scalar_t>(in, seq, m), upstream.row(seq), grad_x.row(seq), grad_y.row(seq),
            SequenceCoefficients<acc_t, kPerStepUpstream>(coef)};
  }
};

// A run of steps of the moments sweep as plain sums of deviations from a shift, the run's first valid step, so
// each step costs additions and products only (no division per pack). moments() converts them once per run
// for the Chan merges. Shifting by a data value keeps data far from zero (1e4 in float32) as accurate as its
// spread: the cancellation in sum d^2 - (sum d)^2 / n grows only with the distance of that step from the mean.
template <typename acc_t>
struct ShiftedSums {
  acc_t count = 0, shift_x = 0, shift_y = 0, sum_dx = 0, sum_dy = 0, sum_dxx = 0, sum_dyy = 0, sum_dxy = 0;

  template <int N>
  __device__ void add(const acc_t (&x)[N], const acc_t (&y)[N], const bool (&valid)[N]) {
    if (count == acc_t(0)) {  // no valid step yet: the first valid one of these becomes the shift
#pragma unroll
      for (int i = N - 1; i >= 0; --i) {
        shift_x = valid[i] ? x[i] : shift_x;
        shift_y = valid[i] ? y[i] : shift_y;
      }
    }
    // The pack's own sums first: the running sums then take one addition per pack, not per step.
    acc_t pack[6];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t dx = valid[i] ? x[i] - shift_x : acc_t(0), dy = valid[i] ? y[i] - shift_y : acc_t(0);
      const acc_t terms[6] = {valid[i] ? acc_t(1) : acc_t(0), dx, dy, dx * dx, dy * dy, dx * dy};
#pragma unroll
      for (int k = 0; k < 6; ++k) pack[k] = i == 0 ? terms[k] : pack[k] + terms[k];
    }
    count += pack[0];
    sum_dx += pack[1];
    sum_dy += pack[2];
    sum_dxx += pack[3];
    sum_dyy += pack[4];
    sum_dxy += pack[5];
  }

  __device__ Moments<acc_t> moments() const {
    if (count == acc_t(0)) return {};
    return Moments<acc_t>::from_shifted_sums(count, shift_x, shift_y, sum_dx, sum_dy, sum_dxx, sum_dyy, sum_dxy);
  }
};

// Forward statistics: Moments of every sequence; finishing stores them and the per-sequence loss. With
// sweeps_again, the group then writes the sequence's gradient for grad_loss = 1 from those moments.
template <typename scalar_t>
struct MomentsTask {
  using acc_t = acc_type<scalar_t>;
  using State = Moments<acc_t>;
  static constexpr int kPack = kVecSize<scalar_t>;
  static constexpr int kMinBlocksPerSM = min_blocks_per_sm<acc_t>(4);
  static constexpr bool kSecondSweep = true;
  Inputs<scalar_t> in;
  CorrelationConfig<acc_t> cfg;
  acc_t* stats;
  scalar_t* sequence_losses;  // (B, D) for reduction='none' without per_timestep, else nullptr
  GradientTask<scalar_t, /*kPerStepUpstream=*/false> gradient;
  bool sweeps_again, second_sweep_vectorized;

  // Each run of a lane's loads (visit_in_runs) is summed around its own first valid step (ShiftedSums) and
  // folded into the lane's moments by a Chan merge: plain sums of longer runs would lose float32 digits (a
  // G = 1 lane may sweep thousands of strided steps). The folded moments wait in the thread's ThreadSlots
  // between runs, so that their 8 registers serve the loads of the run.
  struct Visitor {
    StepReader<scalar_t> steps;
    ThreadSlots<acc_t, State::kWidth> folded;
    ShiftedSums<acc_t> run;
    template <int N>
    __device__ void at(int64_t t) {
      acc_t x[N], y[N];
      bool valid[N];
      steps.template load<N>(t, x, y, valid);
      run.add(x, y, valid);
    }
    __device__ void end_run() {
      store_folded(result());
      run = {};
    }
    __device__ int misalignment() const { return steps.misalignment(); }
    __device__ void assume_unit_stride() { steps.assume_unit_stride(); }
    __device__ State result() const {
      acc_t values[State::kWidth];
#pragma unroll
      for (int k = 0; k < State::kWidth; ++k) values[k] = folded[k];
      State lane = State::load(values);
      lane.merge(run.moments());
      return lane;
    }
    __device__ void store_folded(const State& m) {
      acc_t values[State::kWidth];
      m.store(values);
#pragma unroll
      for (int k = 0; k < State::kWidth; ++k) folded[k] = values[k];
    }
  };

  __device__ Visitor visitor(int64_t seq) const {
    __shared__ typename ThreadSlots<acc_t, State::kWidth>::Block folded_moments;
    Visitor visitor{StepReader<scalar_t>(in, seq), ThreadSlots<acc_t, State::kWidth>::of(folded_moments), {}};
    visitor.store_folded(State{});
    return visitor;
  }

  __device__ void finish(int64_t seq, const State& m, acc_t (&sums)[2]) const {
    const acc_t loss = finish_sequence(cfg, m, stats + seq * State::kWidth, sums);
    if (sequence_losses != nullptr) sequence_losses[seq] = static_cast<scalar_t>(loss);
  }

  __device__ auto second_visitor(int64_t seq, const State& m) const {
    return gradient.visitor_for(seq, m);
  }
};

// Count of the valid steps of (part of) a sequence; counts of disjoint parts add.
template <typename acc_t>
struct StepCount {
  using value_type = acc_t;
  static constexpr int kWidth = 1;
  acc_t n = 0;
  __device__ void merge(const StepCount& other) { n += other.n; }
  __device__ void store(acc_t* out) const { out[0] = n; }
  __device__ static StepCount load(const acc_t* in) { return {in[0]}; }
};

// The pre-pass of a forward that writes the gradient of 'mean': the total weight (the divisor) before any
// moments are known. A sequence's weight (sequence_weight) needs only its count of valid steps, which the mask
// alone decides. Run with the moments' plan through the same kernels, its block sums, and so its total, have
// the bits of the moments pass's.
template <typename scalar_t>
struct SequenceWeightTask {
  using acc_t = acc_type<scalar_t>;
  using State = StepCount<acc_t>;
  static constexpr int kPack = 1;  // the mask is read step by step
  static constexpr int kMinBlocksPerSM = min_blocks_per_sm<acc_t>(4);
  static constexpr bool kSecondSweep = false;
  Operand<const bool> mask;  // never absent: without a mask the host knows the total weight
  CorrelationConfig<acc_t> cfg;

  struct Visitor {
    Row<const bool> valid;
    State state;
    template <int N>
    __device__ void at(int64_t t) {
#pragma unroll
      for (int i = 0; i < N; ++i) state.n += element_as<acc_t>(valid.ptr[(t + i) * valid.stride]);
    }
    __device__ int misalignment() const { return 0; }
    __device__ void assume_unit_stride() {}  // never vectorised: the mask is read step by step
    __device__ void end_run() {}
    __device__ State result() const { return state; }
  };

  __device__ Visitor visitor(int64_t seq) const { return {mask.row(seq), State{}}; }

  __device__ void finish(int64_t, const State& count, acc_t (&sums)[2]) const {
    Moments<acc_t> counted;  // only its count n enters sequence_weight
    counted.n = count.n;
    sums[1] += sequence_weight(cfg, counted);
  }
};

// Per-timestep backward: (P, Gx, Gy) of every sequence from the per-step upstream gradient.
template <typename scalar_t>
struct UpstreamSumsTask {
  using acc_t = acc_type<scalar_t>;
  using State = UpstreamSums<acc_t>;
  static constexpr int kPack = kVecSize<scalar_t>;
  static constexpr int kMinBlocksPerSM = min_blocks_per_sm<acc_t>(4);
  static constexpr bool kSecondSweep = false;
  Inputs<scalar_t> in;
  Operand<const scalar_t> upstream;
  const acc_t* stats;
  acc_t* sums_out;  // (B D, 3)

  struct Visitor : CentredSteps<scalar_t> {
    Row<const scalar_t> g;
    State state;
    template <int N>
    __device__ void at(int64_t t) {
      acc_t dx[N], dy[N], gs[N];
      bool valid[N];
      this->template load_deviations<N>(t, dx, dy, valid);
      g.template load<N>(t, gs);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const acc_t g_valid = valid[i] ? gs[i] : acc_t(0);  // padding may hold anything, NaN included
        state.p += g_valid * dx[i] * dy[i];
        state.gx += g_valid * dx[i];
        state.gy += g_valid * dy[i];
      }
    }
    __device__ void assume_unit_stride() {
      CentredSteps<scalar_t>::assume_unit_stride();
      g.assume_unit_stride();
    }
    __device__ State result() const { return state; }
  };

  __device__ Visitor visitor(int64_t seq) const {
    return {CentredSteps<scalar_t>(in, seq, saved_moments(stats, seq)), upstream.row(seq), State{}};
  }

  __device__ void finish(int64_t seq, const State& s, acc_t (&)[2]) const { s.store(sums_out + seq * State::kWidth); }
};

// Per-timestep forward output: c_t = 1 - k x~_t y~_t on valid steps, 0 on padding.
template <typename scalar_t>
struct PerStepLossTask {
  using acc_t = acc_type<scalar_t>;
  static constexpr int kPack = kVecSize<scalar_t>;
  static constexpr int kMinBlocksPerSM = min_blocks_per_sm<acc_t>(4);
  Inputs<scalar_t> in;
  CorrelationConfig<acc_t> cfg;
  const acc_t* stats;
  Operand<scalar_t> out;

  struct Visitor : CentredSteps<scalar_t> {
    Row<scalar_t> out;
    acc_t k;
    template <int N>
    __device__ void at(int64_t t) {
      acc_t dx[N], dy[N], c[N];
      bool valid[N];
      this->template load_deviations<N>(t, dx, dy, valid);
#pragma unroll
      for (int i = 0; i < N; ++i) c[i] = valid[i] ? per_timestep_loss(k, dx[i], dy[i]) : acc_t(0);
      out.template store<N>(t, c);
    }
    __device__ void assume_unit_stride() {
      CentredSteps<scalar_t>::assume_unit_stride();
      out.assume_unit_stride();
    }
  };

  __device__ Visitor visitor(int64_t seq) const {
    const Moments<acc_t> m = saved_moments(stats, seq);
    return {CentredSteps<scalar_t>(in, seq, m), out.row(seq), correlation_scale(cfg, m) * m.n};
  }

  __device__ bool done_already() const { return false; }
};

// ----------------------------------------------------------------------------- operators

// A GradientTask writing into the non-empty ones of grad_input and grad_target; grad_loss nullptr stands for
// grad_loss = 1 (the forward).
template <typename scalar_t, bool kPerStepUpstream>
GradientTask<scalar_t, kPerStepUpstream> make_gradient_task(const CorrelationProblem& p, const Inputs<scalar_t>& in,
                                                            const acc_type<scalar_t>* stats,
                                                            const scalar_t* grad_loss,
                                                            const acc_type<scalar_t>* total_weight,
                                                            at::Tensor& grad_input, at::Tensor& grad_target) {
  GradientTask<scalar_t, kPerStepUpstream> task{};
  task.in = in;
  task.cfg = p.config<acc_type<scalar_t>>();
  task.stats = stats;
  task.grad_loss = grad_loss;
  task.per_sequence_upstream = p.reduction == Reduction::None && !p.per_timestep;
  task.mean = p.reduction == Reduction::Mean;
  task.total_weight = total_weight;
  if (grad_input.numel() > 0) task.grad_x = make_operand(grad_input.data_ptr<scalar_t>(), grad_input, p.channels);
  if (grad_target.numel() > 0) task.grad_y = make_operand(grad_target.data_ptr<scalar_t>(), grad_target, p.channels);
  return task;
}

// Whether a GradientTask's sweep may use packs: every operand it reads or writes lines up.
template <typename scalar_t, bool kPerStepUpstream>
bool gradient_packs_line_up(const GradientTask<scalar_t, kPerStepUpstream>& task) {
  std::vector<OperandView> others;
  for (const OperandView& operand : {view_of(task.upstream), view_of(task.grad_x), view_of(task.grad_y)}) {
    if (operand.data != nullptr) others.push_back(operand);
  }
  return packs_line_up<scalar_t>(task.in, others);
}

template <typename scalar_t, bool kPerStepUpstream>
void run_gradient(const CorrelationProblem& p, const GradientTask<scalar_t, kPerStepUpstream>& task,
                  cudaStream_t stream) {
  const bool vectorized = gradient_packs_line_up(task);
  run_map(task, plan_sweep<scalar_t>(p, vectorized), vectorized, stream);
}

// The total weight of the reduction when there is no mask: every sequence then has all its T steps valid and
// weighs 1, or T with per_timestep (sequence_weight), so the host knows the total without a pass over the
// steps. nullopt with a mask.
template <typename acc_t>
std::optional<acc_t> host_total_weight(const CorrelationProblem& p) {
  if (p.mask.has_value()) return std::nullopt;
  return static_cast<acc_t>(static_cast<double>(p.sequences()) * (p.per_timestep ? static_cast<double>(p.time) : 1.0));
}

// The forward's epilogue: ReducedLossEpilogue with the host's total weight (known_total_weight >= 0) in place
// of the sum of the sequences' weights. Both schedules then divide 'mean' by the same bits.
template <typename scalar_t>
struct CorrelationLossEpilogue {
  using acc_t = acc_type<scalar_t>;
  ReducedLossEpilogue<scalar_t> reduced;
  acc_t known_total_weight;  // < 0: the sum of the weights
  __device__ void operator()(const acc_t (&totals)[2]) const {
    const acc_t chosen[2] = {totals[0], known_total_weight < acc_t(0) ? totals[1] : known_total_weight};
    reduced(chosen);
  }
};

// The divisor of 'mean' for a forward that writes the gradient in its moments kernel, before any moments are
// known, in `total_weight`, bitwise the total weight that forward saves: the host's without a mask, else the
// sum that the pre-pass SequenceWeightTask finds.
template <typename scalar_t>
void total_weight_before_moments(const Inputs<scalar_t>& in, const CorrelationConfig<acc_type<scalar_t>>& cfg,
                                 const ChunkPlan& moments_plan, std::optional<acc_type<scalar_t>> known_total_weight,
                                 at::Tensor& total_weight, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (known_total_weight.has_value()) {
    total_weight.fill_(*known_total_weight);
    return;
  }
  const at::Tensor sums = run_reduction(SequenceWeightTask<scalar_t>{in.mask, cfg}, moments_plan,
                                        /*vectorized=*/false, /*with_sums=*/true, total_weight.options(), stream);
  launch_reduce_partials<acc_t, 2>(sums.const_data_ptr<acc_t>(), sums.size(0),
                                   ReducedLossEpilogue<scalar_t>{nullptr, total_weight.data_ptr<acc_t>(), false},
                                   stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& mask, c10::string_view kind,
    c10::string_view reduction, bool per_timestep, double eps, bool write_input_gradient,
    bool write_target_gradient) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CorrelationProblem p = make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps);
  at::Tensor loss = allocate_correlation_loss(p);
  at::Tensor moments = allocate_moments(p);
  at::Tensor total_weight = at::empty({}, moments.options());
  at::Tensor grad_input = allocate_forward_gradient(p.input, "write_input_gradient", write_input_gradient, p.reduction);
  at::Tensor grad_target =
      allocate_forward_gradient(p.target, "write_target_gradient", write_target_gradient, p.reduction);
  if (p.sequences() == 0) {
    fill_empty_reduction(loss, total_weight, p.reduction);
    return {loss, moments, total_weight, grad_input, grad_target};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss", [&] {
    using acc_t = acc_type<scalar_t>;
    const Inputs<scalar_t> in = make_inputs<scalar_t>(p);
    const auto cfg = p.config<acc_t>();
    const bool vectorized = packs_line_up<scalar_t>(in);
    const ChunkPlan plan = plan_sweep<scalar_t>(p, vectorized);
    MomentsTask<scalar_t> task{};
    task.in = in;
    task.cfg = cfg;
    task.stats = moments.data_ptr<acc_t>();
    task.sequence_losses = p.reduction == Reduction::None && !p.per_timestep ? loss.data_ptr<scalar_t>() : nullptr;
    task.gradient = make_gradient_task<scalar_t, false>(p, in, moments.const_data_ptr<acc_t>(), /*grad_loss=*/nullptr,
                                                        total_weight.const_data_ptr<acc_t>(), grad_input, grad_target);
    const bool writes_gradient = task.gradient.grad_x.data != nullptr || task.gradient.grad_y.data != nullptr;
    // One chunk per sequence: the moments kernel writes the gradient too, while the rows are in cache.
    task.sweeps_again = writes_gradient && plan.chunks == 1;
    task.second_sweep_vectorized = gradient_packs_line_up(task.gradient);
    const std::optional<acc_t> known_total_weight = host_total_weight<acc_t>(p);
    at::Tensor total_weight_first;  // the divisor of 'mean' for that gradient, known before the moments
    if (task.sweeps_again && p.reduction == Reduction::Mean) {
      total_weight_first = at::empty({}, moments.options());
      total_weight_before_moments(in, cfg, plan, known_total_weight, total_weight_first, stream);
      task.gradient.total_weight = total_weight_first.const_data_ptr<acc_t>();
    }
    const at::Tensor sums = run_reduction(task, plan, vectorized, /*with_sums=*/true, moments.options(), stream);
    const CorrelationLossEpilogue<scalar_t> epilogue{
        {p.reduction == Reduction::None ? nullptr : loss.data_ptr<scalar_t>(), total_weight.data_ptr<acc_t>(),
         p.reduction == Reduction::Mean},
        known_total_weight.value_or(acc_t(-1))};
    launch_reduce_partials<acc_t, 2>(sums.const_data_ptr<acc_t>(), sums.size(0), epilogue, stream);

    if (writes_gradient && !task.sweeps_again) {
      // Sequences cut into chunks: the gradient needs their merged moments and the total weight, now stored.
      run_gradient(p, task.gradient, stream);
    }
    if (p.per_step_output()) {
      const PerStepLossTask<scalar_t> step_task{in, cfg, moments.const_data_ptr<acc_t>(),
                                                make_operand(loss.data_ptr<scalar_t>(), loss, p.channels)};
      const bool step_vectorized =
          packs_line_up<scalar_t>(in, {view_of(step_task.out)});
      const ChunkPlan step_plan = plan_sweep<scalar_t>(p, step_vectorized);
      run_map(step_task, step_plan, step_vectorized, stream);
    }
  });
  return {loss, moments, total_weight, grad_input, grad_target};
}

// Writes the gradients for grad_loss into the non-empty ones of grad_input and grad_target; with
// keeps_unit_gradient (the in-place backward), nothing when grad_loss is 1.
void backward_into(const CorrelationProblem& p, const at::Tensor& grad_loss, const at::Tensor& stats,
                   const at::Tensor& total_weight, at::Tensor& grad_input, at::Tensor& grad_target,
                   bool keeps_unit_gradient) {
  if ((grad_input.numel() == 0 && grad_target.numel() == 0) || p.sequences() == 0 || p.time == 0) return;
  const at::Tensor grad = upstream_gradient(p, grad_loss);
  const at::Tensor moments = stats.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const Inputs<scalar_t> in = make_inputs<scalar_t>(p);
    const auto task_for = [&](auto per_step_upstream) {
      auto task = make_gradient_task<scalar_t, decltype(per_step_upstream)::value>(
          p, in, moments.const_data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(),
          total_weight.const_data_ptr<acc_t>(), grad_input, grad_target);
      task.keeps_unit_gradient = keeps_unit_gradient;
      return task;
    };
    if (!p.per_step_output()) {
      run_gradient(p, task_for(std::false_type{}), stream);
      return;
    }
    auto task = task_for(std::true_type{});
    task.upstream = make_operand(grad.const_data_ptr<scalar_t>(), grad, p.channels);
    const at::Tensor upstream_sums = at::empty({p.sequences(), UpstreamSums<acc_t>::kWidth}, moments.options());
    const UpstreamSumsTask<scalar_t> sums_task{in, task.upstream, task.stats, upstream_sums.data_ptr<acc_t>()};
    const bool sums_vectorized = packs_line_up<scalar_t>(in, {view_of(task.upstream)});
    const ChunkPlan sums_plan = plan_sweep<scalar_t>(p, sums_vectorized);
    run_reduction(sums_task, sums_plan, sums_vectorized, /*with_sums=*/false, moments.options(), stream);
    task.upstream_sums = upstream_sums.const_data_ptr<acc_t>();
    run_gradient(p, task, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                                 const at::Tensor& target, const std::optional<at::Tensor>& mask,
                                                 const at::Tensor& stats, const at::Tensor& total_weight,
                                                 c10::string_view kind, c10::string_view reduction,
                                                 bool per_timestep, double eps, bool input_requires_grad,
                                                 bool target_requires_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CorrelationProblem p = make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps);
  check_correlation_backward_arguments(p, grad_loss, stats, total_weight);
  at::Tensor grad_input = allocate_gradient(p.input, input_requires_grad);
  at::Tensor grad_target = allocate_gradient(p.target, target_requires_grad);
  backward_into(p, grad_loss, stats, total_weight, grad_input, grad_target, /*keeps_unit_gradient=*/false);
  return {grad_input, grad_target};
}

void backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& grad_input, at::Tensor& grad_target,
                           const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                           const at::Tensor& stats, const at::Tensor& total_weight, c10::string_view kind,
                           c10::string_view reduction, bool per_timestep, double eps, bool input_requires_grad,
                           bool target_requires_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  InplaceBackwardArguments args =
      check_inplace_backward_arguments(grad_loss, grad_input, grad_target, input, target, mask, stats, total_weight,
                                       kind, reduction, per_timestep, eps, input_requires_grad, target_requires_grad);
  backward_into(args.problem, grad_loss, stats, total_weight, args.grad_input, args.grad_target,
                /*keeps_unit_gradient=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("correlation_loss", &forward_cuda);
  m.impl("correlation_loss_backward", &backward_cuda);
  m.impl("correlation_loss_backward_inplace", &backward_inplace_cuda);
}

}  // namespace fused_losses::cuda
