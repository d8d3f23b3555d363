// Building blocks shared by the CUDA kernels: vector packs, deterministic warp/block sums, the final
// reduction of per-block partial sums, and launch helpers.
#pragma once

#include "common.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#ifndef FUSED_LOSSES_HOST_EMULATION
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_pipeline_primitives.h>
#endif

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace fused_losses::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;  // every lane of a warp takes part in a collective
// The host emulation's small-limit build (FUSED_LOSSES_SMALL_LIMITS, tests/cuda_emulation) shrinks the work-split
// limits so that test shapes of a few hundred elements take the grid-stride, multi-chunk and merge paths.
#ifdef FUSED_LOSSES_SMALL_LIMITS
constexpr int64_t kMaxBlocks = 3;
#else
constexpr int64_t kMaxBlocks = 16384;
#endif
#ifdef FUSED_LOSSES_HOST_EMULATION
// The dynamic shared memory a block may take in the emulation: an H100's 227 KB, or in the small-limit build
// 1 KB, so that rows longer than that take the paths for what does not fit.
#ifdef FUSED_LOSSES_SMALL_LIMITS
constexpr size_t kEmulatedSharedBytes = 1 << 10;
#else
constexpr size_t kEmulatedSharedBytes = 227 << 10;
#endif
#endif

// Number of `scalar_t` in one 16-byte load or store.
template <typename scalar_t>
constexpr int kVecSize = 16 / sizeof(scalar_t);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

// N values from `ptr`, aligned to their size: one load instruction (16 bytes by default).
template <typename T, int N = kVecSize<T>>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, kVecSize<T>>& pack) {
  *reinterpret_cast<Pack<T, kVecSize<T>>*>(ptr) = pack;
}

// The fast approximate primitives of FastFloatMath (bce_math.h): one MUFU instruction (ex2 / lg2 / rcp) each
// plus a multiply, with the error bounds of the CUDA C++ Programming Guide's intrinsic table and the PTX ISA
// (docs/design.md, "Fast float32 math"), and the explicit fused multiply-add; exp_flush_subnormal is the
// cross-entropy kernels' exp too (docs/design.md, "Cost-sensitive cross-entropy").
struct FastFloatPrimitives {
  // exp(x) as __expf forms it (2^(x log2(e)) by ex2.approx, the same error bound), but with results below 2^-126
  // flushed to 0 (.ftz): one FMUL and one MUFU.EX2, where __expf adds 3 instructions of subnormal handling.
  __device__ __forceinline__ static float exp_flush_subnormal(float x) {
#ifdef FUSED_LOSSES_HOST_EMULATION
    return host_emulation::exp_flush_subnormal(x);
#else
    float result;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(x * 1.44269504088896341f));
    return result;
#endif
  }
  // log(x) by lg2.approx.ftz: a subnormal operand is flushed to 0 (-inf), 2 instructions where __logf takes 5
  // (its subnormal fix-ups held registers in the ASL kernels, the only ones that take a log: p - clip, 1 - p).
  __device__ __forceinline__ static float log(float x) {
#ifdef FUSED_LOSSES_HOST_EMULATION
    return host_emulation::log_flush_subnormal(x);
#else
    float result;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(x));
    return result * 0.69314718055994531f;
#endif
  }
  __device__ __forceinline__ static float divide(float a, float b) { return __fdividef(a, b); }
  // 1 / x for a normal x (a subnormal one is flushed to 0: +inf) within 1 ulp (rcp.approx.ftz): one MUFU.RCP,
  // where __fdividef adds 3 instructions of range handling.
  __device__ __forceinline__ static float reciprocal(float x) {
#ifdef FUSED_LOSSES_HOST_EMULATION
    return 1.0f / x;
#else
    float result;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(x));
    return result;
#endif
  }
  __device__ __forceinline__ static float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
};

// Division by a fixed divisor in [1, 2^63) as a multiply-high, an add and a shift (Granlund and Montgomery),
// exact for dividends below 2^63: a few instructions instead of the 64-bit division subroutine.
struct FastDivider {
  uint64_t divisor = 1, magic = 1;
  int shift = 0;

  FastDivider() = default;
  explicit FastDivider(uint64_t d) : divisor(d) {
    TORCH_INTERNAL_ASSERT(d >= 1 && d < (uint64_t(1) << 63), "FastDivider needs a divisor in [1, 2^63), got ", d);
    while ((uint64_t(1) << shift) < d) ++shift;
    // 2^64 (2^shift - d) / d + 1 < 2^64, since 2^shift - d < d.
    using uint128 = unsigned __int128;
    magic = static_cast<uint64_t>((uint128(1) << 64) * ((uint128(1) << shift) - d) / d + 1);
  }
  // n / divisor for n < 2^63 (so high + n does not overflow: high <= n).
  __device__ __forceinline__ uint64_t divide(uint64_t n) const { return (__umul64hi(n, magic) + n) >> shift; }
};

inline bool is_aligned_to(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }
inline bool is_aligned_16(const void* ptr) { return is_aligned_to(ptr, 16); }

// Shuffle within aligned groups of `Group` lanes; every lane of the warp must call it.
template <int Group, typename T>
__device__ __forceinline__ T group_xor(T value, int offset) {
  return __shfl_xor_sync(kFullWarp, value, offset, Group);
}

// The value of the group's first lane, in every lane of the group; every lane of the warp must call it.
template <int Group, typename T>
__device__ __forceinline__ T group_broadcast(T value) {
  return __shfl_sync(kFullWarp, value, 0, Group);
}

#ifndef FUSED_LOSSES_HOST_EMULATION
// What the runtime says about `kernel` on the current device, asked once per (kernel, device, what) and kept: the
// queries are host calls of a few microseconds each, on every launch otherwise. `query(device)` computes it.
template <typename Query>
int64_t kernel_device_fact(const void* kernel, int what, const Query& query) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> facts;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, what);
  auto fact = facts.find(key);
  if (fact == facts.end()) fact = facts.emplace(key, query(device)).first;
  return fact->second;
}
#endif

// The most dynamic shared memory a block of `kernel` may take on the current device: the per-block opt-in limit
// less the kernel's static shared memory (kEmulatedSharedBytes in the host emulation). The kernel's own limit is
// raised to it the first time (once per device, always to this value, so launches of other sizes from other
// host threads cannot undo it, and a launch between 48 KB less the static shared memory and 48 KB needs it too).
template <typename... Params>
size_t max_dynamic_shared_bytes(void (*kernel)(Params...)) {
#ifdef FUSED_LOSSES_HOST_EMULATION
  static_cast<void>(kernel);
  return kEmulatedSharedBytes;
#else
  return static_cast<size_t>(kernel_device_fact(reinterpret_cast<const void*>(kernel), 0, [&](int device) {
    int per_block = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const int limit = per_block - std::min<int>(per_block, static_cast<int>(attributes.sharedSizeBytes));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    return int64_t(limit);
  }));
#endif
}

// Launches `kernel(args...)` on `blocks` blocks of kBlockThreads threads, each with `shared_bytes` of dynamic
// shared memory (dynamic_shared_memory; at most max_dynamic_shared_bytes). Every launch goes through here so
// that the host emulation (tests/cuda_emulation) runs the same kernels on the CPU, block by block.
template <typename... Params, typename... Args>
void launch_kernel_with_shared_memory(void (*kernel)(Params...), int64_t blocks, size_t shared_bytes,
                                      cudaStream_t stream, const Args&... args) {
  TORCH_INTERNAL_ASSERT(shared_bytes == 0 || shared_bytes <= max_dynamic_shared_bytes(kernel));
#ifdef FUSED_LOSSES_HOST_EMULATION
  host_emulation::run_grid(blocks, kBlockThreads, [&] { kernel(args...); }, shared_bytes);
#else
  kernel<<<blocks, kBlockThreads, shared_bytes, stream>>>(args...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t blocks, cudaStream_t stream, const Args&... args) {
  launch_kernel_with_shared_memory(kernel, blocks, 0, stream, args...);
}

// Starts copying 16 bytes (16-byte aligned) from global to shared memory without going through registers
// (cp.async on sm_80 and newer), in the thread's current group of copies (commit_async_copies closes it).
__device__ __forceinline__ void copy_16_bytes_async(void* shared, const void* global) {
#ifdef FUSED_LOSSES_HOST_EMULATION
  std::memcpy(shared, global, 16);
#else
  __pipeline_memcpy_async(shared, global, 16);
#endif
}

__device__ __forceinline__ void commit_async_copies() {
#ifndef FUSED_LOSSES_HOST_EMULATION
  __pipeline_commit();
#endif
}

// Waits until at most `pending` of the thread's committed groups of copies are incomplete (0 to 8): the copies
// of the older groups are then in shared memory, for this thread (other threads need a barrier after it).
__device__ __forceinline__ void wait_for_async_copies(int pending) {
#ifndef FUSED_LOSSES_HOST_EMULATION
  __pipeline_wait_prior(pending);
  // The wait's asm has no memory clobber: without this fence the compiler could move shared-memory reads above it.
  asm volatile("" ::: "memory");
#else
  static_cast<void>(pending);
#endif
}

// The dynamic shared memory of the running block (launch_kernel_with_shared_memory), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef FUSED_LOSSES_HOST_EMULATION
  return static_cast<T*>(host_emulation::dynamic_shared_memory());
#else
  extern __shared__ uint4 dynamic_shared_chunks[];  // uint4: 16-byte aligned
  return reinterpret_cast<T*>(dynamic_shared_chunks);
#endif
}

// Sum of `Width` values over the block, in a fixed order (bitwise reproducible); valid in thread 0.
// Every thread of the block must call it.
template <typename acc_t, int Width>
__device__ void block_sum(acc_t (&values)[Width]) {
  __shared__ acc_t warp_sums[kBlockThreads / kWarpSize][Width];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < Width; ++k)
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) values[k] += group_xor<kWarpSize>(values[k], offset);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < Width; ++k) warp_sums[warp][k] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < Width; ++k) {
      values[k] = lane < kBlockThreads / kWarpSize ? warp_sums[lane][k] : acc_t(0);
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) values[k] += group_xor<kWarpSize>(values[k], offset);
    }
  }
  __syncthreads();  // warp_sums is read before a later call may overwrite it
}

// Block sums of `values` stored as row blockIdx.x of the (gridDim.x, Width) partials that
// launch_reduce_partials adds up. Every thread of the block must call it.
template <typename acc_t, int Width>
__device__ void store_block_partials(acc_t (&values)[Width], acc_t* __restrict__ partials) {
  block_sum<acc_t, Width>(values);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < Width; ++k) partials[int64_t(blockIdx.x) * Width + k] = values[k];
  }
}

// One block sums the (num_partials, Width) per-block partials column by column in a fixed order and hands
// the totals to `epilogue(totals)` in thread 0.
template <typename acc_t, int Width, typename Epilogue>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_partials_kernel(const acc_t* __restrict__ partials, int64_t num_partials, Epilogue epilogue) {
  acc_t totals[Width] = {};
  // Unrolled so that a thread's loads are in flight together (one at a time, a 16384-partial sum took 7 us on
  // an H200); the additions keep their order, and so their bits.
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < num_partials; i += kBlockThreads) {
#pragma unroll
    for (int k = 0; k < Width; ++k) totals[k] += partials[i * Width + k];
  }
  block_sum<acc_t, Width>(totals);
  if (threadIdx.x == 0) epilogue(totals);
}

template <typename acc_t, int Width, typename Epilogue>
void launch_reduce_partials(const acc_t* partials, int64_t num_partials, Epilogue epilogue, cudaStream_t stream) {
  launch_kernel(reduce_partials_kernel<acc_t, Width, Epilogue>, 1, stream, partials, num_partials, epilogue);
}

// ----------------------------------------------------------------------------- reduced-loss epilogue

// Epilogue of launch_reduce_partials for the (sum of losses, sum of weights) partials of a forward: writes
// the total weight (the divisor the backward of 'mean' needs) and, unless the reduction is 'none' (loss is
// nullptr), the loss: the sum, or for 'mean' the sum divided by the total weight.
template <typename scalar_t>
struct ReducedLossEpilogue {
  using acc_t = acc_type<scalar_t>;
  scalar_t* loss;
  acc_t* total_weight;
  bool mean;
  __device__ void operator()(const acc_t (&totals)[2]) const {
    *total_weight = totals[1];
    if (loss != nullptr) *loss = static_cast<scalar_t>(mean ? totals[0] / totals[1] : totals[0]);
  }
};

// Epilogue for a forward whose 'mean' divides by a count known on the host (e.g. the number of elements), so
// its partials hold the loss only: writes the sum divided by `divisor` (1 for 'sum').
template <typename scalar_t>
struct FixedDivisorLossEpilogue {
  using acc_t = acc_type<scalar_t>;
  scalar_t* loss;
  acc_t divisor;
  __device__ void operator()(const acc_t (&totals)[1]) const { *loss = static_cast<scalar_t>(totals[0] / divisor); }
};

// Epilogue for partials whose total is the result itself (e.g. a sum of weights): writes it.
template <typename acc_t>
struct StoreTotalEpilogue {
  acc_t* total;
  __device__ void operator()(const acc_t (&totals)[1]) const { *total = totals[0]; }
};

// ----------------------------------------------------------------------------- mergeable states across lanes

// A State is a mergeable partial result (e.g. count/mean/co-moment sums merged with Chan's formulas) with
// value_type, kWidth, store(value_type*), static load(const value_type*) and merge(const State&).
template <int Group, typename State>
__device__ __forceinline__ State shuffle_state(const State& state, int offset) {
  typename State::value_type values[State::kWidth];
  state.store(values);
#pragma unroll
  for (int k = 0; k < State::kWidth; ++k) values[k] = group_xor<Group>(values[k], offset);
  return State::load(values);
}

// Merges the states of each aligned group of `Group` lanes (a power of two up to a warp, or the whole block)
// in a fixed order; the result is valid in the group's first lane. Every thread of the block must call it.
template <int Group, typename State>
__device__ void merge_group(State& state) {
  static_assert(Group <= kWarpSize || Group == kBlockThreads, "a group is at most a warp, or the whole block");
  constexpr int kShuffleGroup = Group < kWarpSize ? Group : kWarpSize;
  for (int offset = kShuffleGroup / 2; offset > 0; offset /= 2) state.merge(shuffle_state<kShuffleGroup>(state, offset));
  if constexpr (Group > kWarpSize) {
    constexpr int kWarps = kBlockThreads / kWarpSize;
    __shared__ typename State::value_type warp_states[kWarps][State::kWidth];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (lane == 0) state.store(warp_states[warp]);
    __syncthreads();
    if (warp == 0) {
      state = lane < kWarps ? State::load(warp_states[lane]) : State{};
      for (int offset = kWarps / 2; offset > 0; offset /= 2) state.merge(shuffle_state<kWarpSize>(state, offset));
    }
    __syncthreads();  // warp_states is reused by the next call
  }
}

// Shared memory for one T: raw bytes, since a __shared__ variable cannot run T's member initializers.
template <typename T>
union alignas(T) SharedSlot {
  unsigned char bytes[sizeof(T)];
};

// Thread 0's `value` in every thread of the block. Every thread of the block must call it.
template <typename T>
__device__ T broadcast_from_first_thread(const T& value) {
  __shared__ SharedSlot<T> slot;
  if (threadIdx.x == 0) *reinterpret_cast<T*>(&slot) = value;
  __syncthreads();
  const T result = *reinterpret_cast<const T*>(&slot);
  __syncthreads();  // slot is reused by the next call
  return result;
}

// Copies the state of each aligned group's first lane (where merge_group leaves the result) to every lane of
// the group. Every thread of the block must call it.
template <int Group, typename State>
__device__ void broadcast_group(State& state) {
  static_assert(Group <= kWarpSize || Group == kBlockThreads, "a group is at most a warp, or the whole block");
  if constexpr (Group > kWarpSize) {
    state = broadcast_from_first_thread(state);
  } else if constexpr (Group > 1) {
    typename State::value_type values[State::kWidth];
    state.store(values);
#pragma unroll
    for (int k = 0; k < State::kWidth; ++k) values[k] = __shfl_sync(kFullWarp, values[k], 0, Group);
    state = State::load(values);
  }
}

// ----------------------------------------------------------------------------- launch helpers

// Grid for a grid-stride loop over `work_items` items handled `items_per_block` at a time, for kernels that sum
// per block. It depends on the problem size only, so per-block partial sums (and the final sum) do not depend
// on the device.
inline int64_t grid_size(int64_t work_items, int64_t items_per_block) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work_items, items_per_block), kMaxBlocks));
}

// Grid for a grid-stride loop of `kernel` whose results do not depend on the grid, so that the grid may depend on
// the device: its blocks sum nothing (gradients, per-element losses), or sum exactly (counts). At most the blocks
// the device holds at once (its SMs times the kernel's resident blocks per SM, by its registers, shared memory and
// threads), each given the same number of iterations: the first GPU profile timed kMaxBlocks blocks that return
// at once (the in-place backward when grad_output is 1) at 12 us on an H200. Host queries, once per kernel and
// device (kernel_device_fact); no synchronisation.
template <typename... Params>
int64_t map_grid_size(void (*kernel)(Params...), int64_t work_items, int64_t items_per_block) {
  const int64_t needed = std::max<int64_t>(1, ceil_div(work_items, items_per_block));
#ifdef FUSED_LOSSES_HOST_EMULATION
  static_cast<void>(kernel);
  const int64_t resident = kMaxBlocks;
#else
  const int64_t resident = kernel_device_fact(reinterpret_cast<const void*>(kernel), 1, [&](int device) {
    int multiprocessors = 0, blocks_per_multiprocessor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, kBlockThreads, 0));
    return std::min<int64_t>(kMaxBlocks, int64_t(multiprocessors) * std::max(blocks_per_multiprocessor, 1));
  });
#endif
  return needed <= resident ? needed : ceil_div(needed, ceil_div(needed, resident));
}

// A stored element as the accumulation type. A bool is read through its byte, any non-zero byte being true
// as in PyTorch: a bool object whose byte is not 0 / 1 (a uint8 tensor viewed as bool) would otherwise convert
// as a signed byte (0xFF to -1).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t element_as(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return reinterpret_cast<const uint8_t&>(value) != 0 ? acc_t(1) : acc_t(0);
  } else {
    return static_cast<acc_t>(value);
  }
}

// ----------------------------------------------------------------------------------------------------------
// Multi-pack loads and stores: `Count` consecutive elements of one type through 16-byte accesses, converted
// to or from the accumulation type. Elementwise kernels that read operands of different widths (bf16 logits
// with uint8 targets) handle the same `Count` elements of each, each in its own number of packs. The address
// must be 16-byte aligned and `Count` a multiple of the type's pack size.

template <int Count, typename T, typename acc_t>
__device__ __forceinline__ void load_packs(const T* ptr, acc_t (&out)[Count]) {
  constexpr int vec = kVecSize<T>;
  static_assert(Count % vec == 0, "load_packs reads whole 16-byte packs");
#pragma unroll
  for (int v = 0; v < Count / vec; ++v) {
    const auto pack = load_pack(ptr + v * vec);
#pragma unroll
    for (int k = 0; k < vec; ++k) out[v * vec + k] = element_as<acc_t>(pack.values[k]);
  }
}

template <int Count, typename T, typename acc_t>
__device__ __forceinline__ void store_packs(T* ptr, const acc_t (&values)[Count]) {
  constexpr int vec = kVecSize<T>;
  static_assert(Count % vec == 0, "store_packs writes whole 16-byte packs");
#pragma unroll
  for (int v = 0; v < Count / vec; ++v) {
    Pack<T, vec> pack;
#pragma unroll
    for (int k = 0; k < vec; ++k) pack.values[k] = static_cast<T>(values[v * vec + k]);
    store_pack(ptr + v * vec, pack);
  }
}

}  // namespace fused_losses::cuda
