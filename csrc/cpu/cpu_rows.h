// Row access helpers for the CPU kernels: read a (possibly strided, possibly reduced-precision) row as a
// contiguous array of the accumulation type, and write one back.
#pragma once

#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fused_losses::cpu {

// Returns a pointer to `count` accumulation-type values of the row starting at `src` with element stride
// `stride`: the row itself when it already is a contiguous acc_t array, else `buffer` filled by conversion.
template <typename acc_t, typename scalar_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t stride, int64_t count, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return src;
  }
  buffer.resize(count);
  if constexpr (sizeof(scalar_t) == 1) {
    // bool / uint8: a plain loop the compiler vectorises (at::vec::convert loads bools one by one). A bool
    // is read as its byte, any non-zero byte being true (a bool whose byte is not 0 / 1, from a uint8 tensor
    // viewed as bool, must not convert as its raw value).
    const auto* bytes = reinterpret_cast<const uint8_t*>(src);
    for (int64_t j = 0; j < count; ++j) {
      const uint8_t byte = bytes[j * stride];
      buffer[j] = std::is_same_v<scalar_t, bool> ? acc_t(byte != 0) : static_cast<acc_t>(byte);
    }
    return buffer.data();
  }
  if (stride == 1) {
    at::vec::convert(src, buffer.data(), count);
  } else {
    for (int64_t j = 0; j < count; ++j) buffer[j] = static_cast<acc_t>(src[j * stride]);
  }
  return buffer.data();
}

// Returns where to compute a row destined for `dst` (stride `stride`): `dst` itself when it is a contiguous
// acc_t array, else `buffer`; store_row then moves the buffer to `dst`.
template <typename acc_t, typename scalar_t>
acc_t* row_output(scalar_t* dst, int64_t stride, int64_t count, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return dst;
  }
  buffer.resize(count);
  return buffer.data();
}

template <typename acc_t, typename scalar_t>
void store_row(const acc_t* values, scalar_t* dst, int64_t stride, int64_t count) {
  if (static_cast<const void*>(values) == static_cast<const void*>(dst)) return;
  if (stride == 1) {
    at::vec::convert(values, dst, count);
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j * stride] = static_cast<scalar_t>(values[j]);
  }
}

// ----------------------------------------------------------------------------------------------------------
// Runs of a StridedLayout: elementwise kernels walk an element range in row-major order as runs along the
// innermost (merged) dimension, where every operand has one stride, and hand each run to row_as_acc.

// Calls fn(first_flat_index, count, offsets_of_first) for consecutive runs covering [begin, end), none longer
// than `max_run` nor crossing the end of the innermost dimension.
template <int NumOperands, typename Fn>
void for_each_run(const StridedLayout<NumOperands>& layout, int64_t begin, int64_t end, int64_t max_run,
                  const Fn& fn) {
  const int64_t inner = layout.inner_size();
  int64_t offsets[NumOperands];
  for (int64_t flat = begin; flat < end;) {
    const int64_t count = std::min({end - flat, inner - flat % inner, max_run});
    layout.offsets(flat, offsets);
    fn(flat, count, offsets);
    flat += count;
  }
}

}  // namespace fused_losses::cpu
