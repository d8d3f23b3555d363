// Per-element math of the weighted / focal / asymmetric binary cross-entropy with logits, shared by the
// CPU kernels (instantiated with at::vec::Vectorized through their own Math policy) and the CUDA kernels
// (FastFloatMath below for float accumulation, ScalarMath for double).
//
// With p = sigmoid(z), target y in [0, 1], pos_weight q and weight w:
//   loss = w * (q * y * l_pos(z) + (1 - y) * l_neg(z))      (soft targets mix the two terms linearly)
//   l_pos = -(1 - p)^gamma_pos * log p
//   l_neg = -p_m^gamma_neg * log(1 - p_m),  p_m = max(p - clip, 0)
// With gamma_pos = gamma_neg = clip = 0 this is F.binary_cross_entropy_with_logits. Everything is formed
// from log-sigmoid: log p = min(z, 0) - log1p(exp(-|z|)), log(1 - p) = min(-z, 0) - log1p(exp(-|z|)), and
// the focusing factors as exp(gamma * log(base)), never the log of a rounded probability, so |z| up to 1e4
// stays finite. pow(0, 0) is 1. The gradients are the full derivatives (docs/design.md, "Weighted, focal and
// asymmetric BCE"):
//   d l_pos / dz = (1 - p)^gamma_pos * (gamma_pos * p * log p - (1 - p))
//   d l_neg / dz = p^gamma_neg * (p - gamma_neg * (1 - p) * log(1 - p))                     (clip = 0)
//                = p_m^gamma_neg * (1 / (1 - p_m) - gamma_neg * log(1 - p_m) / p_m) * p (1 - p)   (p > clip)
//                = 0                                                                             (p <= clip)
// all finite for any gamma >= 0 (including gamma < 1, where the factors' own derivatives are unbounded).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace fused_losses {

// Row-independent constants of one call.
template <typename acc_t>
struct BceConfig {
  acc_t gamma_pos = 0;
  acc_t gamma_neg = 0;
  acc_t clip = 0;
  bool focusing = false;  // any of the three is non-zero; false is plain BCE with its cheaper formulas
  bool clipped = false;   // clip is non-zero (ASL's shifted negative term)
};

template <typename acc_t>
BceConfig<acc_t> make_bce_config(double gamma_pos, double gamma_neg, double clip) {
  BceConfig<acc_t> cfg;
  cfg.gamma_pos = static_cast<acc_t>(gamma_pos);
  cfg.gamma_neg = static_cast<acc_t>(gamma_neg);
  // A clip below acc_t's normal range is 0: it moves no p that matters (p - clip rounds to p above 2^-102 in
  // float32), and the GPU's log flushes a subnormal (1 - p) + clip to 0 (docs/design.md, "Fast float32 math").
  cfg.clip = std::abs(clip) < static_cast<double>(std::numeric_limits<acc_t>::min()) ? acc_t(0)
                                                                                      : static_cast<acc_t>(clip);
  // The flags describe the values the kernels compute with (a gamma or clip below acc_t's range is 0).
  cfg.focusing = cfg.gamma_pos != acc_t(0) || cfg.gamma_neg != acc_t(0) || cfg.clip != acc_t(0);
  cfg.clipped = cfg.clip != acc_t(0);
  return cfg;
}

// The elementary functions on scalars, host and device. The formulas below are written once against this
// interface; the CPU kernels pass a policy with the same members over at::vec::Vectorized.
template <typename acc_t>
struct ScalarMath {
  using Value = acc_t;
  using Mask = bool;
  C10_HOST_DEVICE static acc_t exp(acc_t x) { return std::exp(x); }
  C10_HOST_DEVICE static acc_t log(acc_t x) { return std::log(x); }
  C10_HOST_DEVICE static acc_t log1p(acc_t x) { return std::log1p(x); }
  // log1p(x) for x in [0, 1] only (the softplus tail log1p(exp(-|z|))): a policy may use a cheaper form.
  C10_HOST_DEVICE static acc_t log1p_unit_interval(acc_t x) { return std::log1p(x); }
  C10_HOST_DEVICE static acc_t fma(acc_t a, acc_t b, acc_t c) { return std::fma(a, b, c); }
  C10_HOST_DEVICE static acc_t abs(acc_t x) { return std::abs(x); }
  C10_HOST_DEVICE static acc_t min(acc_t a, acc_t b) { return a < b ? a : b; }
  C10_HOST_DEVICE static acc_t max(acc_t a, acc_t b) { return a > b ? a : b; }
  C10_HOST_DEVICE static bool greater(acc_t a, acc_t b) { return a > b; }
  C10_HOST_DEVICE static bool greater_equal(acc_t a, acc_t b) { return a >= b; }
  C10_HOST_DEVICE static acc_t select(bool condition, acc_t if_true, acc_t if_false) {
    return condition ? if_true : if_false;
  }
};

// a / b through the policy's `divide` where it has one (an approximate division on the GPU), else IEEE.
template <typename Math, typename V>
C10_HOST_DEVICE inline V divide(V a, V b) {
  if constexpr (requires { Math::divide(a, b); }) {
    return Math::divide(a, b);
  } else {
    return a / b;
  }
}

// 2 atanh(s) for |s| <= 1/3 in float32, an odd series summed to s^13 in Horner's order (the fewest
// instructions: the kernels evaluate many elements at once, so a long dependency chain costs nothing), as
// s (2 + s^2 (2/3 + ...)): the last step one fma and one multiply. Truncation: the first term left out,
// 2 s^15 / 15, is below s^14 / 15 <= 3^-14 / 15 < 2^-26 of the sum 2 s (1 + ...): an eighth of a float32 ulp,
// under the rounding of the terms kept. `Math` supplies fma over its Value type: scalars on the GPU
// (FastFloatMath), at::vec::Vectorized lanes on the CPU (its VecMath).
template <typename Math, typename V = typename Math::Value>
C10_HOST_DEVICE inline V twice_atanh_series(V s) {
  const V s2 = s * s;
  // 2 atanh(s) = s (2 + s^2 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6 + 2/11 s^8 + 2/13 s^10))
  V series = Math::fma(s2, V(2.0f / 13), V(2.0f / 11));
  series = Math::fma(series, s2, V(2.0f / 9));
  series = Math::fma(series, s2, V(2.0f / 7));
  series = Math::fma(series, s2, V(2.0f / 5));
  series = Math::fma(series, s2, V(2.0f / 3));
  return s * Math::fma(series, s2, V(2.0f));
}

// a / b for b in [1, 3] (the sigmoid's 1 + e, the series' 2 + e and 2 - m): a times the policy's reciprocal
// where it has one (one approximate instruction on the GPU, where b is never subnormal), else divide.
template <typename Math, typename V>
C10_HOST_DEVICE inline V divide_moderate(V a, V b) {
  if constexpr (requires { Math::reciprocal(b); }) {
    return a * Math::reciprocal(b);
  } else {
    return divide<Math>(a, b);
  }
}

// log1p(e) for e in [0, 1] (the softplus tail log1p(exp(-|z|))) without a general log1p: 2 atanh(s) with
// s = e / (2 + e) in [0, 1/3]. s has no cancellation, so the result keeps a relative accuracy down to e -> 0,
// where log(1 + e) from a fast log keeps only an absolute one.
template <typename Math, typename V = typename Math::Value>
C10_HOST_DEVICE inline V log1p_unit_interval_series(V e) {
  return twice_atanh_series<Math>(divide_moderate<Math>(e, V(2.0f) + e));
}

// float32 elementary functions from fast approximate primitives: `Primitives` has exp_flush_subnormal(x),
// log(x), divide(a, b), reciprocal(x) (x normal) and fma(a, b, c) (on the GPU ex2.approx.ftz, lg2.approx.ftz,
// __fdividef, rcp.approx.ftz and __fmaf_rn: cuda_utils.cuh). exp flushes results below 2^-126 to 0, as the
// CPU kernels' exp does; the fused multiply-adds are explicit, so they round the same in every schedule. The
// error this adds is bounded in docs/design.md ("Fast float32 math") and tested by injecting each primitive's
// documented worst error (tests/test_cuda_emulation.py, test_fast_float_math_accuracy).
template <typename Primitives>
struct FastFloatMath : ScalarMath<float> {
  C10_HOST_DEVICE static float exp(float x) { return Primitives::exp_flush_subnormal(x); }
  C10_HOST_DEVICE static float log(float x) { return Primitives::log(x); }
  C10_HOST_DEVICE static float divide(float a, float b) { return Primitives::divide(a, b); }
  C10_HOST_DEVICE static float reciprocal(float x) { return Primitives::reciprocal(x); }
  C10_HOST_DEVICE static float fma(float a, float b, float c) { return Primitives::fma(a, b, c); }
  C10_HOST_DEVICE static float log1p_unit_interval(float e) { return log1p_unit_interval_series<FastFloatMath>(e); }
  // log(1 - m) for m in [0, 1) given complement = 1 - m (formed without cancellation): -2 atanh(m / (2 - m))
  // for m <= 1/2 (the argument stays in [0, 1/3]: relative accuracy as m -> 0, where a fast log of 1 - m
  // keeps only an absolute one), else the fast log of the complement (below 1/2: |log| >= 0.69, so the log's
  // error stays relative). Both are evaluated and one selected: no branch.
  C10_HOST_DEVICE static float log_complement(float m, float complement) {
    const float series = -twice_atanh_series<FastFloatMath>(divide_moderate<FastFloatMath>(m, 2.0f - m));
    return m <= 0.5f ? series : Primitives::log(complement);
  }
};

// log(1 - m) for the ASL shifted probability m = p_m in [0, 1), with complement = 1 - p_m = (1 - p) + clip:
// the policy's log_complement where it has one (the GPU's fast form), else the exact log1p(-m).
template <typename Math, typename V>
C10_HOST_DEVICE inline V log_complement(V m, V complement) {
  if constexpr (requires { Math::log_complement(m, complement); }) {
    return Math::log_complement(m, complement);
  } else {
    return Math::log1p(-m);
  }
}

// sigmoid(z) and its complement, with their logs, from one exp(-|z|); log1p_e = log1p(exp(-|z|)), the
// softplus tail (log p = min(z, 0) - log1p_e).
template <typename V>
struct SigmoidParts {
  V p, one_minus_p, log_p, log_one_minus_p, log1p_e;
};

template <typename Math, typename V = typename Math::Value>
C10_HOST_DEVICE inline SigmoidParts<V> sigmoid_parts(V z, bool need_probabilities, bool need_logs) {
  SigmoidParts<V> s;
  const V e = Math::exp(-Math::abs(z));  // in (0, 1]: no overflow for any z
  if (need_probabilities) {
    const V r = divide_moderate<Math>(V(1), V(1) + e);
    const auto nonnegative = Math::greater_equal(z, V(0));
    s.p = Math::select(nonnegative, r, e * r);
    s.one_minus_p = Math::select(nonnegative, e * r, r);
  }
  if (need_logs) {
    s.log1p_e = Math::log1p_unit_interval(e);
    s.log_p = Math::min(z, V(0)) - s.log1p_e;
    s.log_one_minus_p = Math::min(-z, V(0)) - s.log1p_e;
  }
  return s;
}

// base^gamma from log(base), with 0^0 = 1 (exp(0 * -inf) would be NaN).
template <typename Math, typename acc_t, typename V = typename Math::Value>
C10_HOST_DEVICE inline V power_from_log(V log_base, acc_t gamma) {
  return gamma == acc_t(0) ? V(1) : Math::exp(V(gamma) * log_base);
}

// The pos_weight argument when there is none, known at compile time (the unweighted CUDA kernels): q y is y,
// and the plain loss takes the softplus form.
struct UnitPosWeight {};

// q y, the share of the positive term.
template <typename V, typename Q>
C10_HOST_DEVICE inline V positive_share(Q q, V y) {
  if constexpr (std::is_same_v<Q, UnitPosWeight>) {
    return y;
  } else {
    return q * y;
  }
}

// The element's loss w * (q y l_pos + (1 - y) l_neg), from the parts of sigmoid(z): their logs, and p when
// clipped. Plain without pos_weight: y (log1p_e - min(z, 0)) + (1 - y)(log1p_e + max(z, 0)) summed as
// (1 - y) max(z, 0) - y min(z, 0) + log1p_e: non-negative terms for y in [0, 1] (no cancellation), the general
// form's inf and NaN at z = +-inf (0 * inf where a term's weight is 0), in 5 instructions instead of 7.
template <typename Math, typename acc_t, typename V, typename Q>
C10_HOST_DEVICE inline V bce_loss_from_parts(const BceConfig<acc_t>& cfg, const SigmoidParts<V>& s, V z, V y, V w,
                                             Q q) {
  if constexpr (std::is_same_v<Q, UnitPosWeight>) {
    if (!cfg.focusing) {
      return w * (Math::fma(-y, Math::min(z, V(0)), (V(1) - y) * Math::max(z, V(0))) + s.log1p_e);
    }
  }
  V positive = -s.log_p;
  V negative = -s.log_one_minus_p;
  if (cfg.focusing) {
    positive = positive * power_from_log<Math>(s.log_one_minus_p, cfg.gamma_pos);
    if (!cfg.clipped) {
      negative = negative * power_from_log<Math>(s.log_p, cfg.gamma_neg);
    } else {
      // p_m = 0 gives log(1) = 0 and a factor of 0 or 1: no special case needed.
      const V shifted = Math::max(s.p - V(cfg.clip), V(0));
      negative = -log_complement<Math>(shifted, s.one_minus_p + V(cfg.clip)) *
                 power_from_log<Math>(Math::log(shifted), cfg.gamma_neg);
    }
  }
  return w * Math::fma(positive_share(q, y), positive, (V(1) - y) * negative);
}

// d loss / dz of the element (before the scale from grad_output and the reduction), from the parts of
// sigmoid(z): the probabilities, and their logs when focusing.
template <typename Math, typename acc_t, typename V, typename Q>
C10_HOST_DEVICE inline V bce_grad_from_parts(const BceConfig<acc_t>& cfg, const SigmoidParts<V>& s, V y, V w, Q q) {
  V positive = -s.one_minus_p;  // d(-log p)/dz
  V negative = s.p;             // d(-log(1 - p))/dz
  if (cfg.focusing) {
    if (cfg.gamma_pos != acc_t(0)) {
      positive = power_from_log<Math>(s.log_one_minus_p, cfg.gamma_pos) *
                 Math::fma(V(cfg.gamma_pos) * s.p, s.log_p, -s.one_minus_p);
    }
    if (!cfg.clipped) {
      if (cfg.gamma_neg != acc_t(0)) {
        negative = power_from_log<Math>(s.log_p, cfg.gamma_neg) *
                   Math::fma(-V(cfg.gamma_neg) * s.one_minus_p, s.log_one_minus_p, s.p);
      }
    } else {
      // Below the margin p_m is the constant 0. Above it, log(1 - p_m) / p_m is bounded (-> -1 as p_m -> 0),
      // so p_m^gamma * gamma * log(1 - p_m) / p_m stays finite for gamma < 1 too; the masked lanes divide by 1.
      const V shifted = Math::max(s.p - V(cfg.clip), V(0));
      const auto active = Math::greater(shifted, V(0));
      const V safe_shifted = Math::select(active, shifted, V(1));
      const V log_one_minus_shifted = log_complement<Math>(shifted, s.one_minus_p + V(cfg.clip));
      const V dloss_dshifted = divide<Math>(V(1), V(1) - shifted) -
                               divide<Math>(V(cfg.gamma_neg) * log_one_minus_shifted, safe_shifted);
      const V value = power_from_log<Math>(Math::log(safe_shifted), cfg.gamma_neg) * dloss_dshifted * s.p *
                      s.one_minus_p;
      negative = Math::select(active, value, V(0));
    }
  }
  return w * Math::fma(positive_share(q, y), positive, (V(1) - y) * negative);
}

// `q` is the pos_weight (a V), or UnitPosWeight when there is none.
template <typename Math, typename acc_t, typename V, typename Q>
C10_HOST_DEVICE inline V bce_element_loss(const BceConfig<acc_t>& cfg, V z, V y, V w, Q q) {
  const bool clipped = cfg.focusing && cfg.clipped;
  return bce_loss_from_parts<Math>(cfg, sigmoid_parts<Math>(z, clipped, true), z, y, w, q);
}

template <typename Math, typename acc_t, typename V, typename Q>
C10_HOST_DEVICE inline V bce_element_grad(const BceConfig<acc_t>& cfg, V z, V y, V w, Q q) {
  return bce_grad_from_parts<Math>(cfg, sigmoid_parts<Math>(z, true, cfg.focusing), y, w, q);
}

// Both at once (the forward that also writes the gradient), from one evaluation of sigmoid(z): each value is
// bitwise the one of the separate functions.
template <typename V>
struct LossAndGrad {
  V loss, grad;
};

template <typename Math, typename acc_t, typename V, typename Q>
C10_HOST_DEVICE inline LossAndGrad<V> bce_element_loss_and_grad(const BceConfig<acc_t>& cfg, V z, V y, V w, Q q) {
  const SigmoidParts<V> s = sigmoid_parts<Math>(z, true, true);
  return {bce_loss_from_parts<Math>(cfg, s, z, y, w, q), bce_grad_from_parts<Math>(cfg, s, y, w, q)};
}

}  // namespace fused_losses
