// Per-sequence math of the Pearson and concordance (CCC) correlation losses, shared by the CPU and CUDA kernels.
//
// A sequence is one (batch, channel) pair of a (B, T, D) input; its statistics are taken over the valid steps
// (mask true). With n valid steps, means mx, my and centred sums Cxx = sum (x - mx)^2, Cyy, Cxy:
//   Pearson: loss = 1 - cov / sqrt((var_x + eps)(var_y + eps))          = 1 - Cxy / (sqrt(Cxx + n eps) sqrt(Cyy + n eps))
//   CCC:     loss = 1 - 2 cov / (var_x + var_y + (mx - my)^2 + eps)     = 1 - 2 Cxy / (Cxx + Cyy + n (mx - my)^2 + n eps)
// (population moments). Both read loss = 1 - q Cxy; a zero denominator (no valid step, or eps = 0 on a flat
// sequence, where Cxy = 0 too) gives q = 0, so the loss is always finite for finite inputs.
// Pearson's eps sits inside each variance so that its gradient is bounded: |d loss / d x_i| <= 1.5 / sqrt(n eps)
// for any input (a flat prediction included; with eps outside the square root it was ~ y~_i / (n eps)). CCC's
// is bounded by (2 sqrt(2n) + 2) / (n sqrt(eps)) as it stands. README: "Bounded gradients".
// Per-timestep form: c_t = 1 - k x~_t y~_t with k = q n, whose mean over the valid steps is the loss.
//
// Gradient of J = sum_t g_t c_t over the valid steps of a sequence (per-sequence losses are the case
// g_t = G / n): with P = sum g_t x~_t y~_t, Gx = sum g_t x~_t, Gy = sum g_t y~_t,
//   dJ/dx_i = -P dk/dx_i - k (g_i y~_i - Gy / n),
//   Pearson: dk/dx_i = -(k^2 / n) sqrt((Cyy + n eps) / (Cxx + n eps)) x~_i       (0 when Cxx + n eps = 0: eps = 0
//            on a flat sequence, the limit of -P dk/dx_i)
//   CCC:     dk/dx_i = -(k^2 / n) (x~_i + mx - my)
// and symmetrically for y. make_gradient_coefficients folds this into
//   dJ/dx_i = ax x~_i + (b + c g_i) y~_i + ex,   dJ/dy_i = ay y~_i + (b + c g_i) x~_i + ey.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fused_losses {

enum class CorrelationKind : int { Pearson = 0, Concordance = 1 };

// Where a series is centred: its mean is shift + mean, with the shift a value near the data (a data value or
// a provisional mean) and mean the small remainder. Deviations are taken as (v - shift) - mean, so a mean far
// from zero (1e4 in float32) keeps the precision of the spread of the data, not of its magnitude.
template <typename acc_t>
struct Centre {
  acc_t shift, mean;
  template <typename V>
  C10_HOST_DEVICE V deviation(V v) const {
    return (v - V(shift)) - V(mean);
  }
  C10_HOST_DEVICE acc_t value() const { return shift + mean; }
};

// Count, means and centred (co-)moment sums of the valid steps of (part of) a sequence. Partial moments of
// disjoint parts merge exactly (Chan et al.); with the means held relative to a shift (see Centre), neither
// the sums nor the running means cancel catastrophically in float32 for data far from zero.
template <typename acc_t>
struct Moments {
  using value_type = acc_t;
  static constexpr int kWidth = 8;  // values in the saved statistics, in the order of store()
  acc_t n = 0, shift_x = 0, shift_y = 0, mean_x = 0, mean_y = 0, cxx = 0, cyy = 0, cxy = 0;

  C10_HOST_DEVICE Centre<acc_t> centre_x() const { return {shift_x, mean_x}; }
  C10_HOST_DEVICE Centre<acc_t> centre_y() const { return {shift_y, mean_y}; }
  // mean(x) - mean(y), the shifts (close values, subtracted exactly) first.
  C10_HOST_DEVICE acc_t mean_gap() const { return (shift_x - shift_y) + (mean_x - mean_y); }

  // From sums of deviations d = v - shift over count > 0 steps. The first-order terms cancel the error of a
  // shift that is not the exact mean, so the result is as accurate as two exact passes.
  C10_HOST_DEVICE static Moments from_shifted_sums(acc_t count, acc_t shift_x, acc_t shift_y, acc_t sum_dx,
                                                   acc_t sum_dy, acc_t sum_dxx, acc_t sum_dyy, acc_t sum_dxy) {
    Moments m;
    const acc_t inv = acc_t(1) / count;
    m.n = count;
    m.shift_x = shift_x;
    m.shift_y = shift_y;
    m.mean_x = sum_dx * inv;
    m.mean_y = sum_dy * inv;
    m.cxx = non_negative(sum_dxx - sum_dx * sum_dx * inv);
    m.cyy = non_negative(sum_dyy - sum_dy * sum_dy * inv);
    m.cxy = sum_dxy - sum_dx * sum_dy * inv;
    return m;
  }

  // Chan's merge of the moments of a disjoint part (keeps this part's shifts).
  C10_HOST_DEVICE void merge(const Moments& other) {
    if (other.n == acc_t(0)) return;
    if (n == acc_t(0)) {
      *this = other;
      return;
    }
    const acc_t total = n + other.n;
    const acc_t weight = other.n / total;
    const acc_t dx = (other.shift_x - shift_x) + (other.mean_x - mean_x);
    const acc_t dy = (other.shift_y - shift_y) + (other.mean_y - mean_y);
    const acc_t cross = n * weight;  // n_a n_b / (n_a + n_b)
    mean_x += dx * weight;
    mean_y += dy * weight;
    cxx += other.cxx + dx * dx * cross;
    cyy += other.cyy + dy * dy * cross;
    cxy += other.cxy + dx * dy * cross;
    n = total;
  }

  C10_HOST_DEVICE void store(acc_t* out) const {
    const acc_t values[kWidth] = {n, shift_x, shift_y, mean_x, mean_y, cxx, cyy, cxy};
    for (int k = 0; k < kWidth; ++k) out[k] = values[k];
  }

  C10_HOST_DEVICE static Moments load(const acc_t* in) {
    Moments m;
    m.n = in[0];
    m.shift_x = in[1];
    m.shift_y = in[2];
    m.mean_x = in[3];
    m.mean_y = in[4];
    m.cxx = in[5];
    m.cyy = in[6];
    m.cxy = in[7];
    return m;
  }

 private:
  // Clamps a rounding-negative centred sum to 0 (keeps NaN).
  C10_HOST_DEVICE static acc_t non_negative(acc_t value) { return value < acc_t(0) ? acc_t(0) : value; }
};

// Sums over the valid steps of a sequence that the per-timestep backward needs: P = sum g x~ y~,
// Gx = sum g x~, Gy = sum g y~. Partial sums of disjoint parts add.
template <typename acc_t>
struct UpstreamSums {
  using value_type = acc_t;
  static constexpr int kWidth = 3;
  acc_t p = 0, gx = 0, gy = 0;

  C10_HOST_DEVICE void merge(const UpstreamSums& other) {
    p += other.p;
    gx += other.gx;
    gy += other.gy;
  }
  C10_HOST_DEVICE void store(acc_t* out) const {
    out[0] = p;
    out[1] = gx;
    out[2] = gy;
  }
  C10_HOST_DEVICE static UpstreamSums load(const acc_t* in) {
    UpstreamSums s;
    s.p = in[0];
    s.gx = in[1];
    s.gy = in[2];
    return s;
  }
};

// Call-wide constants of the loss.
template <typename acc_t>
struct CorrelationConfig {
  CorrelationKind kind;
  acc_t eps;
  bool per_timestep;
};

// q of loss = 1 - q Cxy (see the top of the file); 0 where the denominator is 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t correlation_scale(const CorrelationConfig<acc_t>& cfg, const Moments<acc_t>& m) {
  acc_t numerator, denominator;
  if (cfg.kind == CorrelationKind::Pearson) {
    numerator = acc_t(1);
    denominator = std::sqrt(m.cxx + m.n * cfg.eps) * std::sqrt(m.cyy + m.n * cfg.eps);
  } else {
    const acc_t mean_gap = m.mean_gap();
    numerator = acc_t(2);
    denominator = m.cxx + m.cyy + m.n * (mean_gap * mean_gap + cfg.eps);
  }
  return denominator == acc_t(0) ? acc_t(0) : numerator / denominator;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sequence_loss(const CorrelationConfig<acc_t>& cfg, const Moments<acc_t>& m) {
  return acc_t(1) - correlation_scale(cfg, m) * m.cxy;
}

// The weight of a sequence in the 'mean' and 'sum' reductions: 1, or with per_timestep its number of valid
// steps (the reductions then run over the per-step values, padding excluded).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sequence_weight(const CorrelationConfig<acc_t>& cfg, const Moments<acc_t>& m) {
  return cfg.per_timestep ? m.n : acc_t(1);
}

// Stores the finished moments of a sequence, adds (weight * loss, weight) to the reduction sums and returns
// the sequence's loss.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t finish_sequence(const CorrelationConfig<acc_t>& cfg, const Moments<acc_t>& m,
                                             acc_t* stats, acc_t (&sums)[2]) {
  m.store(stats);
  const acc_t loss = sequence_loss(cfg, m), weight = sequence_weight(cfg, m);
  sums[0] += weight * loss;
  sums[1] += weight;
  return loss;
}

// Per-step loss c_t = 1 - k x~_t y~_t of a valid step (V: acc_t, or a CPU vector of them).
template <typename V, typename acc_t>
C10_HOST_DEVICE inline V per_timestep_loss(acc_t k, V dx, V dy) {
  return V(acc_t(1)) - V(k) * dx * dy;
}

// dJ/dx_i = ax x~_i + (b + c g_i) y~_i + ex and dJ/dy_i = ay y~_i + (b + c g_i) x~_i + ey (top of the file);
// `cross` is b + c g_i, or just b without a per-step upstream (c = 0). V: acc_t, or a CPU vector of them.
template <typename acc_t>
struct GradientCoefficients {
  Centre<acc_t> centre_x, centre_y;
  acc_t ax, ay, b, c, ex, ey;

  template <typename V>
  C10_HOST_DEVICE V cross(V g) const {
    return V(b) + V(c) * g;
  }
  template <typename V>
  C10_HOST_DEVICE V input_gradient(V dx, V dy, V cross) const {
    return V(ax) * dx + cross * dy + V(ex);
  }
  template <typename V>
  C10_HOST_DEVICE V target_gradient(V dx, V dy, V cross) const {
    return V(ay) * dy + cross * dx + V(ey);
  }
};

// sqrt(a / b), taken as 0 when b = 0 (Pearson's dk/dx at a flat sequence with eps = 0, see the top of the file).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t safe_sqrt_ratio(acc_t a, acc_t b) {
  return b > acc_t(0) ? std::sqrt(a) / std::sqrt(b) : acc_t(0);
}

// Coefficients for one sequence. Per-sequence upstream: `scale` = G (the gradient of the sequence's loss) and
// `upstream` = nullptr. Per-timestep upstream: `upstream` = its sums (P, Gx, Gy), and the per-step g_i enters
// through cross(g_i).
template <typename acc_t>
C10_HOST_DEVICE inline GradientCoefficients<acc_t> make_gradient_coefficients(const CorrelationConfig<acc_t>& cfg,
                                                                             const Moments<acc_t>& m, acc_t scale,
                                                                             const UpstreamSums<acc_t>* upstream) {
  const acc_t inv_n = m.n > acc_t(0) ? acc_t(1) / m.n : acc_t(0);
  const acc_t k = correlation_scale(cfg, m) * m.n;
  GradientCoefficients<acc_t> c;
  c.centre_x = m.centre_x();
  c.centre_y = m.centre_y();
  acc_t p, gx, gy;
  if (upstream == nullptr) {  // g_t = G / n: P = G Cxy / n, Gx = Gy = 0
    p = scale * m.cxy * inv_n;
    gx = gy = acc_t(0);
    c.b = -k * scale * inv_n;
    c.c = acc_t(0);
  } else {
    p = upstream->p;
    gx = upstream->gx;
    gy = upstream->gy;
    c.b = acc_t(0);
    c.c = -k;
  }
  const acc_t t = p * k * k * inv_n;  // -P dk/dx_i = t * (...)
  c.ex = k * gy * inv_n;
  c.ey = k * gx * inv_n;
  if (cfg.kind == CorrelationKind::Pearson) {
    const acc_t floor = m.n * cfg.eps;
    c.ax = t * safe_sqrt_ratio(m.cyy + floor, m.cxx + floor);
    c.ay = t * safe_sqrt_ratio(m.cxx + floor, m.cyy + floor);
  } else {
    const acc_t mean_gap = m.mean_gap();
    c.ax = c.ay = t;
    c.ex += t * mean_gap;
    c.ey -= t * mean_gap;
  }
  return c;
}

// The gradient G of one sequence's loss in the per-sequence backward: `upstream` is the sequence's own
// grad_output for reduction 'none' (per_sequence_upstream), else the scalar grad_output, which is multiplied by
// the sequence's weight (and divided by the total weight for 'mean').
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sequence_gradient_scale(bool per_sequence_upstream, bool mean, acc_t upstream,
                                                     acc_t total_weight, acc_t weight) {
  if (per_sequence_upstream) return upstream;
  const acc_t scaled = upstream * weight;
  return mean ? scaled / total_weight : scaled;
}

// The coefficients of a per-sequence upstream (sequence_gradient_scale's arguments, the sequence's weight
// aside): one expression for the backward and for the forward that writes the gradient (upstream = 1), so
// both give the same bits.
template <typename acc_t>
C10_HOST_DEVICE inline GradientCoefficients<acc_t> sequence_gradient_coefficients(const CorrelationConfig<acc_t>& cfg,
                                                                                 const Moments<acc_t>& m,
                                                                                 bool per_sequence_upstream, bool mean,
                                                                                 acc_t upstream, acc_t total_weight) {
  const acc_t scale =
      sequence_gradient_scale(per_sequence_upstream, mean, upstream, total_weight, sequence_weight(cfg, m));
  return make_gradient_coefficients<acc_t>(cfg, m, scale, nullptr);
}

}  // namespace fused_losses
