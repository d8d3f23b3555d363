// CPU kernels of fused_losses::cost_sensitive_cross_entropy.
//
// Rows are processed in parallel (fixed blocks, so the reduction is identical for any thread count).
// Within a block, rows of many classes are vectorised over the classes, one row at a time; rows of few
// classes (C <= kTileMaxClasses) are vectorised over rows: a tile of Vec::size() rows is transposed into C
// vectors, one per class, so every exp and comparison works on Vec::size() rows at once.
//
// Schedules (common.h): the 3-pass backward re-reads each row (or tile) and writes its gradient. With
// write_gradient the forward first sums the class weights of the targets (a deterministic pre-pass over N
// int64, the same blocks and order as the row pass, so the same total weight), then after scanning each row
// (or tile) writes its gradient for grad_loss = 1: the scan keeps exp(z - max) where the gradient is formed
// (the gradient row, or the tile's buffer) and the gradient step rescales it in place, one exp per element.
// The backward recomputes exp(z - max) from the saved max with the same vector code and coefficients: both
// schedules give the same bits.
#include "cost_sensitive_cross_entropy.h"
#include "cpu/cpu_rows.h"
#include "cpu/huge_pages.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace fused_losses::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTileMaxClasses = 32;

[[noreturn]] void throw_invalid_target(int64_t target, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "target contains class index ", target, ", outside [0, ", num_classes,
                    ") and not ignore_index (", ignore_index, ")");
}

// Calls f(j, n) for the vectors of `count` classes: n = Vec::size() but for a last, partial vector.
template <typename Vec, typename F>
inline void for_each_vector(int64_t count, const F& f) {
  int64_t j = 0;
  for (; j + Vec::size() <= count; j += Vec::size()) f(j, int64_t(Vec::size()));
  if (j < count) f(j, count - j);
}

template <typename scalar_t>
class CrossEntropyKernel {
 public:
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kTileRows = Vec::size();

  // `grad` (contiguous, laid out as `grad_layout`) receives the gradient rows; nullptr for a forward without.
  CrossEntropyKernel(const CrossEntropyProblem& p, const CrossEntropyConfig<acc_t>& cfg, scalar_t* grad,
                     const RowLayout& grad_layout)
      : p_(p), cfg_(cfg), C_(p.num_classes), input_(p.input.const_data_ptr<scalar_t>()),
        target_(p.target.const_data_ptr<int64_t>()), grad_(grad), grad_layout_(grad_layout),
        tiled_(p.num_classes <= kTileMaxClasses) {}

  // Rows handled together: a tile for few classes, else one row.
  int64_t rows_per_step() const { return tiled_ ? kTileRows : 1; }

  // Fills scans[k] for the valid rows among [first, first + count) and returns their target logits. Keeps
  // exp(z - max) where the gradient of those rows is formed, for write_gradient.
  void scan_rows(int64_t first, int count, RowScan<acc_t>* scans, acc_t* target_logits) {
    kept_exp_ = false;
    if (C_ == 0) return;  // no class: every row is ignored or invalid, which the caller handles
    load_rows(first, count);
    if (!tiled_) {
      const int64_t y = target_[first];
      if (kind(y) != TargetKind::Valid) return;
      scans[0] = scan_row(row_, y, output_row(first));
      target_logits[0] = row_[y];
      return;
    }
    for (int k = 0; k < count; ++k) {
      const int64_t y = target_[first + k];
      if (kind(y) == TargetKind::Valid) target_logits[k] = tile_[y * kTileRows + k];
    }
    if (scan_tile(first, count, scans, target_logits)) return;
    // NaN or infinities: the element-wise scan, whose edge cases follow F.cross_entropy.
    for (int k = 0; k < count; ++k) {
      const int64_t y = target_[first + k];
      if (kind(y) != TargetKind::Valid) continue;
      const acc_t* cost_row = expected_cost() ? cfg_.cost + y * C_ : nullptr;
      const acc_t shift = smoothing_shift(target_logits[k]);
      for (int64_t j = 0; j < C_; ++j) {
        scans[k].add(tile_[j * kTileRows + k], j, cost_row ? cost_row[j] : acc_t(0), class_weight_of(cfg_, j), shift);
      }
    }
  }

  // Writes the gradient of the rows the last scan_rows read, given each valid row's coefficients.
  void write_gradient(int64_t first, int count, const GradientCoefficients<acc_t>* coefs) {
    if (tiled_) {
      gradient_tile(first, count, coefs);
      return;
    }
    const int64_t y = target_[first];
    acc_t* g = output_row(first);
    if (kind(y) == TargetKind::Valid) {
      const LaneCoefficients k = fold_coefficients(first, 1, coefs);
      if (!kept_exp_) store_exp(row_, k.max[0], g);
      with_gradient_form([&](auto expected, auto smoothing, auto weighted) {
        gradient_row<expected, smoothing, weighted>(g, k, y);
      });
      g[y] -= coefs[0].e;
    } else {
      std::fill(g, g + C_, invalid_row_gradient(y));
    }
    store_row(g, grad_ + grad_layout_.row_offset(first), grad_layout_.class_stride, C_);
  }

  // The backward: writes the gradient rows [first, first + count) given each valid row's coefficients.
  void gradient_rows(int64_t first, int count, const GradientCoefficients<acc_t>* coefs) {
    load_rows(first, count);
    kept_exp_ = false;
    write_gradient(first, count, coefs);
  }

  TargetKind kind(int64_t y) const { return classify_target(y, C_, cfg_.ignore_index); }

 private:
  const scalar_t* row_ptr(int64_t row) const { return input_ + p_.layout.row_offset(row); }

  // Reads rows [first, first + count) as the accumulation type: the tile, or row_ (valid rows only).
  void load_rows(int64_t first, int count) {
    if (tiled_) {
      load_tile(first, count);
    } else if (kind(target_[first]) == TargetKind::Valid) {
      row_ = row_as_acc<acc_t>(row_ptr(first), p_.layout.class_stride, C_, row_buffer_);
    }
  }

  // Where the gradient of `row` (one row of many classes) is formed: the gradient row itself when it is a
  // contiguous acc_t row, else a buffer (also for a forward that writes no gradient).
  acc_t* output_row(int64_t row) {
    if (grad_ == nullptr) {
      out_buffer_.resize(C_);
      return out_buffer_.data();
    }
    return row_output<acc_t>(grad_ + grad_layout_.row_offset(row), grad_layout_.class_stride, C_, out_buffer_);
  }

  // The gradient is written as d loss / d z_j = e_j (A + B (W[y, j] - F)) - D w_j - [j == y] E with
  // e_j = exp(z_j - max): GradientCoefficients with 1 / sum_j e_j = exp(-log_sum) folded into A and B. The
  // forward keeps e_j from its scan, the backward recomputes it from the saved max: one exp per element in
  // either schedule, and the same bits. Here one lane per row of a tile (lane 0 for one row).
  struct LaneCoefficients {
    acc_t max[kTileRows], a[kTileRows], b[kTileRows], cost_factor[kTileRows], d[kTileRows];
  };

  // The coefficients of rows [first, first + count), zero for rows that are not valid; one vector exp folds
  // 1 / sum_j e_j into A and B for the whole tile.
  LaneCoefficients fold_coefficients(int64_t first, int count, const GradientCoefficients<acc_t>* coefs) const {
    LaneCoefficients lanes{};
    acc_t log_sum[kTileRows] = {};
    for (int k = 0; k < count; ++k) {
      if (kind(target_[first + k]) != TargetKind::Valid) continue;
      lanes.max[k] = coefs[k].max;
      log_sum[k] = coefs[k].log_sum;
      lanes.a[k] = coefs[k].a;
      lanes.b[k] = coefs[k].b;
      lanes.cost_factor[k] = coefs[k].cost_factor;
      lanes.d[k] = coefs[k].d;
    }
    const Vec inverse_sum = Vec::loadu(log_sum).neg().exp();
    (Vec::loadu(lanes.a) * inverse_sum).store(lanes.a);
    (Vec::loadu(lanes.b) * inverse_sum).store(lanes.b);
    return lanes;
  }

  bool expected_cost() const { return cfg_.cost != nullptr && cfg_.mode == CostMode::Expected; }
  acc_t invalid_row_gradient(int64_t y) const {
    return kind(y) == TargetKind::Ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  }

  // Calls f(expected, smoothing, weighted) with std::bool_constant flags for the terms of the gradient this
  // call has, so that the element loops are compiled without them and carry no branch.
  template <typename F>
  void with_gradient_form(const F& f) const {
    const auto with_smoothing = [&](auto expected) {
      if (cfg_.label_smoothing == acc_t(0)) return f(expected, std::false_type{}, std::false_type{});
      if (cfg_.class_weight == nullptr) return f(expected, std::true_type{}, std::false_type{});
      return f(expected, std::true_type{}, std::true_type{});
    };
    if (expected_cost()) {
      with_smoothing(std::true_type{});
    } else {
      with_smoothing(std::false_type{});
    }
  }

  // e (A + B (W - F)) - D w: the gradient of an element (or of a lane's row) before its target term.
  template <bool kExpected, bool kSmoothing>
  static Vec gradient_of(Vec e, Vec a, Vec b, Vec cost_factor, Vec d, Vec cost, Vec weight) {
    Vec value = kExpected ? e * (a + b * (cost - cost_factor)) : e * a;
    if constexpr (kSmoothing) value = value - d * weight;
    return value;
  }

  // g_j = exp(z_j - max) over the row; returns sum_j g_j.
  acc_t store_exp(const acc_t* z, acc_t max, acc_t* g) const {
    const Vec shift(max);
    Vec sum(acc_t(0));
    for_each_vector<Vec>(C_, [&](int64_t j, int64_t n) {
      const Vec e = (Vec::loadu(z + j, n) - shift).exp();
      e.store(g + j, n);
      sum = sum + Vec::set(Vec(acc_t(0)), e, n);
    });
    return at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum);
  }

  // One contiguous row of many classes, vectorised over the classes; keeps exp(z - max) in `e`. Rows
  // containing NaN or infinities take the element-wise RowScan, whose edge cases follow F.cross_entropy.
  RowScan<acc_t> scan_row(const acc_t* z, int64_t y, acc_t* e) {
    RowScan<acc_t> scan;
    const acc_t* cost_row = cfg_.cost != nullptr ? cfg_.cost + y * C_ : nullptr;
    const acc_t max = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, z, C_);
    const acc_t shift = smoothing_shift(z[y]);
    if (!std::isfinite(max)) {
      for (int64_t j = 0; j < C_; ++j) {
        scan.add(z[j], j, expected_cost() ? cost_row[j] : acc_t(0), class_weight_of(cfg_, j), shift);
      }
      return scan;
    }
    if (cost_row != nullptr && cfg_.mode == CostMode::Argmax) {
      scan.best_value = max;
      scan.best_index = first_index_of(z, max);
      // finish_row reads this cost entry: a likely cache miss in a large matrix, fetched during the exp pass.
      __builtin_prefetch(cost_row + scan.best_index);
    }
    const auto sum = [](Vec a, Vec b) { return a + b; };
    scan.max = max;
    scan.sum_exp = store_exp(z, max, e);
    kept_exp_ = true;
    if (expected_cost()) {
      scan.cost_exp = at::vec::map2_reduce_all<acc_t>([](Vec x, Vec c) { return x * c; }, sum, e, cost_row, C_);
    }
    if (cfg_.label_smoothing != acc_t(0)) {
      const Vec shift_vec(shift);
      scan.weighted_logit_sum =
          cfg_.class_weight != nullptr
              ? at::vec::map2_reduce_all<acc_t>([&](Vec x, Vec w) { return (x - shift_vec) * w; }, sum, z,
                                                cfg_.class_weight, C_)
              : at::vec::map_reduce_all<acc_t>([&](Vec x) { return x - shift_vec; }, sum, z, C_);
    }
    return scan;
  }

  // First j with z[j] == value (value is present and finite), a vector of classes at a time.
  int64_t first_index_of(const acc_t* z, acc_t value) const {
    const Vec target(value);
    int64_t j = 0;
    for (; j + Vec::size() <= C_; j += Vec::size()) {
      const int not_equal = (Vec::loadu(z + j) == target).zero_mask();
      const int equal = ~not_equal & ((1 << Vec::size()) - 1);
      if (equal != 0) return j + __builtin_ctz(equal);
    }
    while (z[j] != value) ++j;
    return j;
  }

  // g holds exp(z - max) of a valid row: turns it into the gradient but for the target term.
  template <bool kExpected, bool kSmoothing, bool kWeighted>
  void gradient_row(acc_t* g, const LaneCoefficients& k, int64_t y) const {
    const acc_t* cost_row = kExpected ? cfg_.cost + y * C_ : nullptr;
    const Vec a(k.a[0]), b(k.b[0]), cost_factor(k.cost_factor[0]), d(k.d[0]);
    for_each_vector<Vec>(C_, [&](int64_t j, int64_t n) {
      const Vec cost = kExpected ? Vec::loadu(cost_row + j, n) : Vec(acc_t(0));
      const Vec weight = kWeighted ? Vec::loadu(cfg_.class_weight + j, n) : Vec(acc_t(1));
      gradient_of<kExpected, kSmoothing>(Vec::loadu(g + j, n), a, b, cost_factor, d, cost, weight).store(g + j, n);
    });
  }

  // tile_[j * kTileRows + k] = z[first + k][j]; rows past `count` are zero.
  void load_tile(int64_t first, int count) {
    tile_.resize(C_ * kTileRows);
    for (int k = 0; k < kTileRows; ++k) {
      if (k < count) {
        const scalar_t* row = row_ptr(first + k);
        for (int64_t j = 0; j < C_; ++j) tile_[j * kTileRows + k] = static_cast<acc_t>(row[j * p_.layout.class_stride]);
      } else {
        for (int64_t j = 0; j < C_; ++j) tile_[j * kTileRows + k] = acc_t(0);
      }
    }
  }

  // cost_tile_[j * kTileRows + k] = cost[y_k, j] (zero for rows that are not valid).
  void load_cost_tile(int64_t first, int count) {
    cost_tile_.assign(C_ * kTileRows, acc_t(0));
    for (int k = 0; k < count; ++k) {
      const int64_t y = target_[first + k];
      if (kind(y) != TargetKind::Valid) continue;
      for (int64_t j = 0; j < C_; ++j) cost_tile_[j * kTileRows + k] = cfg_.cost[y * C_ + j];
    }
  }

  // exp_tile_[j * kTileRows + k] = exp(tile_[j * kTileRows + k] - max[k]).
  void store_tile_exp(const Vec& max) {
    exp_tile_.resize(C_ * kTileRows);
    for (int64_t j = 0; j < C_; ++j) {
      (Vec::loadu(tile_.data() + j * kTileRows) - max).exp().store(exp_tile_.data() + j * kTileRows);
    }
  }

  // Tile of few classes, one vector lane per row; keeps exp(z - max) in exp_tile_ (and the cost rows in
  // cost_tile_ in expected mode). Returns false, filling nothing, when a row's maximum is not finite (NaN,
  // +inf, or all -inf): those tiles take the element-wise scan.
  bool scan_tile(int64_t first, int count, RowScan<acc_t>* scans, const acc_t* target_logits) {
    Vec max = Vec::loadu(tile_.data()), best = Vec(acc_t(0));
    for (int64_t j = 1; j < C_; ++j) {
      const Vec z = Vec::loadu(tile_.data() + j * kTileRows);
      best = Vec::blendv(best, Vec(static_cast<acc_t>(j)), z > max);  // strict: ties keep the first index
      max = at::vec::maximum(max, z);  // propagates NaN
    }
    acc_t lanes[5][kTileRows];
    max.store(lanes[0]);
    for (int k = 0; k < count; ++k) {
      if (!std::isfinite(lanes[0][k])) return false;
    }
    store_tile_exp(max);
    kept_exp_ = true;
    Vec sum_exp(acc_t(0)), cost_exp(acc_t(0)), weighted_sum(acc_t(0));
    for (int64_t j = 0; j < C_; ++j) sum_exp = sum_exp + Vec::loadu(exp_tile_.data() + j * kTileRows);
    if (expected_cost()) {
      load_cost_tile(first, count);
      for (int64_t j = 0; j < C_; ++j) {
        cost_exp = cost_exp + Vec::loadu(exp_tile_.data() + j * kTileRows) *
                                  Vec::loadu(cost_tile_.data() + j * kTileRows);
      }
    }
    if (cfg_.label_smoothing != acc_t(0)) {
      acc_t shifts[kTileRows] = {};  // each valid row's smoothing_shift
      for (int k = 0; k < count; ++k) {
        if (kind(target_[first + k]) == TargetKind::Valid) shifts[k] = smoothing_shift(target_logits[k]);
      }
      const Vec shift = Vec::loadu(shifts);
      for (int64_t j = 0; j < C_; ++j) {
        weighted_sum =
            weighted_sum + (Vec::loadu(tile_.data() + j * kTileRows) - shift) * Vec(class_weight_of(cfg_, j));
      }
    }
    sum_exp.store(lanes[1]);
    cost_exp.store(lanes[2]);
    weighted_sum.store(lanes[3]);
    best.store(lanes[4]);
    for (int k = 0; k < count; ++k) {
      scans[k].max = lanes[0][k];
      scans[k].sum_exp = lanes[1][k];
      scans[k].cost_exp = lanes[2][k];
      scans[k].weighted_logit_sum = lanes[3][k];
      scans[k].best_value = lanes[0][k];
      scans[k].best_index = static_cast<int64_t>(lanes[4][k]);
    }
    return true;
  }

  // Writes the gradient of the tile's rows, one vector lane per row, from exp_tile_ (computed here unless
  // the scan kept it).
  void gradient_tile(int64_t first, int count, const GradientCoefficients<acc_t>* coefs) {
    const LaneCoefficients k = fold_coefficients(first, count, coefs);
    if (!kept_exp_) {
      store_tile_exp(Vec::loadu(k.max));
      if (expected_cost()) load_cost_tile(first, count);
    }
    const Vec a = Vec::loadu(k.a), b = Vec::loadu(k.b), cost_factor = Vec::loadu(k.cost_factor);
    const Vec d = Vec::loadu(k.d);
    with_gradient_form([&](auto expected, auto smoothing, auto weighted) {
      for (int64_t j = 0; j < C_; ++j) {
        acc_t* out = exp_tile_.data() + j * kTileRows;
        const Vec cost = expected ? Vec::loadu(cost_tile_.data() + j * kTileRows) : Vec(acc_t(0));
        const Vec weight(weighted ? cfg_.class_weight[j] : acc_t(1));
        gradient_of<expected, smoothing>(Vec::loadu(out), a, b, cost_factor, d, cost, weight).store(out);
      }
    });
    for (int k = 0; k < count; ++k) {
      const int64_t y = target_[first + k];
      if (kind(y) == TargetKind::Valid) {
        exp_tile_[y * kTileRows + k] -= coefs[k].e;
      } else {
        for (int64_t j = 0; j < C_; ++j) exp_tile_[j * kTileRows + k] = invalid_row_gradient(y);
      }
    }
    for (int k = 0; k < count; ++k) {
      scalar_t* grad_row = grad_ + grad_layout_.row_offset(first + k);
      for (int64_t j = 0; j < C_; ++j) {
        grad_row[j * grad_layout_.class_stride] = static_cast<scalar_t>(exp_tile_[j * kTileRows + k]);
      }
    }
  }

  const CrossEntropyProblem& p_;
  const CrossEntropyConfig<acc_t>& cfg_;
  const int64_t C_;
  const scalar_t* input_;
  const int64_t* target_;
  scalar_t* const grad_;
  const RowLayout grad_layout_;
  const bool tiled_;
  const acc_t* row_ = nullptr;  // the row load_rows read (one row of many classes)
  bool kept_exp_ = false;       // whether the last scan kept exp(z - max) of its valid rows
  std::vector<acc_t> row_buffer_, out_buffer_, tile_, cost_tile_, exp_tile_;
};

// The rows of one deterministic_parallel_sum block in the forward: the same for the pre-pass and the row pass.
inline int64_t forward_rows_per_block(const CrossEntropyProblem& p) {
  return items_per_block(p.num_classes, p.num_rows);
}

// The sum of the class weights of the valid rows, added exactly as forward_rows adds them: its total weight.
template <typename acc_t>
acc_t sum_target_weights(const CrossEntropyProblem& p, const CrossEntropyConfig<acc_t>& cfg) {
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  return deterministic_parallel_sum<acc_t, 1>(p.num_rows, forward_rows_per_block(p), [&](int64_t begin, int64_t end) {
    std::array<double, 1> weight{};
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = target[row];
      if (classify_target(y, p.num_classes, cfg.ignore_index) == TargetKind::Valid) weight[0] += class_weight_of(cfg, y);
    }
    return weight;
  })[0];
}

// The forward: per-row statistics and losses ('none') or their sum, and with a non-empty `gradient` (a
// reduced loss) the gradient for grad_loss = 1, scaled exactly as backward_rows would scale it.
template <typename scalar_t>
void forward_rows(const CrossEntropyProblem& p, const CrossEntropyConfig<acc_type<scalar_t>>& cfg, at::Tensor& loss,
                  at::Tensor& row_stats, at::Tensor& total_weight, at::Tensor& gradient) {
  using acc_t = acc_type<scalar_t>;
  using Kernel = CrossEntropyKernel<scalar_t>;
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  acc_t* stats = row_stats.data_ptr<acc_t>();
  scalar_t* row_losses = p.reduction == Reduction::None ? loss.data_ptr<scalar_t>() : nullptr;
  scalar_t* grad = gradient.numel() > 0 ? gradient.data_ptr<scalar_t>() : nullptr;
  const RowLayout grad_layout = grad != nullptr ? contiguous_row_layout(gradient) : RowLayout{};
  const acc_t gradient_scale =
      grad != nullptr ? reduced_gradient_scale(acc_t(1), p.reduction == Reduction::Mean, sum_target_weights(p, cfg))
                      : acc_t(0);

  const auto sums = deterministic_parallel_sum<acc_t, 2>(
      p.num_rows, forward_rows_per_block(p), [&](int64_t begin, int64_t end) {
        Kernel kernel(p, cfg, grad, grad_layout);
        std::array<double, 2> loss_and_weight{};
        for (int64_t first = begin; first < end; first += kernel.rows_per_step()) {
          const int count = static_cast<int>(std::min<int64_t>(kernel.rows_per_step(), end - first));
          RowScan<acc_t> scans[Kernel::kTileRows];
          acc_t target_logits[Kernel::kTileRows];
          GradientCoefficients<acc_t> coefs[Kernel::kTileRows];
          kernel.scan_rows(first, count, scans, target_logits);
          for (int k = 0; k < count; ++k) {
            const int64_t row = first + k, y = target[row];
            RowLoss<acc_t> result{};  // ignored rows save zeros
            switch (kernel.kind(y)) {
              case TargetKind::Invalid:
                throw_invalid_target(y, p.num_classes, cfg.ignore_index);
              case TargetKind::Ignored:
                break;
              case TargetKind::Valid:
                result = finish_row(cfg, scans[k], y, target_logits[k]);
                loss_and_weight[0] += result.loss();
                loss_and_weight[1] += class_weight_of(cfg, y);
                break;
            }
            acc_t* row_stats_out = stats + row * p.num_stats;
            store_row_stats(row_stats_out, p.num_stats, result);
            if (row_losses != nullptr) row_losses[row] = static_cast<scalar_t>(result.loss());
            if (grad != nullptr && kernel.kind(y) == TargetKind::Valid) {
              coefs[k] = make_gradient_coefficients(cfg, row_stats_out, p.num_stats, y, gradient_scale);
            }
          }
          if (grad != nullptr) kernel.write_gradient(first, count, coefs);
        }
        return loss_and_weight;
      });
  total_weight.fill_(sums[1]);
  if (p.reduction == Reduction::Mean) loss.fill_(sums[0] / sums[1]);
  if (p.reduction == Reduction::Sum) loss.fill_(sums[0]);
}

template <typename scalar_t>
void backward_rows(const CrossEntropyProblem& p, const CrossEntropyConfig<acc_type<scalar_t>>& cfg,
                   const at::Tensor& grad_loss, const at::Tensor& row_stats, const at::Tensor& total_weight,
                   at::Tensor& grad_input) {
  using acc_t = acc_type<scalar_t>;
  using Kernel = CrossEntropyKernel<scalar_t>;
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  const acc_t* stats = row_stats.const_data_ptr<acc_t>();
  scalar_t* grad = grad_input.data_ptr<scalar_t>();
  const RowLayout grad_layout = contiguous_row_layout(grad_input);
  const scalar_t* per_row_grad = p.reduction == Reduction::None ? grad_loss.const_data_ptr<scalar_t>() : nullptr;
  const acc_t uniform_scale =
      per_row_grad != nullptr ? acc_t(0)
                              : reduced_gradient_scale(static_cast<acc_t>(grad_loss.item<double>()),
                                                       p.reduction == Reduction::Mean, total_weight.item<acc_t>());

  at::parallel_for(0, p.num_rows, items_per_block(p.num_classes, p.num_rows), [&](int64_t begin, int64_t end) {
    Kernel kernel(p, cfg, grad, grad_layout);
    for (int64_t first = begin; first < end; first += kernel.rows_per_step()) {
      const int count = static_cast<int>(std::min<int64_t>(kernel.rows_per_step(), end - first));
      GradientCoefficients<acc_t> coefs[Kernel::kTileRows];
      for (int k = 0; k < count; ++k) {
        const int64_t row = first + k, y = target[row];
        if (kernel.kind(y) != TargetKind::Valid) continue;
        const acc_t scale = per_row_grad != nullptr ? static_cast<acc_t>(per_row_grad[row]) : uniform_scale;
        coefs[k] = make_gradient_coefficients(cfg, stats + row * p.num_stats, p.num_stats, y, scale);
      }
      kernel.gradient_rows(first, count, coefs);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, c10::string_view cost_mode, bool write_gradient) {
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_cost_values(p);
  at::Tensor loss = allocate_loss(p);
  at::Tensor row_stats = allocate_row_stats(p);
  at::Tensor total_weight = at::empty({}, row_stats.options());
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  advise_huge_pages(loss);
  advise_huge_pages(gradient);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cost_sensitive_cross_entropy", [&] {
    const auto cfg = make_config<acc_type<scalar_t>>(p, ignore_index, label_smoothing);
    forward_rows<scalar_t>(p, cfg, loss, row_stats, total_weight, gradient);
  });
  return {loss, row_stats, total_weight, gradient};
}

// Writes the gradient for grad_loss into `grad_input` (contiguous, the input's shape).
void backward_into(const CrossEntropyProblem& p, const at::Tensor& grad_loss, const at::Tensor& row_stats,
                   const at::Tensor& total_weight, int64_t ignore_index, double label_smoothing,
                   at::Tensor& grad_input) {
  if (grad_input.numel() == 0) return;
  const at::Tensor grad = grad_loss.to(p.input.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "cost_sensitive_cross_entropy_backward", [&] {
                                    const auto cfg = make_config<acc_type<scalar_t>>(p, ignore_index, label_smoothing);
                                    backward_rows<scalar_t>(p, cfg, grad, row_stats.contiguous(), total_weight,
                                                            grad_input);
                                  });
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& cost_matrix, const std::optional<at::Tensor>& weight,
                        const at::Tensor& row_stats, const at::Tensor& total_weight, int64_t ignore_index,
                        c10::string_view reduction, double label_smoothing, c10::string_view cost_mode) {
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  advise_huge_pages(grad_input);
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing, grad_input);
  return grad_input;
}

void backward_inplace_cpu(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                          const at::Tensor& target, const std::optional<at::Tensor>& cost_matrix,
                          const std::optional<at::Tensor>& weight, const at::Tensor& row_stats,
                          const at::Tensor& total_weight, int64_t ignore_index, c10::string_view reduction,
                          double label_smoothing, c10::string_view cost_mode) {
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  if (is_unit_grad_loss_cpu(grad_loss)) return;
  backward_into(p, grad_loss, row_stats, total_weight, ignore_index, label_smoothing, gradient);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("cost_sensitive_cross_entropy", &forward_cpu);
  m.impl("cost_sensitive_cross_entropy_backward", &backward_cpu);
  m.impl("cost_sensitive_cross_entropy_backward_inplace", &backward_inplace_cpu);
}

}  // namespace fused_losses::cpu
