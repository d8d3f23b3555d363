// Host emulation (tests/cuda_emulation): a failed launch throws from run_grid, so there is nothing to check.
#pragma once

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (false)
