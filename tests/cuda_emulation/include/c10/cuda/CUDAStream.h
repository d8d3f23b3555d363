// Host emulation (tests/cuda_emulation): kernels run when launched, so there is one null stream.
#pragma once

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
