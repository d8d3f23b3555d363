// Per-row math of the cost-sensitive cross-entropy, shared by the CPU and CUDA kernels.
//
// For a row with logits z (C classes), target y, class weights w (ones when absent), cost matrix W
// (rows = true class, columns = predicted class) and label smoothing eps:
//   lse = log sum_j exp(z_j)
//   ce  = (1 - eps) w_y (lse - z_y) + eps / C * (sum_j w_j * lse - sum_j w_j z_j)   (F.cross_entropy, 'none')
//   f   = W[y, argmax z]                      (cost_mode "argmax", a constant of the step)
//       = sum_j softmax(z)_j W[y, j]          (cost_mode "expected", differentiated)
//   loss = f * ce
// and, with p = softmax(z) and s the scale coming from grad_output and the reduction,
//   d loss / d z_j = p_j (A + B W[y, j]) - D w_j - [j == y] E,
// whose coefficients A, B, D, E are computed once per row by make_gradient_coefficients.
#pragma once

#include "row_layout.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace fused_losses {

enum class CostMode : int { Argmax = 0, Expected = 1 };

// The per-row values the forward saves for the backward: the row max and log sum_j exp(z_j - max) always
// (kept apart, so that softmax = exp((z - max) - log_sum) keeps float32 accuracy where max + log_sum would
// round); f when a cost matrix is given; ce as well in "expected" mode (the product rule needs it).
C10_HOST_DEVICE inline int num_row_stats(bool has_cost, CostMode mode) {
  return 2 + (has_cost ? 1 : 0) + (has_cost && mode == CostMode::Expected ? 1 : 0);
}
constexpr int kMaxRowStats = 4;  // the most num_row_stats gives

// The logit the label-smoothing sum is taken relative to: the target's logit when finite, else 0. The smoothing
// term W lse - sum_j w_j z_j is formed as W ((max - shift) + log_sum) - sum_j w_j (z_j - shift), so that logits
// sharing a large offset cancel before they are summed (with sum_j w_j z_j, an offset of 1e4 cost the float32
// loss 1e-3 of its value). Every part of a row (lanes, packs) takes the same shift.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t smoothing_shift(acc_t target_logit) {
  return target_logit - target_logit == acc_t(0) ? target_logit : acc_t(0);  // x - x is NaN for inf and NaN
}

// Running state of one pass over (part of) a row: an online softmax (max, sum of exp(z - max)) with the
// expected-cost numerator rescaled alongside, the first argmax, and sum_j w_j (z_j - shift) for label smoothing
// (smoothing_shift).
template <typename acc_t>
struct RowScan {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_exp = 0;
  acc_t cost_exp = 0;  // sum_j exp(z_j - max) W[y, j]
  acc_t weighted_logit_sum = 0;  // sum_j w_j (z_j - smoothing_shift(z_y))
  acc_t best_value = -std::numeric_limits<acc_t>::infinity();
  int64_t best_index = std::numeric_limits<int64_t>::max();

  // exp(from - to) for to >= from, exactly 1 when equal (also for two infinities of the same sign).
  C10_HOST_DEVICE static acc_t rescale(acc_t from, acc_t to) { return from == to ? acc_t(1) : std::exp(from - to); }

  // torch.argmax order: NaN beats every number, then larger values, then the smaller index.
  C10_HOST_DEVICE static bool argmax_prefers(acc_t value, int64_t index, acc_t best, int64_t best_idx) {
    const bool value_nan = value != value, best_nan = best != best;
    if (value_nan || best_nan) return value_nan && (!best_nan || index < best_idx);
    return value > best || (value == best && index < best_idx);
  }

  // Adds element j (visited in increasing j within one RowScan). `cost` and `weight` are only read by the
  // caller when the mode needs them; pass 0 / 1 otherwise. `shift`: the row's smoothing_shift.
  C10_HOST_DEVICE void add(acc_t z, int64_t j, acc_t cost, acc_t weight, acc_t shift) {
    if (z > max) {
      const acc_t r = rescale(max, z);
      sum_exp = sum_exp * r + acc_t(1);
      cost_exp = cost_exp * r + cost;
      max = z;
    } else {
      const acc_t e = rescale(z, max);
      sum_exp += e;
      cost_exp += e * cost;
    }
    weighted_logit_sum += weight * (z - shift);
    if (argmax_prefers(z, j, best_value, best_index)) {
      best_value = z;
      best_index = j;
    }
  }

  C10_HOST_DEVICE void merge(const RowScan& other) {
    const acc_t new_max = other.max > max ? other.max : max;
    const acc_t r_self = rescale(max, new_max), r_other = rescale(other.max, new_max);
    sum_exp = sum_exp * r_self + other.sum_exp * r_other;
    cost_exp = cost_exp * r_self + other.cost_exp * r_other;
    max = new_max;
    weighted_logit_sum += other.weighted_logit_sum;
    if (argmax_prefers(other.best_value, other.best_index, best_value, best_index)) {
      best_value = other.best_value;
      best_index = other.best_index;
    }
  }

};

// Row-independent constants of one call.
template <typename acc_t>
struct CrossEntropyConfig {
  int64_t num_classes;
  int64_t ignore_index;
  acc_t label_smoothing;
  acc_t smoothing_per_class;      // label_smoothing / num_classes, divided once on the host
  const acc_t* class_weight_sum;  // sum_j w_j as a one-element device/host array, nullptr without weights
  CostMode mode;
  const acc_t* cost;          // (C, C) row-major, or nullptr
  const acc_t* class_weight;  // (C,), or nullptr
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t class_weight_of(const CrossEntropyConfig<acc_t>& cfg, int64_t j) {
  return cfg.class_weight != nullptr ? cfg.class_weight[j] : acc_t(1);
}

// sum_j w_j (C without weights); read through a pointer so CUDA never needs it on the host.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t class_weight_total(const CrossEntropyConfig<acc_t>& cfg) {
  return cfg.class_weight_sum != nullptr ? *cfg.class_weight_sum : acc_t(cfg.num_classes);
}

// The row's cross-entropy as F.cross_entropy(reduction='none') gives it, including w_y and smoothing.
// lse - z_y is formed as (max - z_y) + log_sum (= log(sum_exp)) so that large logits cancel exactly, as in
// log_softmax.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t smoothed_cross_entropy(const CrossEntropyConfig<acc_t>& cfg, const RowScan<acc_t>& scan,
                                                    acc_t log_sum, acc_t target_logit, acc_t target_weight) {
  const acc_t eps = cfg.label_smoothing;
  acc_t ce = (acc_t(1) - eps) * target_weight * ((scan.max - target_logit) + log_sum);
  if (eps != acc_t(0)) {
    const acc_t shift = smoothing_shift(target_logit);
    ce += cfg.smoothing_per_class *
          (class_weight_total(cfg) * ((scan.max - shift) + log_sum) - scan.weighted_logit_sum);
  }
  return ce;
}

// The forward result of one valid row.
template <typename acc_t>
struct RowLoss {
  acc_t max = 0, log_sum = 0, cost_factor = 0, cross_entropy = 0;
  C10_HOST_DEVICE acc_t loss() const { return cost_factor * cross_entropy; }
};

template <typename acc_t>
C10_HOST_DEVICE inline RowLoss<acc_t> finish_row(const CrossEntropyConfig<acc_t>& cfg, const RowScan<acc_t>& scan,
                                                 int64_t target, acc_t target_logit) {
  RowLoss<acc_t> row;
  row.max = scan.max;
  row.log_sum = std::log(scan.sum_exp);
  row.cross_entropy = smoothed_cross_entropy(cfg, scan, row.log_sum, target_logit, class_weight_of(cfg, target));
  if (cfg.cost == nullptr) {
    row.cost_factor = acc_t(1);
  } else if (cfg.mode == CostMode::Argmax) {
    row.cost_factor = cfg.cost[target * cfg.num_classes + scan.best_index];
  } else {
    row.cost_factor = scan.cost_exp / scan.sum_exp;
  }
  return row;
}

template <typename acc_t>
C10_HOST_DEVICE inline void store_row_stats(acc_t* stats, int num_stats, const RowLoss<acc_t>& row) {
  stats[0] = row.max;
  stats[1] = row.log_sum;
  if (num_stats > 2) stats[2] = row.cost_factor;
  if (num_stats > 3) stats[3] = row.cross_entropy;
}

// Coefficients of d loss / d z_j = p_j (A + B (W[y, j] - F)) - D w_j - [j == y] E for one row,
// with `scale` = grad_output (divided by the total weight for 'mean'). B and F are 0 but in expected mode,
// where F is the row's cost factor: W[y, j] - F is formed first because A - B F and B W[y, j] nearly cancel
// when the cross-entropy is large.
template <typename acc_t>
struct GradientCoefficients {
  acc_t max = 0, log_sum = 0, a = 0, b = 0, cost_factor = 0, d = 0, e = 0;  // p_j = exp((z_j - max) - log_sum)
};

template <typename acc_t>
C10_HOST_DEVICE inline GradientCoefficients<acc_t> make_gradient_coefficients(const CrossEntropyConfig<acc_t>& cfg,
                                                                             const acc_t* stats, int num_stats,
                                                                             int64_t target, acc_t scale) {
  const acc_t eps = cfg.label_smoothing;
  const acc_t f = num_stats > 2 ? stats[2] : acc_t(1);
  const acc_t w_y = class_weight_of(cfg, target);
  const acc_t smoothing_per_class = cfg.smoothing_per_class;  // eps / C: no division per row
  // d ce / d z_j = p_j ((1 - eps) w_y + eps W / C) - eps w_j / C - [j == y] (1 - eps) w_y
  const acc_t prob_coefficient = (acc_t(1) - eps) * w_y + smoothing_per_class * class_weight_total(cfg);
  GradientCoefficients<acc_t> c;
  c.max = stats[0];
  c.log_sum = stats[1];
  c.a = scale * f * prob_coefficient;
  if (num_stats > 3) {  // expected mode: + ce * d f / d z_j = ce * p_j (W[y, j] - f)
    c.b = scale * stats[3];
    c.cost_factor = f;
  }
  c.d = scale * f * smoothing_per_class;
  c.e = scale * f * (acc_t(1) - eps) * w_y;
  return c;
}

// The scale of every row's gradient for a reduced loss: grad_loss, divided by the total weight for 'mean'.
// The forward that also writes the gradient calls it with grad_loss = 1, the backward with its grad_loss:
// one formula, so both schedules give the same bits.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t reduced_gradient_scale(acc_t grad_loss, bool mean, acc_t total_weight) {
  return mean ? grad_loss / total_weight : grad_loss;
}

// Classification of a target value.
enum class TargetKind { Valid, Ignored, Invalid };

C10_HOST_DEVICE inline TargetKind classify_target(int64_t target, int64_t num_classes, int64_t ignore_index) {
  if (target == ignore_index) return TargetKind::Ignored;
  return (target >= 0 && target < num_classes) ? TargetKind::Valid : TargetKind::Invalid;
}

}  // namespace fused_losses
