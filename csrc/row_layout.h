// How the rows of a tensor map to memory; shared by every op, on the CPU and CUDA.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fused_losses {

// A tensor viewed as (outer, L, inner) whose rows are the (outer, inner) pairs, row r = (r / inner, r % inner),
// each holding L elements `class_stride` apart: the classes of a classification input (N, C, d1, ..., dk)
// (inner = d1 * ... * dk), or the time steps of a (B, T, D) sequence input (inner = D).
struct RowLayout {
  int64_t inner;
  int64_t outer_stride;
  int64_t inner_stride;
  int64_t class_stride;
  C10_HOST_DEVICE int64_t row_offset(int64_t row) const {
    if (inner == 1) return row * outer_stride;
    return (row / inner) * outer_stride + (row % inner) * inner_stride;
  }
};

}  // namespace fused_losses
