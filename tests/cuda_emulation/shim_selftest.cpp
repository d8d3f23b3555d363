// Kernels that check the host shim itself (tests/test_cuda_emulation.py): the warp collectives against their
// CUDA definitions, and that a barrier not every thread reaches is reported instead of hanging; and FastDivider
// (cuda_utils.cuh) through the shim's __umul64hi over the whole 64-bit range, which no test shape reaches.
#include "host_shim.h"

#include "cuda/cuda_utils.cuh"

namespace {

using fused_losses::cuda::kBlockThreads;
using fused_losses::cuda::launch_kernel;

// out[thread] = (xor partner, broadcast source, any-vote, lanes of the warp with the same value % 5) for
// segments of `width` lanes.
__global__ void collectives_kernel(int64_t* out, int lane_mask, int source_lane, int width) {
  const int value = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  int64_t* row = out + 4 * value;
  row[0] = __shfl_xor_sync(0xffffffffu, value, lane_mask, width);
  row[1] = __shfl_sync(0xffffffffu, value, source_lane, width);
  row[2] = __any_sync(0xffffffffu, threadIdx.x == 95 && blockIdx.x == 1);  // lane 31 of warp 2, block 1
  row[3] = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(value % 5));
}

// Threads of a block exchange values through shared memory between two barriers: out[t] = value of t + 1.
__global__ void shared_memory_kernel(int64_t* out) {
  __shared__ int64_t values[kBlockThreads];
  values[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[(threadIdx.x + 1) % kBlockThreads];
}

// Mistakes the emulation must report: a thread returning before a barrier, or lanes at different barriers.
__global__ void divergent_kernel(int64_t mistake) {
  if (mistake == 0 && threadIdx.x == 5) return;
  if (mistake == 1 && threadIdx.x == 40) {
    __syncwarp();
    return;
  }
  if (mistake == 2 && threadIdx.x < 32) {
    if (threadIdx.x == 3) __syncwarp();
    else (void)__shfl_sync(0xffffffffu, 1, 0);
    return;
  }
  __syncthreads();
}

at::Tensor collectives(int64_t blocks, int64_t lane_mask, int64_t source_lane, int64_t width) {
  at::Tensor out = at::empty({blocks * kBlockThreads, 4}, at::kLong);
  launch_kernel(collectives_kernel, blocks, nullptr, out.data_ptr<int64_t>(), static_cast<int>(lane_mask),
                static_cast<int>(source_lane), static_cast<int>(width));
  return out;
}

at::Tensor shared_memory(int64_t blocks) {
  at::Tensor out = at::empty({blocks * kBlockThreads}, at::kLong);
  launch_kernel(shared_memory_kernel, blocks, nullptr, out.data_ptr<int64_t>());
  return out;
}

void divergent(int64_t mistake) { launch_kernel(divergent_kernel, 1, nullptr, mistake); }

// out[i, j] = dividends[j] / divisors[i] through FastDivider (divisors in [1, 2^63), dividends in [0, 2^63)).
at::Tensor fast_divide(const at::Tensor& divisors, const at::Tensor& dividends) {
  at::Tensor out = at::empty({divisors.numel(), dividends.numel()}, at::kLong);
  for (int64_t i = 0; i < divisors.numel(); ++i) {
    const fused_losses::cuda::FastDivider divider(static_cast<uint64_t>(divisors[i].item<int64_t>()));
    for (int64_t j = 0; j < dividends.numel(); ++j) {
      out[i][j] = static_cast<int64_t>(divider.divide(static_cast<uint64_t>(dividends[j].item<int64_t>())));
    }
  }
  return out;
}

}  // namespace

// An indirection so that the namespace macro expands before TORCH_LIBRARY_FRAGMENT pastes it.
#define SELFTEST_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
SELFTEST_FRAGMENT(FUSED_LOSSES_EMULATED_NAMESPACE, m) {
  m.def("selftest_collectives(int blocks, int lane_mask, int source_lane, int width) -> Tensor", &collectives);
  m.def("selftest_shared_memory(int blocks) -> Tensor", &shared_memory);
  m.def("selftest_divergent(int mistake) -> ()", &divergent);
  m.def("selftest_fast_divide(Tensor divisors, Tensor dividends) -> Tensor", &fast_divide);
}
