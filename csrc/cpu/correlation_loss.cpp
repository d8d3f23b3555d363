// CPU kernels of fused_losses::correlation_loss (Pearson and CCC): sequences in parallel, each read once.
// A sequence is processed in blocks of kBlockSteps steps that stay in L1: two vectorised passes over a block
// give its exact moments, and Chan merges combine the blocks (stable in float32 far from zero).
#include "correlation_loss.h"
#include "cpu/cpu_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace fused_losses::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlockSteps = 512;

// The rows of one sequence as accumulation-type arrays (views of the tensors when they already are
// contiguous acc_t rows), with the conversion buffers of one thread.
template <typename scalar_t>
class SequenceRows {
 public:
  using acc_t = acc_type<scalar_t>;

  explicit SequenceRows(const CorrelationProblem& p)
      : p_(p),
        input_(p.input.const_data_ptr<scalar_t>()),
        target_(p.target.const_data_ptr<scalar_t>()),
        mask_(p.mask.has_value() ? p.mask->const_data_ptr<bool>() : nullptr) {}

  void read(int64_t seq) {
    x = row_as_acc<acc_t>(input_ + p_.input_layout.row_offset(seq), p_.input_layout.class_stride, p_.time,
                          x_buffer_);
    y = row_as_acc<acc_t>(target_ + p_.target_layout.row_offset(seq), p_.target_layout.class_stride, p_.time,
                          y_buffer_);
    valid = mask_ != nullptr ? read_mask(seq / p_.channels) : nullptr;
  }

  const acc_t* x = nullptr;
  const acc_t* y = nullptr;
  const acc_t* valid = nullptr;  // 1 / 0 per step, nullptr without a mask

 private:
  // The mask row of batch entry `b` as 1 / 0 values (the D channels of one entry share it).
  const acc_t* read_mask(int64_t b) {
    if (b != mask_row_) {
      valid_buffer_.resize(p_.time);
      const bool* row = mask_ + b * p_.mask_layout.outer_stride;
      for (int64_t t = 0; t < p_.time; ++t) valid_buffer_[t] = row[t * p_.mask_layout.class_stride] ? 1 : 0;
      mask_row_ = b;
    }
    return valid_buffer_.data();
  }

  const CorrelationProblem& p_;
  const scalar_t* input_;
  const scalar_t* target_;
  const bool* mask_;
  int64_t mask_row_ = -1;
  std::vector<acc_t> x_buffer_, y_buffer_, valid_buffer_;
};

// Lanes of steps [j, j + len) that count: valid ones, and never the lanes past len of a partial vector.
template <typename acc_t>
Vectorized<acc_t> keep_lanes(const acc_t* valid, int64_t j, int64_t len) {
  using Vec = Vectorized<acc_t>;
  if (valid != nullptr) return Vec::loadu(valid + j, len) != Vec(0);  // loadu zero-fills past len
  return Vec::arange(0, 1) < Vec(static_cast<acc_t>(len));
}

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Deviations of x and y from their centres at the steps [j, j + len), zero on the lanes that do not count
// (so NaN in padding never leaks).
template <typename acc_t>
struct StepDeviations {
  Vectorized<acc_t> keep, dx, dy;

  template <typename scalar_t>
  StepDeviations(const SequenceRows<scalar_t>& rows, int64_t j, int64_t len, const Centre<acc_t>& centre_x,
                 const Centre<acc_t>& centre_y) {
    using Vec = Vectorized<acc_t>;
    keep = keep_lanes(rows.valid, j, len);
    dx = Vec::blendv(Vec(0), centre_x.deviation(Vec::loadu(rows.x + j, len)), keep);
    dy = Vec::blendv(Vec(0), centre_y.deviation(Vec::loadu(rows.y + j, len)), keep);
  }
};

// Exact moments of steps [begin, end): the first pass gives the count and provisional means (the shifts), the
// second the sums of deviations from them (the block is in L1 by then).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Moments<acc_t> block_moments(const SequenceRows<scalar_t>& rows, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), one(1);
  Vec count(0), sum_x(0), sum_y(0);
  for (int64_t j = begin; j < end; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), end - j);
    const Vec keep = keep_lanes(rows.valid, j, len);
    count += Vec::blendv(zero, one, keep);
    sum_x += Vec::blendv(zero, Vec::loadu(rows.x + j, len), keep);
    sum_y += Vec::blendv(zero, Vec::loadu(rows.y + j, len), keep);
  }
  const acc_t n = horizontal_sum(count);
  if (n == acc_t(0)) return {};
  const acc_t shift_x = horizontal_sum(sum_x) / n, shift_y = horizontal_sum(sum_y) / n;
  Vec sum_dx(0), sum_dy(0), sum_dxx(0), sum_dyy(0), sum_dxy(0);
  for (int64_t j = begin; j < end; j += Vec::size()) {
    const StepDeviations<acc_t> d(rows, j, std::min<int64_t>(Vec::size(), end - j), Centre<acc_t>{shift_x, 0},
                                  Centre<acc_t>{shift_y, 0});
    sum_dx += d.dx;
    sum_dy += d.dy;
    sum_dxx += d.dx * d.dx;
    sum_dyy += d.dy * d.dy;
    sum_dxy += d.dx * d.dy;
  }
  return Moments<acc_t>::from_shifted_sums(n, shift_x, shift_y, horizontal_sum(sum_dx), horizontal_sum(sum_dy),
                                           horizontal_sum(sum_dxx), horizontal_sum(sum_dyy),
                                           horizontal_sum(sum_dxy));
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Moments<acc_t> sequence_moments(const SequenceRows<scalar_t>& rows, int64_t steps) {
  Moments<acc_t> moments;
  for (int64_t begin = 0; begin < steps; begin += kBlockSteps) {
    moments.merge(block_moments(rows, begin, std::min(steps, begin + kBlockSteps)));
  }
  return moments;
}

// Per-step losses c_t = 1 - k x~_t y~_t of one sequence (0 on padding).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void per_timestep_losses(const SequenceRows<scalar_t>& rows, int64_t steps, const Moments<acc_t>& m, acc_t k,
                         acc_t* out) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < steps; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), steps - j);
    const StepDeviations<acc_t> d(rows, j, len, m.centre_x(), m.centre_y());
    Vec::blendv(Vec(0), per_timestep_loss(k, d.dx, d.dy), d.keep).store(out + j, len);
  }
}

// (P, Gx, Gy) of one sequence for the per-timestep backward, from the per-step upstream gradient g.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
UpstreamSums<acc_t> upstream_sums(const SequenceRows<scalar_t>& rows, int64_t steps, const Moments<acc_t>& m,
                                  const acc_t* g) {
  using Vec = Vectorized<acc_t>;
  Vec p(0), gx(0), gy(0);
  for (int64_t j = 0; j < steps; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), steps - j);
    const StepDeviations<acc_t> d(rows, j, len, m.centre_x(), m.centre_y());
    const Vec gv = Vec::blendv(Vec(0), Vec::loadu(g + j, len), d.keep);
    p += gv * d.dx * d.dy;
    gx += gv * d.dx;
    gy += gv * d.dy;
  }
  UpstreamSums<acc_t> sums;
  sums.p = horizontal_sum(p);
  sums.gx = horizontal_sum(gx);
  sums.gy = horizontal_sum(gy);
  return sums;
}

// Gradient rows of one sequence (either output may be nullptr); g is the per-step upstream or nullptr.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void gradient_rows(const SequenceRows<scalar_t>& rows, int64_t steps, const GradientCoefficients<acc_t>& coef,
                   const acc_t* g, acc_t* grad_x, acc_t* grad_y) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0);
  for (int64_t j = 0; j < steps; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), steps - j);
    const StepDeviations<acc_t> d(rows, j, len, coef.centre_x, coef.centre_y);
    const Vec gv = g != nullptr ? Vec::loadu(g + j, len) : zero;
    if (grad_x != nullptr) Vec::blendv(zero, coef.input_gradient(d.dx, d.dy, gv), d.keep).store(grad_x + j, len);
    if (grad_y != nullptr) Vec::blendv(zero, coef.target_gradient(d.dx, d.dy, gv), d.keep).store(grad_y + j, len);
  }
}

// Where one sequence's row of a (B, T, D) output goes; the row is computed in acc_t and stored by finish().
template <typename scalar_t>
class OutputRow {
 public:
  using acc_t = acc_type<scalar_t>;
  OutputRow(scalar_t* base, RowLayout layout, int64_t steps) : base_(base), layout_(layout), steps_(steps) {}
  acc_t* begin(int64_t seq) {
    if (base_ == nullptr) return nullptr;
    row_ = base_ + layout_.row_offset(seq);
    return values_ = row_output<acc_t>(row_, layout_.class_stride, steps_, buffer_);
  }
  void finish() {
    if (base_ != nullptr) store_row(values_, row_, layout_.class_stride, steps_);
  }

 private:
  scalar_t* base_;
  RowLayout layout_;
  int64_t steps_;
  scalar_t* row_ = nullptr;
  acc_t* values_ = nullptr;
  std::vector<acc_t> buffer_;
};

template <typename scalar_t>
scalar_t* data_or_null(at::Tensor& t, bool wanted) {
  return wanted ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void forward_sequences(const CorrelationProblem& p, at::Tensor& loss, at::Tensor& moments, at::Tensor& total_weight) {
  using acc_t = acc_type<scalar_t>;
  const auto cfg = p.config<acc_t>();
  acc_t* stats = moments.data_ptr<acc_t>();
  scalar_t* sequence_losses = data_or_null<scalar_t>(loss, p.reduction == Reduction::None && !p.per_timestep);
  scalar_t* step_losses = data_or_null<scalar_t>(loss, p.per_step_output());
  const RowLayout step_layout = p.per_step_output() ? sequence_layout(loss, p.channels) : RowLayout{};

  const auto sums = deterministic_parallel_sum<acc_t, 2>(
      p.sequences(), items_per_block(p.time), [&](int64_t begin, int64_t end) {
        acc_t weighted_loss_and_weight[2] = {0, 0};
        SequenceRows<scalar_t> rows(p);
        OutputRow<scalar_t> out(step_losses, step_layout, p.time);
        for (int64_t seq = begin; seq < end; ++seq) {
          rows.read(seq);
          const Moments<acc_t> m = sequence_moments(rows, p.time);
          const acc_t value = finish_sequence(cfg, m, stats + seq * Moments<acc_t>::kWidth, weighted_loss_and_weight);
          if (sequence_losses != nullptr) sequence_losses[seq] = static_cast<scalar_t>(value);
          if (acc_t* row = out.begin(seq)) {
            per_timestep_losses(rows, p.time, m, correlation_scale(cfg, m) * m.n, row);
            out.finish();
          }
        }
        return std::array<acc_t, 2>{weighted_loss_and_weight[0], weighted_loss_and_weight[1]};
      });
  total_weight.fill_(sums[1]);
  if (p.reduction == Reduction::Mean) loss.fill_(sums[0] / sums[1]);
  if (p.reduction == Reduction::Sum) loss.fill_(sums[0]);
}

template <typename scalar_t>
void backward_sequences(const CorrelationProblem& p, const at::Tensor& grad_loss, const at::Tensor& moments,
                        const at::Tensor& total_weight, at::Tensor& grad_input, at::Tensor& grad_target) {
  using acc_t = acc_type<scalar_t>;
  const auto cfg = p.config<acc_t>();
  const acc_t* stats = moments.const_data_ptr<acc_t>();
  const scalar_t* grad = grad_loss.const_data_ptr<scalar_t>();
  const bool per_step_upstream = p.per_step_output();
  const bool per_sequence_upstream = p.reduction == Reduction::None && !p.per_timestep;
  const RowLayout upstream_layout =
      per_step_upstream ? sequence_layout(grad_loss, p.channels) : RowLayout{};
  acc_t uniform_grad = 0, weight_total = 1;
  if (p.reduction != Reduction::None) {
    uniform_grad = static_cast<acc_t>(grad_loss.item<double>());
    weight_total = total_weight.item<acc_t>();
  }
  const bool want_x = grad_input.numel() > 0, want_y = grad_target.numel() > 0;
  const RowLayout grad_x_layout = want_x ? sequence_layout(grad_input, p.channels) : RowLayout{};
  const RowLayout grad_y_layout = want_y ? sequence_layout(grad_target, p.channels) : RowLayout{};

  at::parallel_for(0, p.sequences(), items_per_block(p.time), [&](int64_t begin, int64_t end) {
    SequenceRows<scalar_t> rows(p);
    OutputRow<scalar_t> out_x(data_or_null<scalar_t>(grad_input, want_x), grad_x_layout, p.time);
    OutputRow<scalar_t> out_y(data_or_null<scalar_t>(grad_target, want_y), grad_y_layout, p.time);
    std::vector<acc_t> upstream_buffer;
    for (int64_t seq = begin; seq < end; ++seq) {
      rows.read(seq);
      const Moments<acc_t> m = Moments<acc_t>::load(stats + seq * Moments<acc_t>::kWidth);
      const acc_t* g = nullptr;
      GradientCoefficients<acc_t> coef;
      if (per_step_upstream) {
        g = row_as_acc<acc_t>(grad + upstream_layout.row_offset(seq), upstream_layout.class_stride, p.time,
                              upstream_buffer);
        const UpstreamSums<acc_t> sums = upstream_sums(rows, p.time, m, g);
        coef = make_gradient_coefficients(cfg, m, acc_t(0), &sums);
      } else {
        const acc_t upstream = per_sequence_upstream ? static_cast<acc_t>(grad[seq]) : uniform_grad;
        const acc_t scale = sequence_gradient_scale(per_sequence_upstream, p.reduction == Reduction::Mean, upstream,
                                                    weight_total, sequence_weight(cfg, m));
        coef = make_gradient_coefficients<acc_t>(cfg, m, scale, nullptr);
      }
      gradient_rows(rows, p.time, coef, g, out_x.begin(seq), out_y.begin(seq));
      out_x.finish();
      out_y.finish();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& mask,
                                                           c10::string_view kind, c10::string_view reduction,
                                                           bool per_timestep, double eps) {
  const CorrelationProblem p = make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps);
  at::Tensor loss = allocate_correlation_loss(p);
  at::Tensor moments = allocate_moments(p);
  at::Tensor total_weight = at::empty({}, moments.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss",
                                  [&] { forward_sequences<scalar_t>(p, loss, moments, total_weight); });
  return {loss, moments, total_weight};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                                const at::Tensor& target, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& stats, const at::Tensor& total_weight,
                                                c10::string_view kind, c10::string_view reduction, bool per_timestep,
                                                double eps, bool input_requires_grad, bool target_requires_grad) {
  const CorrelationProblem p = make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps);
  check_correlation_backward_arguments(p, grad_loss, stats, total_weight);
  at::Tensor grad_input = allocate_gradient(p.input, input_requires_grad);
  at::Tensor grad_target = allocate_gradient(p.target, target_requires_grad);
  if (grad_input.numel() == 0 && grad_target.numel() == 0) return {grad_input, grad_target};
  const at::Tensor grad = upstream_gradient(p, grad_loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss_backward", [&] {
    backward_sequences<scalar_t>(p, grad, stats.contiguous(), total_weight, grad_input, grad_target);
  });
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("correlation_loss", &forward_cpu);
  m.impl("correlation_loss_backward", &backward_cpu);
}

}  // namespace fused_losses::cpu
