// Large CPU outputs on transparent huge pages.
//
// Under glibc's default thresholds an allocation of more than its largest mmap threshold (32 MB on 64-bit) is a
// fresh mapping, unmapped on free, unless the heap's top has room for it, so such an output (the (16384, 1000)
// float32 gradient is 65 MB) faulted all of its pages in at every call, 4 KB at a time: 16,000 faults that took
// longer than the kernel writing the gradient (README, CPU results: page faults). Advising huge pages before the
// first write leaves ~32 faults of 2 MB and the 4 KB pages of the output's unaligned ends. PyTorch's
// THP_MEM_ALLOC_ENABLE=1 does the same for every block of 2 MB and more (then this advice is not repeated); here
// only outputs large enough to be fresh mappings as a rule get it, so that heap memory glibc reuses between calls
// is mostly left as it is (where such an output does come from the heap, the advice stays with that memory after
// it is freed: it is already faulted in, and khugepaged may merge it into huge pages). FUSED_LOSSES_HUGE_PAGES=0
// turns it off (with the kernel's THP defrag setting `madvise`, an advised fault may compact memory first).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/env.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_losses::cpu {

constexpr size_t kHugePageAdviceMinBytes = size_t(32) << 20;  // glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit

// Asks the kernel for transparent huge pages under the whole 2 MB pages of `output`, a fresh output not yet
// written. Advice only: where THP is off nothing changes, and a refusal is harmless.
inline void advise_huge_pages(const at::Tensor& output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = c10::utils::check_env("FUSED_LOSSES_HUGE_PAGES") != false &&
                              c10::utils::check_env("THP_MEM_ALLOC_ENABLE") != true;
  const size_t bytes = output.nbytes();
  if (!enabled || bytes < kHugePageAdviceMinBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(output.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)output;
#endif
}

}  // namespace fused_losses::cpu
