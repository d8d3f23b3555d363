// Host emulation of the CUDA built-ins the kernels in csrc/cuda use, force-included (-include) before each
// kernel source when it is compiled as C++ for the CPU (build.py).
//
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) on the calling
// thread, switched only where a thread waits for others: __syncthreads, __syncwarp and the warp collectives
// (__shfl_sync, __shfl_xor_sync, __any_sync, __match_any_sync). Each barrier completes when every thread of
// its block or warp has arrived, so a barrier that some threads skip, or a thread that returns while others
// wait, is reported as an error instead of hanging (on the GPU it is undefined behaviour). Lanes of a warp do
// not run in lockstep, so code that assumes they do without a __syncwarp gives wrong results here. What the
// emulation cannot check: the memory model, races between blocks, timing, shared-memory bank conflicts.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ------------------------------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static instance per declaration is the block's shared memory.
#define __shared__ static

using cudaStream_t = struct CUstream_st*;

namespace fused_losses::host_emulation {

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

// Where the running fiber is: its thread and block indices and the launch's dimensions.
struct ThreadPosition {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadPosition& current_position();

// Runs `blocks` blocks of `threads` threads, each thread calling `body`; throws std::runtime_error (with the
// block and what the threads were waiting for) when the threads of a block cannot all reach the same barrier.
// The blocks run one at a time, so they share one buffer of `dynamic_shared_bytes` (dynamic_shared_memory).
void run_grid(int64_t blocks, int threads, const std::function<void()>& body, size_t dynamic_shared_bytes = 0);
void* dynamic_shared_memory();  // 16-byte aligned; only in a launch that asked for some

void sync_block();
void sync_warp(unsigned int mask);
// Publishes the calling lane's `bytes` (at most 16) to its warp and returns after every lane has; `lane_value`
// then reads lane i's bytes until the next publish_to_warp (which waits until every lane is done reading).
void publish_to_warp(unsigned int mask, const void* bytes, size_t size);
const void* lane_value(int lane);
void end_warp_exchange(unsigned int mask);

template <typename T>
T shuffle_from(unsigned int mask, T value, int source_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "a shuffled value is at most 16 bytes");
  publish_to_warp(mask, &value, sizeof(T));
  T result;
  std::memcpy(&result, lane_value(source_lane), sizeof(T));
  end_warp_exchange(mask);
  return result;
}

inline int lane_id() { return static_cast<int>(current_position().thread_idx.x % 32); }

}  // namespace fused_losses::host_emulation

#define threadIdx (::fused_losses::host_emulation::current_position().thread_idx)
#define blockIdx (::fused_losses::host_emulation::current_position().block_idx)
#define blockDim (::fused_losses::host_emulation::current_position().block_dim)
#define gridDim (::fused_losses::host_emulation::current_position().grid_dim)

// ------------------------------------------------------------------------------------------ built-ins
inline void __syncthreads() { ::fused_losses::host_emulation::sync_block(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::fused_losses::host_emulation::sync_warp(mask); }

// Lane `src_lane` of the caller's segment of `width` lanes.
template <typename T>
T __shfl_sync(unsigned int mask, T value, int src_lane, int width = 32) {
  const int lane = ::fused_losses::host_emulation::lane_id();
  const int source = (lane / width) * width + src_lane % width;
  return ::fused_losses::host_emulation::shuffle_from(mask, value, source);
}

// Lane `lane ^ lane_mask`; a lane whose partner is in a later segment of `width` lanes keeps its own value.
template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  const int lane = ::fused_losses::host_emulation::lane_id();
  const int partner = lane ^ lane_mask;
  const int source = partner >= (lane / width + 1) * width ? lane : partner;
  return ::fused_losses::host_emulation::shuffle_from(mask, value, source);
}

inline int __any_sync(unsigned int mask, int predicate) {
  namespace emulation = ::fused_losses::host_emulation;
  const int own = predicate != 0;
  emulation::publish_to_warp(mask, &own, sizeof(own));
  int any = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if ((mask >> lane) & 1u) any |= *static_cast<const int*>(emulation::lane_value(lane));
  }
  emulation::end_warp_exchange(mask);
  return any;
}

// The lanes of the mask whose `value` equals the caller's, as a bit mask.
inline unsigned int __match_any_sync(unsigned int mask, unsigned long long value) {
  namespace emulation = ::fused_losses::host_emulation;
  emulation::publish_to_warp(mask, &value, sizeof(value));
  unsigned int same = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && *static_cast<const unsigned long long*>(emulation::lane_value(lane)) == value) {
      same |= 1u << lane;
    }
  }
  emulation::end_warp_exchange(mask);
  return same;
}

// The fast approximate intrinsics as the exact functions they approximate: the emulation checks the kernels'
// logic, not the device's approximation error, which test_fast_float_math_accuracy bounds by injecting each
// intrinsic's documented worst error into the same formulas (docs/design.md, "Fast float32 math").
// __fmaf_rn is exact on both: one rounding of a * b + c.
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
namespace fused_losses::host_emulation {
// FastFloatPrimitives::exp_flush_subnormal (ex2.approx.ftz on the device): exp with a subnormal result flushed to 0.
inline float exp_flush_subnormal(float x) {
  const float result = std::exp(x);
  return std::fpclassify(result) == FP_SUBNORMAL ? 0.0f : result;
}
// The sparse BCE kernel's .ftz log: a subnormal operand or result flushed to 0.
inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? 0.0f : x; }
// lg2.approx.ftz times ln 2: log(x), a subnormal x taken as 0 (-inf).
inline float log_flush_subnormal(float x) { return std::log(flush_subnormal(x)); }
}  // namespace fused_losses::host_emulation

// The high 64 bits of the 128-bit product (the strided BCE kernel's FastDivider).
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}

// Fibers switch only at barriers, so a read-modify-write is atomic.
inline unsigned int atomicOr(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old | value;
  return old;
}

// ------------------------------------------------------------------------------------------ registration
// The kernel sources register their CUDA kernels with TORCH_LIBRARY_IMPL(fused_losses, CUDA, m); here they
// register as the CPU kernels of the emulation's own namespace (FUSED_LOSSES_EMULATED_NAMESPACE, set by
// build.py), whose schemas host_emulation.cpp defines.
#define FUSED_LOSSES_EMULATED_IMPL(ns, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) FUSED_LOSSES_EMULATED_IMPL(FUSED_LOSSES_EMULATED_NAMESPACE, m)
#define FUSED_LOSSES_EMULATED_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
