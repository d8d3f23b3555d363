// CUDA kernels of fused_losses::cost_sensitive_cross_entropy.
//
// Schedules (common.h): the forward reads each row once (online softmax, argmax, expected cost and smoothing
// sums in one sweep), writes O(rows) statistics and one partial sum per block; a one-block kernel adds the
// partials in a fixed order. The backward re-reads each row and writes the gradient once (3-pass). With
// write_gradient (a reduced loss whose input requires grad) the forward also writes the gradient for
// grad_loss = 1 with the backward's coefficients and element code, after the row's scan; for 'mean' a pre-pass
// over the targets first sums their class weights exactly as the forward does (same rows per thread, block
// sums and final reduce: the same bits) into total_weight, which the forward reads on the device. The in-place
// backward then returns at once in every thread when grad_loss, read on the device, is 1 (no host
// synchronisation), and otherwise recomputes as the 3-pass backward (2-pass).
//
// Rows are read in one of three ways (RowAccess): a block stages 256 short contiguous rows (at most
// kTileRowBytes each) through shared memory with coalesced 16-byte copies and each thread scans one row there
// (tile kernels); otherwise a group of G lanes owns a row and reads it as 16-byte packs (G = 1 up to 4 packs, 4
// up to 64, 16 up to 256, a warp up to 512, and in the forward the whole block beyond, which keeps the row in
// shared memory for the gradient sweep: block_row_forward_kernel) or element by element (strided or misaligned
// rows; the same split by elements, up to a warp).
//
// The scan (LaneScan) works a pack (or a tile row) at a time: the pack's max first, one rescale of the running
// sums when it raises the max, then exp(z - max) of each element through the SFU (fast_exp). The argmax is
// deferred: the scan remembers the pack that last raised the max and the first index of the max is searched
// there once, at the end. Rows whose scan is not finite (a NaN, +inf, or every logit -inf; a -inf among finite
// logits is just a zero term) are scanned again element by element with RowScan, whose edge cases follow F.cross_entropy. The expected-cost and smoothing sums (and the
// gradient's matching terms) are compiled only into the kExtraTerms kernels.
#include "cost_sensitive_cross_entropy.h"
#include "cuda/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fused_losses::cuda {
namespace {

// Rows of at most this many bytes, back to back in memory, take the tile kernels (bf16 / fp16 C <= 32,
// fp32 C <= 16, fp64 C <= 8): one row per thread, the block's rows in one shared-memory tile.
constexpr int kTileRowBytes = 64;
constexpr int kTileRows = kBlockThreads;
// Resident blocks per SM the row kernels ask of the compiler: 4 (at most 64 registers at 256 threads) for the
// float32 / half types; float64's row state is twice as wide, so 2 (up to 128 registers) keeps it off the stack.
template <typename scalar_t>
constexpr int kMinBlocksPerSM = std::is_same_v<scalar_t, double> ? 2 : 4;

enum class RowAccess { Tile, Packs, Elements };

// Lanes per row for a row of `units` loads (16-byte vectors or single elements). Each lane added to a row costs
// issue slots that do no loads: a round of the lanes' merge, and the row's epilogue (the finish, the statistics,
// the gradient's coefficients), which the whole group issues while one lane works. So a row gets as few lanes as
// keep a lane at 16 loads or fewer (what the rows of a block read in the scan must still be in L1 / L2 when the
// gradient sweep reads them again), and a warp only beyond 256 loads (C = 1000 in bf16: 16 lanes, two rows per
// warp; the first GPU profile found the warp-per-row forward issue-bound there, docs/design.md). Vectorizable
// rows of more than 512 loads take a block in the forward (forward_lanes_for).
int lanes_per_row(int64_t units, bool strided) {
  if (strided || units <= 4) return 1;
  if (units <= 64) return 4;
  return units <= 256 ? 16 : kWarpSize;
}

template <typename F>
void dispatch_lanes_per_row(int lanes, const F& f) {
  switch (lanes) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, kWarpSize>{});
  }
}

// Whether a call needs the expected-cost and smoothing terms; the common case compiles without them.
template <typename acc_t>
bool needs_extra_terms(const CrossEntropyConfig<acc_t>& cfg) {
  return (cfg.cost != nullptr && cfg.mode == CostMode::Expected) || cfg.label_smoothing != acc_t(0);
}

template <typename acc_t, typename F>
void dispatch_extra_terms(const CrossEntropyConfig<acc_t>& cfg, const F& f) {
  if (needs_extra_terms(cfg)) return f(std::true_type{});
  return f(std::false_type{});
}

// The config as a kernel compiled without the extra terms sees it: argmax mode and no smoothing, which
// dispatch_extra_terms guarantees, as compile-time facts, so that the shared row math drops those branches (and
// their divisions, whose calls would make the compiler save registers on the stack).
template <bool kExtraTerms, typename acc_t>
__device__ CrossEntropyConfig<acc_t> specialized(CrossEntropyConfig<acc_t> cfg) {
  if constexpr (!kExtraTerms) {
    cfg.mode = CostMode::Argmax;  // the same rows: without a cost matrix the mode is not read
    cfg.label_smoothing = 0;
    cfg.smoothing_per_class = 0;
  }
  return cfg;
}

// How a kernel reads rows: vectorised when every row starts 16-byte aligned and holds whole vectors.
template <typename scalar_t>
bool rows_vectorizable(const void* base, const RowLayout& layout, int64_t num_classes) {
  constexpr int vec = kVecSize<scalar_t>;
  return layout.inner == 1 && layout.class_stride == 1 && num_classes % vec == 0 && layout.outer_stride % vec == 0 &&
         is_aligned_16(base);
}

template <typename scalar_t>
bool rows_fit_tile(const RowLayout& layout, int64_t num_classes) {
  return layout.inner == 1 && layout.class_stride == 1 && layout.outer_stride == num_classes &&
         num_classes * int64_t(sizeof(scalar_t)) <= kTileRowBytes;
}

// exp(x): for float one MUFU.EX2 of x log2(e) (__expf's error: a few ulp for the |x| below 20 that matter in a
// softmax; terms under 2^-126 of the row's max flush to 0, docs/design.md), for double the accurate exp.
__device__ __forceinline__ float fast_exp(float x) { return FastFloatPrimitives::exp_flush_subnormal(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// The larger of two values, ignoring a NaN (FMNMX).
__device__ __forceinline__ float larger(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double larger(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t x) {
  return x - x == acc_t(0);  // NaN for an infinity or a NaN
}

// What the extra terms read: the expected-cost row (nullptr but in expected mode) and, with smoothing, the
// class weights (nullptr without weights: all ones).
template <typename acc_t>
struct ExtraTermInputs {
  const acc_t* cost_row;
  const acc_t* class_weight;
  bool smoothing;
};

template <typename acc_t>
__device__ ExtraTermInputs<acc_t> extra_term_inputs(const CrossEntropyConfig<acc_t>& cfg, int64_t y) {
  const bool expected = cfg.cost != nullptr && cfg.mode == CostMode::Expected;
  return {expected ? cfg.cost + y * cfg.num_classes : nullptr, cfg.class_weight, cfg.label_smoothing != acc_t(0)};
}

// The extra terms' operands of one element j of a row: the cost W[y, j] and the class weight w_j.
template <typename acc_t>
struct alignas(2 * sizeof(acc_t)) ExtraTermOperands {
  acc_t cost, weight;
};

// Where the scan and gradient loops read the extra terms' operands (ExtraTermOperands) from: kAny, and with it
// kCostRow and kClassWeights, operands(j). The loops are compiled once per source type, so what a row has (a
// cost row, class weights) is a compile-time fact there and the loops carry no per-element branches; an operand
// a row does not have is not read: its term is left out (cost) or taken as 1 (weight).
struct NoExtraTerms {  // the kernels without kExtraTerms
  static constexpr bool kAny = false;
};

// A row's cost row and class weights in global memory (each read only when its flag is set).
template <typename acc_t, bool kHasCostRow, bool kHasClassWeights>
struct GlobalExtraTerms {
  static constexpr bool kAny = true, kCostRow = kHasCostRow, kClassWeights = kHasClassWeights;
  const acc_t* cost_row;
  const acc_t* class_weight;
  __device__ ExtraTermOperands<acc_t> operands(int j) const {
    ExtraTermOperands<acc_t> op{acc_t(0), acc_t(1)};
    if constexpr (kCostRow) op.cost = cost_row[j];
    if constexpr (kClassWeights) op.weight = class_weight[j];
    return op;
  }
};

// Calls f with the GlobalExtraTerms of a row whose cost row and class weights are `cost_row` and `class_weight`
// (nullptr when the row has none), or with NoExtraTerms in the kernels without kExtraTerms.
template <bool kExtraTerms, typename acc_t, typename F>
__device__ __forceinline__ void with_extra_terms(const acc_t* cost_row, const acc_t* class_weight, const F& f) {
  if constexpr (!kExtraTerms) {
    f(NoExtraTerms{});
  } else if (cost_row != nullptr) {
    if (class_weight != nullptr) {
      f(GlobalExtraTerms<acc_t, true, true>{cost_row, class_weight});
    } else {
      f(GlobalExtraTerms<acc_t, true, false>{cost_row, nullptr});
    }
  } else if (class_weight != nullptr) {
    f(GlobalExtraTerms<acc_t, false, true>{nullptr, class_weight});
  } else {
    f(GlobalExtraTerms<acc_t, false, false>{nullptr, nullptr});
  }
}

// The online softmax of part of a row, a unit (a pack, an element, a tile row) at a time: raise_max with the
// unit's max, then accumulate each element. Only finite rows give the right sums (see the file comment).
template <typename acc_t, bool kExtraTerms>
struct LaneScan {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_exp = 0;
  acc_t cost_exp = 0;            // kExtraTerms: sum_j exp(z_j - max) W[y, j]
  acc_t weighted_logit_sum = 0;  // kExtraTerms: sum_j w_j (z_j - logit_shift)
  acc_t logit_shift = 0;         // kExtraTerms: the row's smoothing_shift (set_logit_shift)
  int max_unit = -1;             // the unit whose max last raised `max`: the first unit holding the max

  __device__ void raise_max(acc_t unit_max, int unit) {
    if (unit_max > max) {
      const acc_t r = fast_exp(max - unit_max);
      sum_exp *= r;
      if constexpr (kExtraTerms) cost_exp *= r;
      max = unit_max;
      max_unit = unit;
    }
  }

  // The row's smoothing_shift, from its target's logit `row_target` (read only with the extra terms).
  template <typename scalar_t>
  __device__ void set_logit_shift(const scalar_t* row_target) {
    if constexpr (kExtraTerms) logit_shift = smoothing_shift(static_cast<acc_t>(*row_target));
  }

  // Adds exp(z - max) of the N elements values[i] (class first + i), pairwise within the unit, and with
  // `extra` (ExtraTerms) the expected-cost and weighted-logit sums (FMAs: one rounding each). While no finite
  // logit has been seen (max is -inf), the unit holds only -inf (exp gives 0) or NaN (kept): shifting by 0
  // instead of max keeps -inf - -inf from making a masked part of a row NaN and sending it to the rescan.
  template <int N, typename ExtraTerms>
  __device__ void accumulate(const acc_t (&values)[N], int first, const ExtraTerms& extra) {
    const acc_t shift = max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max;
    acc_t e[N];
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = fast_exp(values[i] - shift);
    if constexpr (ExtraTerms::kAny) {
      static_assert(kExtraTerms, "extra terms need the kExtraTerms scan");
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const ExtraTermOperands<acc_t> op = extra.operands(first + i);
        if constexpr (ExtraTerms::kCostRow) cost_exp = std::fma(e[i], op.cost, cost_exp);
        const acc_t shifted = values[i] - logit_shift;
        weighted_logit_sum = ExtraTerms::kClassWeights ? std::fma(op.weight, shifted, weighted_logit_sum)
                                                       : weighted_logit_sum + shifted;
      }
    }
#pragma unroll
    for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
      for (int i = 0; i < width; ++i) e[i] += e[i + width];
    }
    sum_exp += e[0];
  }

  template <int N, typename ExtraTerms>
  __device__ void add_unit(const acc_t (&values)[N], int first, int unit, const ExtraTerms& extra) {
    acc_t unit_max = values[0];
#pragma unroll
    for (int i = 1; i < N; ++i) unit_max = larger(unit_max, values[i]);
    raise_max(unit_max, unit);
    accumulate(values, first, extra);
  }

  // As a RowScan to merge or finish; the argmax (best_value, best_index) is left for the caller.
  __device__ RowScan<acc_t> row_scan() const {
    RowScan<acc_t> scan;
    scan.max = max;
    scan.sum_exp = sum_exp;
    scan.cost_exp = cost_exp;
    scan.weighted_logit_sum = weighted_logit_sum;
    return scan;
  }
};

// Whether the fast scan of a row stands: false for a row with a NaN, +inf or only -inf logits (a NaN sum or an
// infinite max), which must be scanned again with RowScan.
template <typename acc_t>
__device__ bool scan_is_finite(const RowScan<acc_t>& scan) {
  return is_finite(scan.max) && is_finite(scan.sum_exp);
}

// The argmax of a scan whose max first occurs at element index `first_of_max`.
template <typename acc_t>
__device__ void set_argmax(RowScan<acc_t>& scan, int first_of_max) {
  scan.best_value = scan.max;
  scan.best_index = first_of_max;
}

// First i < count with row[i * stride] == value (present).
template <typename scalar_t, typename acc_t>
__device__ int first_index_of(const scalar_t* row, int64_t stride, int count, acc_t value) {
  int i = 0;
  while (i + 1 < count && static_cast<acc_t>(row[i * stride]) != value) ++i;
  return i;
}

// The exact element-by-element scan of the lane's part of a row (rows that are not finite).
template <typename scalar_t>
__device__ RowScan<acc_type<scalar_t>> exact_scan(const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                                  const scalar_t* row, int64_t class_stride, int first, int step,
                                                  int64_t y) {
  using acc_t = acc_type<scalar_t>;
  const ExtraTermInputs<acc_t> extra = extra_term_inputs(cfg, y);
  RowScan<acc_t> scan;
  const acc_t shift = smoothing_shift(static_cast<acc_t>(row[y * class_stride]));
  for (int j = first; j < cfg.num_classes; j += step) {
    scan.add(static_cast<acc_t>(row[j * class_stride]), j, extra.cost_row != nullptr ? extra.cost_row[j] : acc_t(0),
             extra.smoothing ? class_weight_of(cfg, j) : acc_t(1), shift);
  }
  return scan;
}

// The scan of the lane's part of a global row: packs v = lane, lane + G, ... or elements j = lane, lane + G, ...
template <typename scalar_t, int Group, bool kExtraTerms>
__device__ RowScan<acc_type<scalar_t>> scan_lane(const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                                 const scalar_t* __restrict__ row, int64_t class_stride,
                                                 RowAccess access, int64_t y, bool want_argmax, int lane) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  const int C = static_cast<int>(cfg.num_classes);
  const ExtraTermInputs<acc_t> inputs = extra_term_inputs(cfg, y);
  LaneScan<acc_t, kExtraTerms> lane_scan;
  lane_scan.set_logit_shift(row + y * class_stride);
  with_extra_terms<kExtraTerms>(inputs.cost_row, inputs.smoothing ? inputs.class_weight : nullptr,
                                [&](const auto& extra) {
    if (access == RowAccess::Packs) {
      for (int v = lane; v < C / vec; v += Group) {
        const auto pack = load_pack(row + v * vec);
        acc_t values[vec];
#pragma unroll
        for (int i = 0; i < vec; ++i) values[i] = static_cast<acc_t>(pack.values[i]);
        lane_scan.add_unit(values, v * vec, v, extra);
      }
    } else {
      for (int j = lane; j < C; j += Group) {
        const acc_t values[1] = {static_cast<acc_t>(row[j * class_stride])};
        lane_scan.add_unit(values, j, j, extra);
      }
    }
  });
  RowScan<acc_t> scan = lane_scan.row_scan();
  if (want_argmax && lane_scan.max_unit >= 0) {
    const int unit_size = access == RowAccess::Packs ? vec : 1;
    const int unit_first = lane_scan.max_unit * unit_size;
    set_argmax(scan, unit_first + first_index_of(row + unit_first * class_stride, class_stride, unit_size,
                                                 lane_scan.max));
  }
  return scan;
}

template <int Group, typename acc_t>
__device__ void merge_group(RowScan<acc_t>& scan) {
  for (int offset = Group / 2; offset > 0; offset /= 2) {
    RowScan<acc_t> other;
    other.max = group_xor<Group>(scan.max, offset);
    other.sum_exp = group_xor<Group>(scan.sum_exp, offset);
    other.cost_exp = group_xor<Group>(scan.cost_exp, offset);
    other.weighted_logit_sum = group_xor<Group>(scan.weighted_logit_sum, offset);
    other.best_value = group_xor<Group>(scan.best_value, offset);
    other.best_index = group_xor<Group>(scan.best_index, offset);
    scan.merge(other);
  }
}

// exp(from - to) for to >= from through fast_exp, exactly 1 when equal (also for two infinities of one sign).
template <typename acc_t>
__device__ __forceinline__ acc_t fast_rescale(acc_t from, acc_t to) {
  return from == to ? acc_t(1) : fast_exp(from - to);
}

// One step of the fast merge (merge_finite_group): `scan`, whose first index of the max is `best_index` (with
// want_argmax), takes in the max and the sums of `other`, whose first index of the max is `other_index`.
template <bool kExtraTerms, typename acc_t>
__device__ __forceinline__ void merge_finite(RowScan<acc_t>& scan, int& best_index, const RowScan<acc_t>& other,
                                             int other_index, bool want_argmax) {
  const acc_t new_max = larger(scan.max, other.max);
  const acc_t r_self = fast_rescale(scan.max, new_max), r_other = fast_rescale(other.max, new_max);
  scan.sum_exp = scan.sum_exp * r_self + other.sum_exp * r_other;
  if constexpr (kExtraTerms) {
    scan.cost_exp = scan.cost_exp * r_self + other.cost_exp * r_other;
    scan.weighted_logit_sum += other.weighted_logit_sum;
  }
  // The first index of the max: the larger max, the smaller index on a tie.
  if (want_argmax && (other.max > scan.max || (other.max == scan.max && other_index < best_index))) {
    best_index = other_index;
  }
  scan.max = new_max;
}

// merge_group for the fast scan, whose result stands only when scan_is_finite (a row that fails it is scanned
// again and merged by merge_group). Where every lane's scan is finite, a lane's best value is its max: only the
// max, the sums and, for the argmax, a 32-bit index travel (2-5 shuffles a round where merge_group takes 7),
// and each rescale is one fast exp. A row whose lanes' scans are not all finite still merges to a scan that is
// not (a NaN sum, an infinite max), as merge_group's would. Every lane of the warp must call it.
template <int Group, bool kExtraTerms, typename acc_t>
__device__ void merge_finite_group(RowScan<acc_t>& scan, bool want_argmax) {
  constexpr int kNoIndex = std::numeric_limits<int>::max();
  int best_index = scan.best_index < kNoIndex ? static_cast<int>(scan.best_index) : kNoIndex;
#pragma unroll
  for (int offset = Group / 2; offset > 0; offset /= 2) {
    RowScan<acc_t> other;
    other.max = group_xor<Group>(scan.max, offset);
    other.sum_exp = group_xor<Group>(scan.sum_exp, offset);
    if constexpr (kExtraTerms) {
      other.cost_exp = group_xor<Group>(scan.cost_exp, offset);
      other.weighted_logit_sum = group_xor<Group>(scan.weighted_logit_sum, offset);
    }
    const int other_index = want_argmax ? group_xor<Group>(best_index, offset) : kNoIndex;
    merge_finite<kExtraTerms>(scan, best_index, other, other_index, want_argmax);
  }
  scan.best_value = scan.max;
  scan.best_index = best_index;
}

// Lane 0's result of the row in every lane of the group; every lane of the warp must call it.
template <int Group, typename acc_t>
__device__ RowLoss<acc_t> broadcast_row_loss(const RowLoss<acc_t>& row) {
  RowLoss<acc_t> all;
  all.max = group_broadcast<Group>(row.max);
  all.log_sum = group_broadcast<Group>(row.log_sum);
  all.cost_factor = group_broadcast<Group>(row.cost_factor);
  all.cross_entropy = group_broadcast<Group>(row.cross_entropy);
  return all;
}

// Where the forward stores each row's statistics and (reduction 'none') its loss.
template <typename scalar_t>
struct ForwardRowOutputs {
  using acc_t = acc_type<scalar_t>;
  int num_stats;
  acc_t* stats;
  scalar_t* row_losses;  // nullptr unless reduction='none'
};

// Finishes row `row` from its merged scan (valid rows) and stores its statistics and loss: zeros for ignored
// and invalid rows (the backward does not read them), a NaN loss for an invalid one. Adds to `sums`.
template <typename scalar_t>
__device__ __forceinline__ RowLoss<acc_type<scalar_t>> finish_and_store_row(const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                                             TargetKind kind, const RowScan<acc_type<scalar_t>>& scan,
                                                             int64_t y, acc_type<scalar_t> target_logit, int64_t row,
                                                             const ForwardRowOutputs<scalar_t>& out,
                                                             acc_type<scalar_t> (&sums)[2]) {
  using acc_t = acc_type<scalar_t>;
  RowLoss<acc_t> result{};
  acc_t row_loss = 0;
  if (kind == TargetKind::Valid) {
    result = finish_row(cfg, scan, y, target_logit);
    row_loss = result.loss();
    sums[1] += class_weight_of(cfg, y);
  } else if (kind == TargetKind::Invalid) {
    row_loss = std::numeric_limits<acc_t>::quiet_NaN();  // never a silent number for a bad label
  }
  store_row_stats(out.stats + row * out.num_stats, out.num_stats, result);
  sums[0] += row_loss;
  if (out.row_losses != nullptr) out.row_losses[row] = static_cast<scalar_t>(row_loss);
  return result;
}

// d loss / d z_j = p_j (A + B (W[y, j] - F)) - D w_j - [j == y] E for one element (GradientCoefficients);
// the B and D terms only with extra terms (they are 0 otherwise), each one FMA: B (W[y, j] - F) where `extra`
// has the cost row (B != 0), D w_j always (D is 0 without smoothing, w_j 1 without class weights). Both
// gradient schedules call this, so they round alike.
template <typename ExtraTerms, typename acc_t>
__device__ __forceinline__ acc_t gradient_element(const GradientCoefficients<acc_t>& k, const ExtraTerms& extra,
                                                  acc_t z, int j, int target) {
  const acc_t prob = fast_exp((z - k.max) - k.log_sum);
  acc_t g;
  if constexpr (ExtraTerms::kAny) {
    const ExtraTermOperands<acc_t> op = extra.operands(j);
    g = prob * (ExtraTerms::kCostRow ? std::fma(k.b, op.cost - k.cost_factor, k.a) : k.a);
    g = std::fma(-k.d, op.weight, g);
  } else {
    g = prob * k.a;
  }
  if (j == target) g -= k.e;
  return g;
}

// Calls f with the extra terms a row's gradient reads (with_extra_terms): the cost row when B != 0, the class
// weights when D != 0.
template <bool kExtraTerms, typename acc_t, typename F>
__device__ __forceinline__ void with_gradient_extra_terms(const CrossEntropyConfig<acc_t>& cfg,
                                                          const GradientCoefficients<acc_t>& k, int64_t y,
                                                          const F& f) {
  with_extra_terms<kExtraTerms>(k.b != acc_t(0) ? cfg.cost + y * cfg.num_classes : nullptr,
                                k.d != acc_t(0) ? cfg.class_weight : nullptr, f);
}

// The value every element of a row that is not valid gets: 0 when ignored, NaN for an invalid label.
template <typename acc_t>
__device__ acc_t not_valid_row_gradient(TargetKind kind) {
  return kind == TargetKind::Ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
}

// The lanes of a group write one row's gradient, d loss / d z for `scale` (grad_loss, over the total weight for
// 'mean') from the row's statistics. `vectorized`: the input and the output rows are both vectorizable.
template <typename scalar_t, int Group, bool kExtraTerms>
__device__ __forceinline__ void store_row_gradient(const CrossEntropyConfig<acc_type<scalar_t>>& cfg, TargetKind kind, int64_t y,
                                   const acc_type<scalar_t>* row_stats, int num_stats, acc_type<scalar_t> scale,
                                   const scalar_t* __restrict__ in_row, int64_t in_class_stride,
                                   scalar_t* __restrict__ out_row, int64_t out_class_stride, bool vectorized,
                                   int lane) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  const int C = static_cast<int>(cfg.num_classes);
  if (kind != TargetKind::Valid) {
    const scalar_t fill = static_cast<scalar_t>(not_valid_row_gradient<acc_t>(kind));
    for (int j = lane; j < C; j += Group) out_row[j * out_class_stride] = fill;
    return;
  }
  const auto k = make_gradient_coefficients(cfg, row_stats, num_stats, y, scale);
  const int target = static_cast<int>(y);
  with_gradient_extra_terms<kExtraTerms>(cfg, k, y, [&](const auto& extra) {
    if (vectorized) {
      for (int v = lane; v < C / vec; v += Group) {
        auto pack = load_pack(in_row + v * vec);
#pragma unroll
        for (int i = 0; i < vec; ++i) {
          pack.values[i] = static_cast<scalar_t>(
              gradient_element(k, extra, static_cast<acc_t>(pack.values[i]), v * vec + i, target));
        }
        store_pack(out_row + v * vec, pack);
      }
    } else {
      for (int j = lane; j < C; j += Group) {
        const acc_t z = static_cast<acc_t>(in_row[j * in_class_stride]);
        out_row[j * out_class_stride] = static_cast<scalar_t>(gradient_element(k, extra, z, j, target));
      }
    }
  });
}

// Where the forward that also writes the gradient (for grad_loss = 1) puts it.
template <typename scalar_t>
struct ForwardGradientArgs {
  scalar_t* out = nullptr;  // contiguous, the input's shape
  RowLayout layout{};       // of out
  bool vectorized = false;  // the input and the output rows are both vectorizable
  bool mean = false;
  const acc_type<scalar_t>* total_weight = nullptr;  // 'mean': written by target_weight_kernel, read on the device
};

// The backward's scale for grad_loss = 1 (the total weight is only read for 'mean').
template <typename scalar_t>
__device__ acc_type<scalar_t> unit_gradient_scale(const ForwardGradientArgs<scalar_t>& gradient) {
  using acc_t = acc_type<scalar_t>;
  return reduced_gradient_scale(acc_t(1), gradient.mean, gradient.mean ? *gradient.total_weight : acc_t(1));
}

// The pre-pass of the forward that writes the gradient of 'mean' (launch_total_weight): the class weights of the
// valid targets, added as a forward of `Group` lanes per row adds them (its sums[1]: a row's lane 0 counts it;
// the tile kernels count as Group = 1), so that launch_reduce_partials turns the partials into bitwise the total
// weight the forward outputs.
template <int Group, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    target_weight_kernel(const int64_t* __restrict__ target, int64_t num_rows, CrossEntropyConfig<acc_t> cfg,
                         acc_t* __restrict__ partials) {
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  acc_t weight[1] = {0};
  if (threadIdx.x % Group == 0) {
    // Unrolled for loads in flight; the additions keep their order.
#pragma unroll 4
    for (int64_t row = int64_t(blockIdx.x) * kRowsPerIteration + threadIdx.x / Group; row < num_rows;
         row += int64_t(gridDim.x) * kRowsPerIteration) {
      const int64_t y = target[row];
      if (classify_target(y, cfg.num_classes, cfg.ignore_index) == TargetKind::Valid) {
        weight[0] += class_weight_of(cfg, y);
      }
    }
  }
  store_block_partials<acc_t, 1>(weight, partials);
}

template <typename scalar_t, int Group, bool kWriteGradient, bool kExtraTerms>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM<scalar_t>)
    forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, RowLayout layout,
                   int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> call_cfg, RowAccess access,
                   ForwardRowOutputs<scalar_t> outputs, acc_type<scalar_t>* __restrict__ partials,
                   ForwardGradientArgs<scalar_t> gradient) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = specialized<kExtraTerms>(call_cfg);
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  const int lane = threadIdx.x % Group;
  const int64_t C = cfg.num_classes;
  const bool want_argmax = cfg.cost != nullptr && cfg.mode == CostMode::Argmax;
  acc_t sums[2] = {0, 0};  // loss, class weight of the counted rows
  const acc_t gradient_scale = kWriteGradient ? unit_gradient_scale(gradient) : acc_t(0);
  // Every thread runs the same number of iterations, so the group shuffles below never diverge.
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerIteration; first < num_rows;
       first += int64_t(gridDim.x) * kRowsPerIteration) {
    const int64_t row = first + threadIdx.x / Group;
    const bool in_range = row < num_rows;
    const int64_t y = in_range ? target[row] : cfg.ignore_index;
    const TargetKind kind = classify_target(y, C, cfg.ignore_index);
    const scalar_t* row_ptr = input + (in_range ? layout.row_offset(row) : 0);
    RowScan<acc_t> scan;
    if (kind == TargetKind::Valid) {
      scan = scan_lane<scalar_t, Group, kExtraTerms>(cfg, row_ptr, layout.class_stride, access, y, want_argmax, lane);
    }
    merge_finite_group<Group, kExtraTerms>(scan, want_argmax);
    // A NaN, +inf or an all -inf row: the warp scans its rows again element by element (rare; uniform in the
    // warp).
    const bool rescan = kind == TargetKind::Valid && !scan_is_finite(scan);
    if (__any_sync(kFullWarp, rescan)) {
      RowScan<acc_t> exact;
      if (rescan) exact = exact_scan(cfg, row_ptr, layout.class_stride, lane, Group, y);
      merge_group<Group>(exact);
      if (rescan) scan = exact;
    }
    RowLoss<acc_t> result{};
    if (lane == 0 && in_range) {
      const acc_t target_logit = kind == TargetKind::Valid ? static_cast<acc_t>(row_ptr[y * layout.class_stride]) : 0;
      result = finish_and_store_row(cfg, kind, scan, y, target_logit, row, outputs, sums);
    }
    if constexpr (kWriteGradient) {
      // The group's second sweep over the row (in L1/L2), from the statistics the backward would read.
      acc_t row_stats[kMaxRowStats];
      store_row_stats(row_stats, outputs.num_stats, broadcast_row_loss<Group>(result));
      if (in_range) {
        store_row_gradient<scalar_t, Group, kExtraTerms>(
            cfg, kind, y, row_stats, outputs.num_stats, gradient_scale, row_ptr, layout.class_stride,
            gradient.out + gradient.layout.row_offset(row), gradient.layout.class_stride, gradient.vectorized, lane);
      }
    }
  }
  store_block_partials<acc_t, 2>(sums, partials);
}

// ------------------------------------------------------------------------------------------ block-per-row kernels

// Rows of more than kWarpRowMaxPacks 16-byte packs (C > 4096 in bf16, 2048 in fp32: vocabulary-size rows) take a
// block each (block_row_forward_kernel); at most that many, a lane of a warp reads at most 16 packs.
constexpr int kWarpRowMaxPacks = 16 * kWarpSize;
// Groups of a thread's copies of a row into shared memory: the scan starts when the first has arrived.
constexpr int kStagedCopyGroups = 2;
// Packs a thread of a block row loads into registers before it uses them (loads in flight), where the row is
// not staged in shared memory: 4, or 2 in the kernels with the extra terms (4 spilled there in bf16).
template <bool kExtraTerms>
constexpr int kBlockRowUnroll = kExtraTerms ? 2 : 4;

// Calls f(pack, v) for the thread's packs v = first, first + kBlockThreads, ... below `packs` of a row read by
// the whole block, loading kUnroll of them before it uses them (loads in flight).
template <int kUnroll, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_pack_batched(const scalar_t* __restrict__ row, int first, int packs,
                                                      const F& f) {
  constexpr int vec = kVecSize<scalar_t>;
  for (int v = first; v < packs; v += kUnroll * kBlockThreads) {
    Pack<scalar_t, vec> batch[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kBlockThreads < packs) batch[u] = load_pack(row + (v + u * kBlockThreads) * vec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kBlockThreads < packs) f(batch[u], v + u * kBlockThreads);
    }
  }
}

// Merges the block's warp results (each the same in every lane of its warp) in warp order, as
// merge(total, warp_result), and returns the total in every thread. Every thread of the block must call it.
template <typename T, typename Merge>
__device__ T merge_warp_results(const T& warp_result, const Merge& merge) {
  constexpr int kWarps = kBlockThreads / kWarpSize;
  __shared__ SharedSlot<T> slots[kWarps];
  T* results = reinterpret_cast<T*>(slots);
  if (threadIdx.x % kWarpSize == 0) results[threadIdx.x / kWarpSize] = warp_result;
  __syncthreads();
  T total = results[0];
  for (int warp = 1; warp < kWarps; ++warp) merge(total, results[warp]);
  __syncthreads();  // slots are reused by the next call
  return total;
}

// The thread's packs v = threadIdx.x, + kBlockThreads, ... of a row read by the whole block, scanned as scan_lane
// scans a lane's packs. With kStage the packs below staged_packs are first copied to shared memory (staged[v]),
// all issued at once, without registers (copy_16_bytes_async: the whole staged row in flight, where a block is
// the only one its SM holds), and scanned there group by group as they arrive; the gradient sweep reads them
// again there. The rest are loaded kBlockRowUnroll at a time. Either way the packs are added in the same order,
// so the loss has the same bits.
template <typename scalar_t, bool kStage, bool kExtraTerms>
__device__ RowScan<acc_type<scalar_t>> scan_block_row(const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                                      const scalar_t* __restrict__ row, int64_t y, bool want_argmax,
                                                      Pack<scalar_t, kVecSize<scalar_t>>* staged, int staged_packs) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  const int packs = static_cast<int>(cfg.num_classes / vec);
  // The thread's staged packs are v = threadIdx.x + i kBlockThreads, i < staged_count, copied in
  // kStagedCopyGroups groups of consecutive i, so that the scan of the first group overlaps the rest's copies.
  const int staged_count =
      kStage && int(threadIdx.x) < staged_packs ? (staged_packs - int(threadIdx.x) - 1) / kBlockThreads + 1 : 0;
  const int group_size = (staged_count + kStagedCopyGroups - 1) / kStagedCopyGroups;
  const auto staged_pack = [&](int i) { return int(threadIdx.x) + i * kBlockThreads; };
  if constexpr (kStage) {
#pragma unroll
    for (int group = 0; group < kStagedCopyGroups; ++group) {
      for (int i = group * group_size; i < std::min(staged_count, (group + 1) * group_size); ++i) {
        copy_16_bytes_async(&staged[staged_pack(i)], row + staged_pack(i) * vec);
      }
      commit_async_copies();
    }
  }
  const ExtraTermInputs<acc_t> inputs = extra_term_inputs(cfg, y);
  LaneScan<acc_t, kExtraTerms> lane_scan;
  lane_scan.set_logit_shift(row + y);
  with_extra_terms<kExtraTerms>(inputs.cost_row, inputs.smoothing ? inputs.class_weight : nullptr,
                                [&](const auto& extra) {
    const auto add_pack = [&](Pack<scalar_t, vec> pack, int v) {  // a copy: one 16-byte load from shared memory
      acc_t values[vec];
#pragma unroll
      for (int i = 0; i < vec; ++i) values[i] = static_cast<acc_t>(pack.values[i]);
      lane_scan.add_unit(values, v * vec, v, extra);
    };
    if constexpr (kStage) {
#pragma unroll
      for (int group = 0; group < kStagedCopyGroups; ++group) {
        wait_for_async_copies(kStagedCopyGroups - 1 - group);
        for (int i = group * group_size; i < std::min(staged_count, (group + 1) * group_size); ++i) {
          add_pack(staged[staged_pack(i)], staged_pack(i));
        }
      }
    }
    for_each_pack_batched<kBlockRowUnroll<kExtraTerms>>(row, staged_pack(staged_count), packs, add_pack);
  });
  RowScan<acc_t> scan = lane_scan.row_scan();
  if (want_argmax && lane_scan.max_unit >= 0) {
    const int unit_first = lane_scan.max_unit * vec;
    set_argmax(scan, unit_first + first_index_of(row + unit_first, 1, vec, lane_scan.max));
  }
  return scan;
}

// The block writes its row's gradient (as store_row_gradient, vectorized): the packs each thread staged from
// shared memory, the rest of a row longer than the shared memory holds read again, kBlockRowUnroll at a time.
template <typename scalar_t, bool kExtraTerms>
__device__ void store_block_row_gradient(const CrossEntropyConfig<acc_type<scalar_t>>& cfg, TargetKind kind,
                                         int64_t y, const acc_type<scalar_t>* row_stats, int num_stats,
                                         acc_type<scalar_t> scale, const scalar_t* __restrict__ in_row,
                                         scalar_t* __restrict__ out_row,
                                         const Pack<scalar_t, kVecSize<scalar_t>>* staged, int staged_packs) {
  using acc_t = acc_type<scalar_t>;
  constexpr int vec = kVecSize<scalar_t>;
  const int C = static_cast<int>(cfg.num_classes);
  const int packs = C / vec;
  if (kind != TargetKind::Valid) {  // ignored (padding) rows are common: 16-byte stores
    Pack<scalar_t, vec> fill;
#pragma unroll
    for (int i = 0; i < vec; ++i) fill.values[i] = static_cast<scalar_t>(not_valid_row_gradient<acc_t>(kind));
    for (int v = threadIdx.x; v < packs; v += kBlockThreads) store_pack(out_row + v * vec, fill);
    return;
  }
  const auto k = make_gradient_coefficients(cfg, row_stats, num_stats, y, scale);
  const int target = static_cast<int>(y);
  with_gradient_extra_terms<kExtraTerms>(cfg, k, y, [&](const auto& extra) {
    const auto store_gradient = [&](Pack<scalar_t, vec> pack, int v) {
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        pack.values[i] = static_cast<scalar_t>(
            gradient_element(k, extra, static_cast<acc_t>(pack.values[i]), v * vec + i, target));
      }
      store_pack(out_row + v * vec, pack);
    };
    int v = threadIdx.x;
    for (; v < staged_packs; v += kBlockThreads) store_gradient(staged[v], v);
    for_each_pack_batched<kBlockRowUnroll<kExtraTerms>>(in_row, v, packs, store_gradient);
  });
}

// The forward of rows of more than kWarpRowMaxPacks packs, a block per row (vectorizable rows only). With a warp
// per row, the second read of such rows (the gradient sweep after the scan) went to DRAM: the rows all the SMs'
// warps swept at once did not fit the L2 (the H200 profile read 6.3 GB at C = 128256 in bf16, where the schedule
// counts 4.2). Here, with the gradient, each thread copies its packs of the row into the block's dynamic shared
// memory (`staged_packs` of them: up to the device's per-block limit less the static shared memory, about 226 KB
// on an H100, C ~ 115900 in bf16), scans them there and writes their gradient from there; only the rest of a
// longer row is read again, while the block's row is the only one its SM holds. A thread stages and reads back
// only its own packs, so the staging needs no barrier. The block's rows and its per-block sums are those of a
// forward_kernel with Group = kBlockThreads (target_weight_kernel mirrors them); the lanes' merge is
// merge_finite_group within each warp, then the warps in order.
template <typename scalar_t, bool kWriteGradient, bool kExtraTerms>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM<scalar_t>)
    block_row_forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target,
                             RowLayout layout, int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> call_cfg,
                             int staged_packs, ForwardRowOutputs<scalar_t> outputs,
                             acc_type<scalar_t>* __restrict__ partials, ForwardGradientArgs<scalar_t> gradient) {
  using acc_t = acc_type<scalar_t>;
  using PackT = Pack<scalar_t, kVecSize<scalar_t>>;
  const CrossEntropyConfig<acc_t> cfg = specialized<kExtraTerms>(call_cfg);
  const bool want_argmax = cfg.cost != nullptr && cfg.mode == CostMode::Argmax;
  PackT* staged = kWriteGradient ? dynamic_shared_memory<PackT>() : nullptr;
  acc_t sums[2] = {0, 0};  // loss, class weight of the counted rows (thread 0's)
  const acc_t gradient_scale = kWriteGradient ? unit_gradient_scale(gradient) : acc_t(0);
  const auto merge_fast = [&](RowScan<acc_t>& total, const RowScan<acc_t>& warp_scan) {
    int best_index = static_cast<int>(total.best_index);
    merge_finite<kExtraTerms>(total, best_index, warp_scan, static_cast<int>(warp_scan.best_index), want_argmax);
    total.best_index = best_index;
    total.best_value = total.max;
  };
  const auto merge_exact = [](RowScan<acc_t>& total, const RowScan<acc_t>& warp_scan) { total.merge(warp_scan); };
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t y = target[row];
    const TargetKind kind = classify_target(y, cfg.num_classes, cfg.ignore_index);
    const scalar_t* row_ptr = input + layout.row_offset(row);
    RowScan<acc_t> scan;
    if (kind == TargetKind::Valid) {
      scan = scan_block_row<scalar_t, kWriteGradient, kExtraTerms>(cfg, row_ptr, y, want_argmax, staged, staged_packs);
    }
    merge_finite_group<kWarpSize, kExtraTerms>(scan, want_argmax);
    scan = merge_warp_results(scan, merge_fast);
    // A NaN, +inf or an all -inf row (the same decision in every thread): scanned again element by element.
    if (kind == TargetKind::Valid && !scan_is_finite(scan)) {
      RowScan<acc_t> exact = exact_scan(cfg, row_ptr, 1, threadIdx.x, kBlockThreads, y);
      merge_group<kWarpSize>(exact);
      scan = merge_warp_results(exact, merge_exact);
    }
    RowLoss<acc_t> result{};
    if (threadIdx.x == 0) {
      const acc_t target_logit = kind == TargetKind::Valid ? static_cast<acc_t>(row_ptr[y]) : acc_t(0);
      result = finish_and_store_row(cfg, kind, scan, y, target_logit, row, outputs, sums);
    }
    if constexpr (kWriteGradient) {
      acc_t row_stats[kMaxRowStats];
      store_row_stats(row_stats, outputs.num_stats, broadcast_from_first_thread(result));
      scalar_t* out_row = gradient.out + gradient.layout.row_offset(row);
      if (gradient.vectorized) {
        store_block_row_gradient<scalar_t, kExtraTerms>(cfg, kind, y, row_stats, outputs.num_stats, gradient_scale,
                                                        row_ptr, out_row, staged, staged_packs);
      } else {  // a gradient tensor that is not 16-byte aligned (not from the caching allocator)
        store_row_gradient<scalar_t, kBlockThreads, kExtraTerms>(cfg, kind, y, row_stats, outputs.num_stats,
                                                                 gradient_scale, row_ptr, 1, out_row,
                                                                 gradient.layout.class_stride, false, threadIdx.x);
      }
    }
  }
  store_block_partials<acc_t, 2>(sums, partials);
}

// ------------------------------------------------------------------------------------------------ tile kernels

// 16 bytes moved as they are, whatever the element type (4 words: 128-bit loads and stores).
struct alignas(16) Chunk16 {
  uint32_t words[4];
};
constexpr int kTileChunks = kTileRows * kTileRowBytes / 16 + 1;  // one more for the placement

// Copies `count` elements with the whole block (no barrier): 16-byte accesses where `dst` and `src` have the
// same address modulo 16 (a head and a tail element by element), else element by element; both coalesced.
template <typename scalar_t>
__device__ void block_copy(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int count) {
  constexpr int vec = kVecSize<scalar_t>;
  const auto address = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  const bool same_phase = (address(dst) - address(src)) % 16 == 0;
  const int to_boundary = static_cast<int>((16 - address(src) % 16) % 16 / sizeof(scalar_t));
  const int head = same_phase && to_boundary < count ? to_boundary : count;
  const int packs = (count - head) / vec;
  const int tail = head + packs * vec;
  for (int i = threadIdx.x; i < head; i += kBlockThreads) dst[i] = src[i];
  const auto* src_chunks = reinterpret_cast<const Chunk16*>(src + head);
  auto* dst_chunks = reinterpret_cast<Chunk16*>(dst + head);
  for (int v = threadIdx.x; v < packs; v += kBlockThreads) dst_chunks[v] = src_chunks[v];
  for (int i = tail + threadIdx.x; i < count; i += kBlockThreads) dst[i] = src[i];
}

// The block's shared-memory tile of kTileRows rows, placed at the address of `global_rows` modulo 16 so that
// block_copy moves it with 16-byte accesses.

template <typename scalar_t>
__device__ scalar_t* tile_for(Chunk16* storage, const scalar_t* global_rows) {
  return reinterpret_cast<scalar_t*>(reinterpret_cast<unsigned char*>(storage) +
                                     reinterpret_cast<uintptr_t>(global_rows) % 16);
}

// The tile kernels' extra-term operands: every (target, class) pair of the call staged in shared memory once
// per block (C <= kTileRowBytes / sizeof(scalar_t): at most 32 x 32 pairs, 8 KB), so that the tile's row loops
// read one pair per element without branches: W[y, j] in expected mode (else 0: with B = F = 0 the gradient's
// cost term adds exactly 0) and w_j with smoothing (else 1; D is 0 then).
template <typename acc_t>
struct StagedExtraTerms {
  static constexpr bool kAny = true, kCostRow = true, kClassWeights = true;
  const ExtraTermOperands<acc_t>* row;  // the target's C pairs
  __device__ ExtraTermOperands<acc_t> operands(int j) const { return row[j]; }
};

// Stages the pairs (every thread of the block calls it; they are read after sweep_tiles' first barrier) and
// returns the table, or nullptr without kExtraTerms.
template <typename scalar_t, bool kExtraTerms>
__device__ const ExtraTermOperands<acc_type<scalar_t>>* stage_extra_terms(const CrossEntropyConfig<acc_type<scalar_t>>& cfg) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (!kExtraTerms) {
    return nullptr;
  } else {
    constexpr int kMaxClasses = kTileRowBytes / sizeof(scalar_t);
    __shared__ ExtraTermOperands<acc_t> staged[kMaxClasses * kMaxClasses];
    const int C = static_cast<int>(cfg.num_classes);
    const bool expected = cfg.cost != nullptr && cfg.mode == CostMode::Expected;
    const bool smoothing = cfg.label_smoothing != acc_t(0);
    for (int i = threadIdx.x; i < C * C; i += kBlockThreads) {
      staged[i] = {expected ? cfg.cost[i] : acc_t(0), smoothing ? class_weight_of(cfg, i % C) : acc_t(1)};
    }
    return staged;
  }
}

// The extra terms of a tile row with target y: its staged pairs, or none.
template <bool kExtraTerms, typename acc_t>
__device__ auto tile_extra_terms(const ExtraTermOperands<acc_t>* staged, int64_t y, int num_classes) {
  if constexpr (kExtraTerms) {
    return StagedExtraTerms<acc_t>{staged + y * num_classes};
  } else {
    return NoExtraTerms{};
  }
}

// The scan of one row in shared memory: its max and first argmax (strictly larger values only: ties keep the
// first index, a NaN never wins), then the exponentials. A row that is not finite is scanned again exactly,
// from `global_row` (the same values).
template <typename scalar_t, bool kExtraTerms, typename ExtraTerms>
__device__ RowScan<acc_type<scalar_t>> scan_tile_row(const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                                                     const scalar_t* z, const scalar_t* global_row, int64_t y,
                                                     const ExtraTerms& extra) {
  using acc_t = acc_type<scalar_t>;
  const int C = static_cast<int>(cfg.num_classes);
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  int first_of_max = 0;
#pragma unroll 4
  for (int j = 0; j < C; ++j) {
    const acc_t value = static_cast<acc_t>(z[j]);
    first_of_max = value > row_max ? j : first_of_max;
    row_max = larger(row_max, value);
  }
  LaneScan<acc_t, kExtraTerms> lane_scan;
  lane_scan.set_logit_shift(z + y);
  lane_scan.raise_max(row_max, 0);
#pragma unroll 4
  for (int j = 0; j < C; ++j) {
    const acc_t values[1] = {static_cast<acc_t>(z[j])};
    lane_scan.accumulate(values, j, extra);
  }
  RowScan<acc_t> scan = lane_scan.row_scan();
  if (!scan_is_finite(scan)) return exact_scan(cfg, global_row, 1, 0, 1, y);
  set_argmax(scan, first_of_max);
  return scan;
}

// One thread writes the gradient of its tile row in place (z becomes d loss / d z).
template <typename scalar_t, typename ExtraTerms>
__device__ __forceinline__ void tile_row_gradient(const CrossEntropyConfig<acc_type<scalar_t>>& cfg, TargetKind kind, int64_t y,
                                  const acc_type<scalar_t>* row_stats, int num_stats, acc_type<scalar_t> scale,
                                  const ExtraTerms& extra, scalar_t* z) {
  using acc_t = acc_type<scalar_t>;
  const int C = static_cast<int>(cfg.num_classes);
  if (kind != TargetKind::Valid) {
    const scalar_t fill = static_cast<scalar_t>(not_valid_row_gradient<acc_t>(kind));
    for (int j = 0; j < C; ++j) z[j] = fill;
    return;
  }
  const auto k = make_gradient_coefficients(cfg, row_stats, num_stats, y, scale);
#pragma unroll 4
  for (int j = 0; j < C; ++j) {
    z[j] = static_cast<scalar_t>(gradient_element(k, extra, static_cast<acc_t>(z[j]), j, static_cast<int>(y)));
  }
}

// The block's sweep over rows back to back of at most kTileRowBytes: for each kTileRows rows, copies them into
// the shared-memory tile, calls row_work(row, tile_row, global_row) in each thread that has a row, then
// tile_done(first_row, tile, elements) in every thread. Every thread of the block must call it.
template <typename scalar_t, typename RowWork, typename TileDone>
__device__ __forceinline__ void sweep_tiles(const scalar_t* __restrict__ input, int64_t num_rows, int num_classes,
                            const RowWork& row_work, const TileDone& tile_done) {
  __shared__ Chunk16 tile_storage[kTileChunks];
  for (int64_t first = int64_t(blockIdx.x) * kTileRows; first < num_rows; first += int64_t(gridDim.x) * kTileRows) {
    const int rows = static_cast<int>(num_rows - first < kTileRows ? num_rows - first : kTileRows);
    const scalar_t* rows_in = input + first * num_classes;
    scalar_t* tile = tile_for(tile_storage, rows_in);
    block_copy(tile, rows_in, rows * num_classes);
    __syncthreads();
    if (threadIdx.x < rows) {
      row_work(first + threadIdx.x, tile + threadIdx.x * num_classes, rows_in + threadIdx.x * num_classes);
    }
    tile_done(first, tile, rows * num_classes);
    __syncthreads();  // the tile is read before the next rows overwrite it
  }
}

// One row per thread, scanned in the tile; with kWriteGradient its gradient is formed there and copied out.
template <typename scalar_t, bool kWriteGradient, bool kExtraTerms>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM<scalar_t>)
    tile_forward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, int64_t num_rows,
                        CrossEntropyConfig<acc_type<scalar_t>> call_cfg, ForwardRowOutputs<scalar_t> outputs,
                        acc_type<scalar_t>* __restrict__ partials, ForwardGradientArgs<scalar_t> gradient) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = specialized<kExtraTerms>(call_cfg);
  const int C = static_cast<int>(cfg.num_classes);
  acc_t sums[2] = {0, 0};  // loss, class weight of the counted rows
  const acc_t gradient_scale = kWriteGradient ? unit_gradient_scale(gradient) : acc_t(0);
  const ExtraTermOperands<acc_t>* staged = stage_extra_terms<scalar_t, kExtraTerms>(cfg);
  const auto row_work = [&](int64_t row, scalar_t* z, const scalar_t* global_row) {
    const int64_t y = target[row];
    const TargetKind kind = classify_target(y, C, cfg.ignore_index);
    const auto extra = tile_extra_terms<kExtraTerms>(staged, kind == TargetKind::Valid ? y : 0, C);
    RowScan<acc_t> scan;
    if (kind == TargetKind::Valid) scan = scan_tile_row<scalar_t, kExtraTerms>(cfg, z, global_row, y, extra);
    const acc_t target_logit = kind == TargetKind::Valid ? static_cast<acc_t>(z[y]) : acc_t(0);
    const RowLoss<acc_t> result = finish_and_store_row(cfg, kind, scan, y, target_logit, row, outputs, sums);
    if constexpr (kWriteGradient) {
      acc_t row_stats[kMaxRowStats];
      store_row_stats(row_stats, outputs.num_stats, result);
      tile_row_gradient<scalar_t>(cfg, kind, y, row_stats, outputs.num_stats, gradient_scale, extra, z);
    }
  };
  const auto tile_done = [&](int64_t first, const scalar_t* tile, int elements) {
    if constexpr (kWriteGradient) {
      __syncthreads();
      block_copy(gradient.out + first * C, tile, elements);
    }
  };
  sweep_tiles(input, num_rows, C, row_work, tile_done);
  store_block_partials<acc_t, 2>(sums, partials);
}

// ------------------------------------------------------------------------------------------------ backward

// What the backward needs besides the rows: the statistics and the upstream gradient.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  int num_stats;
  const acc_t* stats;
  const scalar_t* grad_loss;
  Reduction reduction;
  const acc_t* total_weight;
  bool skip_unit_grad_loss;  // in place: nothing to do when grad_loss is 1

  // Whether the forward's gradient stands (every thread returns).
  __device__ bool nothing_to_do() const {
    return skip_unit_grad_loss && static_cast<acc_t>(grad_loss[0]) == acc_t(1);
  }
  __device__ acc_t uniform_scale() const {
    return reduction == Reduction::None
               ? acc_t(0)
               : reduced_gradient_scale(static_cast<acc_t>(grad_loss[0]), reduction == Reduction::Mean, *total_weight);
  }
  __device__ acc_t row_scale(int64_t row, acc_t uniform) const {
    return reduction == Reduction::None ? static_cast<acc_t>(grad_loss[row]) : uniform;
  }
};

template <typename scalar_t, int Group, bool kExtraTerms>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM<scalar_t>)
    backward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, RowLayout layout,
                    RowLayout grad_layout, int64_t num_rows, CrossEntropyConfig<acc_type<scalar_t>> call_cfg,
                    bool vectorized, BackwardArgs<scalar_t> args, scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = specialized<kExtraTerms>(call_cfg);
  constexpr int kRowsPerIteration = kBlockThreads / Group;
  if (args.nothing_to_do()) return;
  const int lane = threadIdx.x % Group;
  const acc_t uniform_scale = args.uniform_scale();
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerIteration + threadIdx.x / Group; row < num_rows;
       row += int64_t(gridDim.x) * kRowsPerIteration) {
    const int64_t y = target[row];
    const TargetKind kind = classify_target(y, cfg.num_classes, cfg.ignore_index);
    store_row_gradient<scalar_t, Group, kExtraTerms>(
        cfg, kind, y, args.stats + row * args.num_stats, args.num_stats, args.row_scale(row, uniform_scale),
        input + layout.row_offset(row), layout.class_stride, grad + grad_layout.row_offset(row),
        grad_layout.class_stride, vectorized, lane);
  }
}

template <typename scalar_t, bool kExtraTerms>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM<scalar_t>)
    tile_backward_kernel(const scalar_t* __restrict__ input, const int64_t* __restrict__ target, int64_t num_rows,
                         CrossEntropyConfig<acc_type<scalar_t>> call_cfg, BackwardArgs<scalar_t> args,
                         scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  const CrossEntropyConfig<acc_t> cfg = specialized<kExtraTerms>(call_cfg);
  if (args.nothing_to_do()) return;
  const int C = static_cast<int>(cfg.num_classes);
  const acc_t uniform_scale = args.uniform_scale();
  const ExtraTermOperands<acc_t>* staged = stage_extra_terms<scalar_t, kExtraTerms>(cfg);
  const auto row_work = [&](int64_t row, scalar_t* z, const scalar_t*) {
    const int64_t y = target[row];
    const TargetKind kind = classify_target(y, C, cfg.ignore_index);
    tile_row_gradient<scalar_t>(cfg, kind, y, args.stats + row * args.num_stats, args.num_stats,
                                args.row_scale(row, uniform_scale),
                                tile_extra_terms<kExtraTerms>(staged, kind == TargetKind::Valid ? y : 0, C), z);
  };
  const auto tile_done = [&](int64_t first, const scalar_t* tile, int elements) {
    __syncthreads();
    block_copy(grad + first * C, tile, elements);
  };
  sweep_tiles(input, num_rows, C, row_work, tile_done);
}

// ------------------------------------------------------------------------------------------------ host side

// How the rows of `input` are read, and by how many lanes each.
template <typename scalar_t>
RowAccess row_access(const CrossEntropyProblem& p, bool vectorized) {
  if (rows_fit_tile<scalar_t>(p.layout, p.num_classes)) return RowAccess::Tile;
  return vectorized ? RowAccess::Packs : RowAccess::Elements;
}

int lanes_for(const CrossEntropyProblem& p, int vec, bool vectorized) {
  return lanes_per_row(vectorized ? p.num_classes / vec : p.num_classes, p.layout.class_stride != 1);
}

// The forward's lanes per row: lanes_for, or the whole block for vectorizable rows of more than kWarpRowMaxPacks
// packs (block_row_forward_kernel). The backward reads such rows once and keeps a warp per row.
int forward_lanes_for(const CrossEntropyProblem& p, int vec, bool vectorized) {
  return vectorized && p.num_classes / vec > kWarpRowMaxPacks ? kBlockThreads : lanes_for(p, vec, vectorized);
}

template <typename F>
void dispatch_forward_lanes(int lanes, const F& f) {
  if (lanes == kBlockThreads) return f(std::integral_constant<int, kBlockThreads>{});
  dispatch_lanes_per_row(lanes, f);
}

// Whether a forward's total weight is a count that float arithmetic holds exactly in any order of the additions:
// without class weights each valid row adds 1, and every partial sum is an integer of at most num_rows.
template <typename acc_t>
bool total_weight_is_exact_count(const CrossEntropyConfig<acc_t>& cfg, int64_t num_rows) {
  return cfg.class_weight == nullptr && num_rows <= (int64_t(1) << std::numeric_limits<acc_t>::digits);
}

// The pre-pass of a 2-pass 'mean' forward (launched with `forward_blocks` blocks of `Group` lanes per row): writes
// total_weight for the forward's gradient, which the forward's final reduce writes again with the same bits. An
// exact count (total_weight_is_exact_count) is added in any order: one lane per row over at most one wave of
// blocks (the forward's grid at 16 or 32 lanes ran 8-16 rows per 256-thread block; 27 us for 262144 rows on the
// H200). Class weights are added as the forward adds them.
template <int Group, typename acc_t>
void launch_total_weight(const CrossEntropyConfig<acc_t>& cfg, const int64_t* targets, int64_t num_rows,
                         int64_t forward_blocks, at::Tensor& total_weight, cudaStream_t stream) {
  const bool exact = total_weight_is_exact_count(cfg, num_rows);
  const auto kernel = exact ? target_weight_kernel<1, acc_t> : target_weight_kernel<Group, acc_t>;
  const int64_t blocks = exact ? map_grid_size(kernel, num_rows, kBlockThreads) : forward_blocks;
  at::Tensor partials = at::empty({blocks}, total_weight.options());
  launch_kernel(kernel, blocks, stream, targets, num_rows, cfg, partials.data_ptr<acc_t>());
  launch_reduce_partials<acc_t, 1>(partials.const_data_ptr<acc_t>(), blocks,
                                   StoreTotalEpilogue<acc_t>{total_weight.data_ptr<acc_t>()}, stream);
}

void check_class_count(const CrossEntropyProblem& p) {
  // Indices inside a row are int32 in the kernels, and a lane's index may step a block past the last class.
  TORCH_CHECK_VALUE(p.num_classes <= std::numeric_limits<int>::max() - kBlockThreads,
                    "at most 2^31 - 257 classes on CUDA, got ", p.num_classes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, c10::string_view cost_mode, bool write_gradient) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_class_count(p);
  at::Tensor loss = allocate_loss(p);
  at::Tensor row_stats = allocate_row_stats(p);
  at::Tensor total_weight = at::empty({}, row_stats.options());
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  if (p.num_rows == 0) {
    fill_empty_reduction(loss, total_weight, p.reduction);
    return {loss, row_stats, total_weight, gradient};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cost_sensitive_cross_entropy", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto cfg = make_config<acc_t>(p, ignore_index, label_smoothing);
    const scalar_t* in = p.input.const_data_ptr<scalar_t>();
    const int64_t* targets = p.target.const_data_ptr<int64_t>();
    const bool vectorized = rows_vectorizable<scalar_t>(in, p.layout, p.num_classes);
    const RowAccess access = row_access<scalar_t>(p, vectorized);
    const ForwardRowOutputs<scalar_t> outputs{p.num_stats, row_stats.data_ptr<acc_t>(),
                                              p.reduction == Reduction::None ? loss.data_ptr<scalar_t>() : nullptr};
    ForwardGradientArgs<scalar_t> gradient_args;
    if (write_gradient) {
      gradient_args.out = gradient.data_ptr<scalar_t>();
      gradient_args.layout = contiguous_row_layout(gradient);
      gradient_args.vectorized =
          vectorized && rows_vectorizable<scalar_t>(gradient_args.out, gradient_args.layout, p.num_classes);
      gradient_args.mean = p.reduction == Reduction::Mean;
      gradient_args.total_weight = total_weight.const_data_ptr<acc_t>();
    }
    const int lanes = access == RowAccess::Tile ? 1 : forward_lanes_for(p, kVecSize<scalar_t>, vectorized);
    dispatch_forward_lanes(lanes, [&](auto lanes_tag) {
      constexpr int Group = decltype(lanes_tag)::value;
      const int64_t blocks = grid_size(p.num_rows, kBlockThreads / Group);
      if (gradient_args.mean) {
        launch_total_weight<Group>(cfg, targets, p.num_rows, blocks, total_weight, stream);
      }
      at::Tensor partials = at::empty({blocks, 2}, row_stats.options());
      const auto launch_forward = [&](auto write_gradient_tag, auto extra_terms_tag) {
        constexpr bool kWriteGradient = decltype(write_gradient_tag)::value;
        constexpr bool kExtraTerms = decltype(extra_terms_tag)::value;
        if constexpr (Group == kBlockThreads) {
          using PackT = Pack<scalar_t, kVecSize<scalar_t>>;
          const auto kernel = block_row_forward_kernel<scalar_t, kWriteGradient, kExtraTerms>;
          const int64_t packs = p.num_classes / kVecSize<scalar_t>;
          const int staged_packs = kWriteGradient ? static_cast<int>(std::min<int64_t>(
                                                        packs, max_dynamic_shared_bytes(kernel) / sizeof(PackT)))
                                                  : 0;
          launch_kernel_with_shared_memory(kernel, blocks, staged_packs * sizeof(PackT), stream, in, targets,
                                           p.layout, p.num_rows, cfg, staged_packs, outputs,
                                           partials.data_ptr<acc_t>(), gradient_args);
        } else if (access == RowAccess::Tile) {
          launch_kernel(tile_forward_kernel<scalar_t, kWriteGradient, kExtraTerms>, blocks, stream, in, targets,
                        p.num_rows, cfg, outputs, partials.data_ptr<acc_t>(), gradient_args);
        } else {
          launch_kernel(forward_kernel<scalar_t, Group, kWriteGradient, kExtraTerms>, blocks, stream, in, targets,
                        p.layout, p.num_rows, cfg, access, outputs, partials.data_ptr<acc_t>(), gradient_args);
        }
      };
      dispatch_extra_terms(cfg, [&](auto extra_terms_tag) {
        if (write_gradient) {
          launch_forward(std::true_type{}, extra_terms_tag);
        } else {
          launch_forward(std::false_type{}, extra_terms_tag);
        }
      });
      const ReducedLossEpilogue<scalar_t> epilogue{p.reduction == Reduction::None ? nullptr : loss.data_ptr<scalar_t>(),
                                                   total_weight.data_ptr<acc_t>(), p.reduction == Reduction::Mean};
      launch_reduce_partials<acc_t, 2>(partials.const_data_ptr<acc_t>(), blocks, epilogue, stream);
    });
  });
  return {loss, row_stats, total_weight, gradient};
}

// Writes the gradient for grad_loss into `grad_input` (contiguous, the input's shape); with
// `skip_unit_grad_loss`, nothing when grad_loss is 1 (checked on the device).
void backward_into(const CrossEntropyProblem& p, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                   const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                   bool skip_unit_grad_loss, at::Tensor& grad_input) {
  if (grad_input.numel() == 0) return;
  check_class_count(p);
  const at::Tensor grad = grad_loss.to(p.input.scalar_type()).contiguous();
  const at::Tensor stats = row_stats.contiguous();
  const RowLayout grad_layout = contiguous_row_layout(grad_input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "cost_sensitive_cross_entropy_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto cfg = make_config<acc_t>(p, ignore_index, label_smoothing);
    const scalar_t* in = p.input.const_data_ptr<scalar_t>();
    const int64_t* targets = p.target.const_data_ptr<int64_t>();
    scalar_t* out = grad_input.data_ptr<scalar_t>();
    const bool vectorized = rows_vectorizable<scalar_t>(in, p.layout, p.num_classes) &&
                            rows_vectorizable<scalar_t>(out, grad_layout, p.num_classes);
    const RowAccess access = row_access<scalar_t>(p, vectorized);
    const BackwardArgs<scalar_t> args{p.num_stats, stats.const_data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(),
                                      p.reduction, total_weight.const_data_ptr<acc_t>(), skip_unit_grad_loss};
    const int lanes = access == RowAccess::Tile ? 1 : lanes_for(p, kVecSize<scalar_t>, vectorized);
    dispatch_lanes_per_row(lanes, [&](auto lanes_tag) {
      constexpr int Group = decltype(lanes_tag)::value;
      dispatch_extra_terms(cfg, [&](auto extra_terms_tag) {
        constexpr bool kExtraTerms = decltype(extra_terms_tag)::value;
        if (access == RowAccess::Tile) {
          const auto kernel = tile_backward_kernel<scalar_t, kExtraTerms>;
          launch_kernel(kernel, map_grid_size(kernel, p.num_rows, kTileRows), stream, in, targets, p.num_rows, cfg,
                        args, out);
        } else {
          const auto kernel = backward_kernel<scalar_t, Group, kExtraTerms>;
          launch_kernel(kernel, map_grid_size(kernel, p.num_rows, kBlockThreads / Group), stream, in, targets,
                        p.layout, grad_layout, p.num_rows, cfg, vectorized, args, out);
        }
      });
    });
  });
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& cost_matrix, const std::optional<at::Tensor>& weight,
                         const at::Tensor& row_stats, const at::Tensor& total_weight, int64_t ignore_index,
                         c10::string_view reduction, double label_smoothing, c10::string_view cost_mode) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing,
                /*skip_unit_grad_loss=*/false, grad_input);
  return grad_input;
}

void backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                           const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
                           const std::optional<at::Tensor>& weight, const at::Tensor& row_stats,
                           const at::Tensor& total_weight, int64_t ignore_index, c10::string_view reduction,
                           double label_smoothing, c10::string_view cost_mode) {
  const c10::cuda::CUDAGuard guard(input.device());
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing,
                /*skip_unit_grad_loss=*/true, gradient);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("cost_sensitive_cross_entropy", &forward_cuda);
  m.impl("cost_sensitive_cross_entropy_backward", &backward_cuda);
  m.impl("cost_sensitive_cross_entropy_backward_inplace", &backward_inplace_cuda);
}

}  // namespace fused_losses::cuda
