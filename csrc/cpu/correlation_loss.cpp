// CPU kernels of fused_losses::correlation_loss (Pearson and CCC): sequences in parallel, each read once.
// A sequence is processed in blocks of kBlockSteps steps that stay in L1: two vectorised passes over a block
// give its exact moments, and Chan merges combine the blocks (stable in float32 far from zero).
// Schedules (common.h): with write_input_gradient / write_target_gradient (a reduced loss) the forward also
// writes the gradient for grad_loss = 1, sweeping each sequence's rows a second time right after its moments,
// while they are in cache; for 'mean' a cheap pre-pass over the mask gives the divisor first. The in-place
// backward keeps that gradient for grad_loss = 1 and otherwise recomputes it exactly as the 3-pass backward.
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

// 1 for a valid step of a mask row, 0 for padding. Read through the byte: any non-zero byte is valid (a
// uint8 tensor viewed as bool may hold other values than 0 / 1, which a bool read would pass through).
inline int is_valid_step(const bool* mask_row, int64_t offset) {
  return reinterpret_cast<const uint8_t*>(mask_row)[offset] != 0 ? 1 : 0;
}

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
      for (int64_t t = 0; t < p_.time; ++t) valid_buffer_[t] = is_valid_step(row, t * p_.mask_layout.class_stride);
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

// Which lanes of the vector of steps [j, j + len) count: the valid ones, never those past len. Full vectors of
// an unmasked sequence (the common case) skip the selection.
template <typename acc_t>
class Lanes {
 public:
  using Vec = Vectorized<acc_t>;
  Lanes(const acc_t* valid, int64_t j, int64_t len) : all_(valid == nullptr && len == Vec::size()) {
    if (!all_) keep_ = valid != nullptr ? Vec::loadu(valid + j, len) != Vec(0)  // loadu zero-fills past len
                                        : Vec::arange(0, 1) < Vec(static_cast<acc_t>(len));
  }
  // v on the lanes that count, 0 elsewhere (so NaN in padding never leaks).
  Vec operator()(const Vec& v) const { return all_ ? v : Vec::blendv(Vec(0), v, keep_); }

 private:
  bool all_;
  Vec keep_;
};

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Deviations of x and y from their centres at the steps [j, j + len), 0 on the lanes that do not count.
template <typename acc_t>
struct StepDeviations {
  Lanes<acc_t> lanes;
  Vectorized<acc_t> dx, dy;

  template <typename scalar_t>
  StepDeviations(const SequenceRows<scalar_t>& rows, int64_t j, int64_t len, const Centre<acc_t>& centre_x,
                 const Centre<acc_t>& centre_y)
      : lanes(rows.valid, j, len),
        dx(lanes(centre_x.deviation(Vectorized<acc_t>::loadu(rows.x + j, len)))),
        dy(lanes(centre_y.deviation(Vectorized<acc_t>::loadu(rows.y + j, len)))) {}
};

// Exact moments of steps [begin, end) in one vectorised pass of sums of deviations from a shift, the block's
// first valid step. Shifting by a data value bounds the cancellation in sum d^2 - (sum d)^2 / n to about
// n ulps of the result, so blocks stay short (kBlockSteps) and Chan merges combine them.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Moments<acc_t> block_moments(const SequenceRows<scalar_t>& rows, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  int64_t first = begin;
  if (rows.valid != nullptr) {
    while (first < end && rows.valid[first] == acc_t(0)) ++first;
  }
  if (first == end) return {};
  const acc_t shift_x = rows.x[first], shift_y = rows.y[first];
  Vec count(0), sum_dx(0), sum_dy(0), sum_dxx(0), sum_dyy(0), sum_dxy(0);
  for (int64_t j = first; j < end; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), end - j);
    const Lanes<acc_t> lanes(rows.valid, j, len);
    const Vec dx = lanes(Vec::loadu(rows.x + j, len) - Vec(shift_x));
    const Vec dy = lanes(Vec::loadu(rows.y + j, len) - Vec(shift_y));
    if (rows.valid != nullptr) count += lanes(Vec(1));
    sum_dx += dx;
    sum_dy += dy;
    sum_dxx = at::vec::fmadd(dx, dx, sum_dxx);
    sum_dyy = at::vec::fmadd(dy, dy, sum_dyy);
    sum_dxy = at::vec::fmadd(dx, dy, sum_dxy);
  }
  const acc_t n = rows.valid != nullptr ? horizontal_sum(count) : static_cast<acc_t>(end - first);
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
    d.lanes(per_timestep_loss(k, d.dx, d.dy)).store(out + j, len);
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
    const Vec gv = d.lanes(Vec::loadu(g + j, len));
    p = at::vec::fmadd(gv * d.dx, d.dy, p);
    gx = at::vec::fmadd(gv, d.dx, gx);
    gy = at::vec::fmadd(gv, d.dy, gy);
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
  for (int64_t j = 0; j < steps; j += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), steps - j);
    const StepDeviations<acc_t> d(rows, j, len, coef.centre_x, coef.centre_y);
    const Vec cross = g != nullptr ? coef.cross(Vec::loadu(g + j, len)) : Vec(coef.b);
    if (grad_x != nullptr) d.lanes(coef.input_gradient(d.dx, d.dy, cross)).store(grad_x + j, len);
    if (grad_y != nullptr) d.lanes(coef.target_gradient(d.dx, d.dy, cross)).store(grad_y + j, len);
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

// The gradient rows of one thread's sequences, written into grad_input and / or grad_target (an empty tensor is
// not wanted); shared by the forward that writes the gradient and the backward, so both give the same bits.
template <typename scalar_t>
class GradientOutputs {
 public:
  using acc_t = acc_type<scalar_t>;
  GradientOutputs(const CorrelationProblem& p, at::Tensor& grad_input, at::Tensor& grad_target)
      : steps_(p.time), x_(output_row(p, grad_input)), y_(output_row(p, grad_target)) {}

  // g: the per-step upstream gradient of the sequence, or nullptr.
  void write(const SequenceRows<scalar_t>& rows, int64_t seq, const GradientCoefficients<acc_t>& coef,
             const acc_t* g) {
    gradient_rows(rows, steps_, coef, g, x_.begin(seq), y_.begin(seq));
    x_.finish();
    y_.finish();
  }

 private:
  static OutputRow<scalar_t> output_row(const CorrelationProblem& p, at::Tensor& gradient) {
    const bool wanted = gradient.numel() > 0;
    return {data_or_null<scalar_t>(gradient, wanted), wanted ? sequence_layout(gradient, p.channels) : RowLayout{},
            p.time};
  }

  int64_t steps_;
  OutputRow<scalar_t> x_, y_;
};

// The total weight of the reduction before any moments are known, for the forward that writes the gradient of
// 'mean': a sequence's weight (sequence_weight) needs only its count of valid steps, which the mask alone
// decides. Summed in the blocks and order of forward_sequences' total, so it has the same bits.
template <typename acc_t>
acc_t total_weight_before_moments(const CorrelationProblem& p, const CorrelationConfig<acc_t>& cfg) {
  const bool* mask = p.mask.has_value() ? p.mask->const_data_ptr<bool>() : nullptr;
  const bool counts_steps = cfg.per_timestep && mask != nullptr;
  const auto total = deterministic_parallel_sum<acc_t, 1>(
      p.sequences(), items_per_block(p.time), [&](int64_t begin, int64_t end) {
        Moments<acc_t> counted;  // only its count n enters sequence_weight
        counted.n = static_cast<acc_t>(p.time);
        int64_t counted_batch = -1;
        acc_t weight_sum = 0;
        for (int64_t seq = begin; seq < end; ++seq) {
          const int64_t b = seq / p.channels;  // the D channels of a batch entry share its mask row
          if (counts_steps && b != counted_batch) {
            const bool* row = mask + b * p.mask_layout.outer_stride;
            int64_t valid_steps = 0;
            for (int64_t t = 0; t < p.time; ++t) valid_steps += is_valid_step(row, t * p.mask_layout.class_stride);
            counted.n = static_cast<acc_t>(valid_steps);
            counted_batch = b;
          }
          weight_sum += sequence_weight(cfg, counted);
        }
        return std::array<acc_t, 1>{weight_sum};
      });
  return total[0];
}

// The forward; with a non-empty grad_input and / or grad_target (a reduced loss) it also writes the gradient
// for grad_loss = 1, scaled exactly as backward_sequences would scale it.
template <typename scalar_t>
void forward_sequences(const CorrelationProblem& p, at::Tensor& loss, at::Tensor& moments, at::Tensor& total_weight,
                       at::Tensor& grad_input, at::Tensor& grad_target) {
  using acc_t = acc_type<scalar_t>;
  const auto cfg = p.config<acc_t>();
  const bool write_gradient = grad_input.numel() > 0 || grad_target.numel() > 0;
  const bool mean = p.reduction == Reduction::Mean;
  const acc_t gradient_total_weight = write_gradient && mean ? total_weight_before_moments(p, cfg) : acc_t(1);
  acc_t* stats = moments.data_ptr<acc_t>();
  scalar_t* sequence_losses = data_or_null<scalar_t>(loss, p.reduction == Reduction::None && !p.per_timestep);
  scalar_t* step_losses = data_or_null<scalar_t>(loss, p.per_step_output());
  const RowLayout step_layout = p.per_step_output() ? sequence_layout(loss, p.channels) : RowLayout{};

  const auto sums = deterministic_parallel_sum<acc_t, 2>(
      p.sequences(), items_per_block(p.time), [&](int64_t begin, int64_t end) {
        acc_t weighted_loss_and_weight[2] = {0, 0};
        SequenceRows<scalar_t> rows(p);
        OutputRow<scalar_t> out(step_losses, step_layout, p.time);
        GradientOutputs<scalar_t> gradients(p, grad_input, grad_target);
        for (int64_t seq = begin; seq < end; ++seq) {
          rows.read(seq);
          const Moments<acc_t> m = sequence_moments(rows, p.time);
          const acc_t value = finish_sequence(cfg, m, stats + seq * Moments<acc_t>::kWidth, weighted_loss_and_weight);
          if (sequence_losses != nullptr) sequence_losses[seq] = static_cast<scalar_t>(value);
          if (acc_t* row = out.begin(seq)) {
            per_timestep_losses(rows, p.time, m, correlation_scale(cfg, m) * m.n, row);
            out.finish();
          }
          if (write_gradient) {
            const GradientCoefficients<acc_t> coef = sequence_gradient_coefficients(
                cfg, m, /*per_sequence_upstream=*/false, mean, acc_t(1), gradient_total_weight);
            gradients.write(rows, seq, coef, nullptr);
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

  at::parallel_for(0, p.sequences(), items_per_block(p.time), [&](int64_t begin, int64_t end) {
    SequenceRows<scalar_t> rows(p);
    GradientOutputs<scalar_t> gradients(p, grad_input, grad_target);
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
        coef = sequence_gradient_coefficients(cfg, m, per_sequence_upstream, p.reduction == Reduction::Mean, upstream,
                                              weight_total);
      }
      gradients.write(rows, seq, coef, g);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& mask, c10::string_view kind,
    c10::string_view reduction, bool per_timestep, double eps, bool write_input_gradient,
    bool write_target_gradient) {
  const CorrelationProblem p = make_correlation_problem(input, target, mask, kind, reduction, per_timestep, eps);
  at::Tensor loss = allocate_correlation_loss(p);
  at::Tensor moments = allocate_moments(p);
  at::Tensor total_weight = at::empty({}, moments.options());
  at::Tensor grad_input = allocate_forward_gradient(p.input, "write_input_gradient", write_input_gradient, p.reduction);
  at::Tensor grad_target =
      allocate_forward_gradient(p.target, "write_target_gradient", write_target_gradient, p.reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss", [&] {
    forward_sequences<scalar_t>(p, loss, moments, total_weight, grad_input, grad_target);
  });
  return {loss, moments, total_weight, grad_input, grad_target};
}

// Writes the gradients for grad_loss into the non-empty ones of grad_input and grad_target.
void backward_into(const CorrelationProblem& p, const at::Tensor& grad_loss, const at::Tensor& stats,
                   const at::Tensor& total_weight, at::Tensor& grad_input, at::Tensor& grad_target) {
  if (grad_input.numel() == 0 && grad_target.numel() == 0) return;
  const at::Tensor grad = upstream_gradient(p, grad_loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "correlation_loss_backward", [&] {
    backward_sequences<scalar_t>(p, grad, stats.contiguous(), total_weight, grad_input, grad_target);
  });
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
  backward_into(p, grad_loss, stats, total_weight, grad_input, grad_target);
  return {grad_input, grad_target};
}

void backward_inplace_cpu(const at::Tensor& grad_loss, at::Tensor& grad_input, at::Tensor& grad_target,
                          const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& mask,
                          const at::Tensor& stats, const at::Tensor& total_weight, c10::string_view kind,
                          c10::string_view reduction, bool per_timestep, double eps, bool input_requires_grad,
                          bool target_requires_grad) {
  InplaceBackwardArguments args =
      check_inplace_backward_arguments(grad_loss, grad_input, grad_target, input, target, mask, stats, total_weight,
                                       kind, reduction, per_timestep, eps, input_requires_grad, target_requires_grad);
  if (is_unit_grad_loss_cpu(grad_loss)) return;
  backward_into(args.problem, grad_loss, stats, total_weight, args.grad_input, args.grad_target);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("correlation_loss", &forward_cpu);
  m.impl("correlation_loss_backward", &backward_cpu);
  m.impl("correlation_loss_backward_inplace", &backward_inplace_cpu);
}

}  // namespace fused_losses::cpu
