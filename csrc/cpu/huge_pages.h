// Large CPU outputs on transparent huge pages.
//
// glibc serves an allocation of more than its largest mmap threshold (32 MB on 64-bit) from a fresh mapping and
// unmaps it on free, so such an output (the (16384, 1000) float32 gradient is 65 MB) faults all of its pages in at
// every call, 4 KB at a time: 16,000 faults that took longer than the kernel writing the gradient (README, CPU
// results: allocator regimes). Advising huge pages before the first write makes that ~32 faults of 2 MB. It is what
// PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation of 2 MB and more; here only outputs that are fresh
// mappings anyway get it, so heap memory that glibc reuses between calls is left as it is.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_losses::cpu {

constexpr size_t kHugePageAdviceMinBytes = size_t(32) << 20;  // glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit

// Asks the kernel for transparent huge pages under `output`'s whole 2 MB pages; call it before writing `output`.
// Advice only: where THP is off (or always on) nothing changes, and a refusal is harmless.
inline void advise_huge_pages(const at::Tensor& output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = output.storage().nbytes();
  if (bytes < kHugePageAdviceMinBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(output.storage().data());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)output;
#endif
}

}  // namespace fused_losses::cpu
