// CPU kernels of fused_losses::correlation_loss (Pearson and CCC): sequences in parallel, each read once.
// A sequence is processed in blocks of kBlockSteps steps that stay in L1: one vectorised pass over a block
// gives its exact moments, and Chan merges combine the blocks (stable in float32 far from zero).
// Schedules (common.h): with write_input_gradient / write_target_gradient (a reduced loss) the forward also
// writes the gradient for grad_loss = 1, sweeping each sequence's rows a second time right after its moments,
// while they are in cache; for 'mean' a cheap pre-pass over the mask gives the divisor first. The in-place
// backward keeps that gradient for grad_loss = 1 and otherwise recomputes it exactly as the 3-pass backward.
// The loops read and write the rows in their own dtype, a vector at a time (bf16 / fp16 converted to float in
// registers); full vectors of an unmasked sequence take no lane selection, only a row's last partial vector does.
#include "correlation_loss.h"
#include "cpu/cpu_rows.h"
#include "cpu/huge_pages.h"

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

// `count` consecutive steps of a row as accumulation-type vectors: one vector of scalar_t, loaded at once and
// converted in registers (two float vectors for bf16 / fp16, one vector otherwise).
template <typename scalar_t>
struct StepPack {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kSteps = kVecs * Vec::size();
  static_assert(Vectorized<scalar_t>::size() == kSteps);

  Vec v[kVecs];

  // The steps [0, count) of src, zeros after them (count < kSteps only for a row's last pack).
  static StepPack load(const scalar_t* src, int64_t count) {
    StepPack pack;
    if constexpr (kReduced) {
      std::tie(pack.v[0], pack.v[1]) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src, count));
    } else {
      pack.v[0] = Vec::loadu(src, count);
    }
    return pack;
  }

  // The same from a row already in acc_t (the mask as 1 / 0, a per-step upstream gradient).
  static StepPack load_acc(const acc_t* src, int64_t count) {
    StepPack pack;
    for (int k = 0; k < kVecs; ++k) {
      const int64_t lanes = std::clamp<int64_t>(count - k * Vec::size(), 0, Vec::size());
      pack.v[k] = Vec::loadu(src + k * Vec::size(), lanes);
    }
    return pack;
  }

  void store(scalar_t* dst, int64_t count) const {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(dst, count);
    } else {
      v[0].store(dst, count);
    }
  }
};

// Lane selection of the full packs of an unmasked sequence: every step counts, nothing to select.
struct AllSteps {
  static constexpr bool kSelects = false;
  template <typename V>
  const V& operator()(const V& v, int) const {
    return v;
  }
};

// Lane selection of a masked pack or of a row's last partial pack: v on the steps that count, 0 elsewhere (so
// NaN in padding never leaks).
template <typename scalar_t>
class SelectedSteps {
 public:
  using Pack = StepPack<scalar_t>;
  using Vec = typename Pack::Vec;
  static constexpr bool kSelects = true;

  // The valid steps among [0, count) of a mask row (1 / 0 per step); nullptr: every step before count.
  SelectedSteps(const typename Pack::acc_t* valid, int64_t count) {
    const Pack mask = valid != nullptr ? Pack::load_acc(valid, count) : Pack{};
    for (int k = 0; k < Pack::kVecs; ++k) {
      keep_[k] = valid != nullptr ? mask.v[k] != Vec(0) : Vec::arange(k * Vec::size(), 1) < Vec(count);
    }
  }
  Vec operator()(const Vec& v, int k) const { return Vec::blendv(Vec(0), v, keep_[k]); }

 private:
  Vec keep_[Pack::kVecs];
};

// Calls body(j, count, select) for the packs of steps [begin, end) of a row: count = kSteps but for the last
// pack, and select(v, k) keeps the k-th vector's lanes that count (AllSteps for the full packs of an unmasked
// row, so that its hot loop has no selection and no branch). valid: the row's mask as 1 / 0, or nullptr.
template <typename scalar_t, typename Body>
void for_each_pack(const acc_type<scalar_t>* valid, int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t kSteps = StepPack<scalar_t>::kSteps;
  const int64_t full_end = begin + (end - begin) / kSteps * kSteps;
  int64_t j = begin;
  if (valid == nullptr) {
    for (; j < full_end; j += kSteps) body(j, kSteps, AllSteps{});
  } else {
    for (; j < full_end; j += kSteps) body(j, kSteps, SelectedSteps<scalar_t>(valid + j, kSteps));
  }
  if (j < end) body(j, end - j, SelectedSteps<scalar_t>(valid != nullptr ? valid + j : nullptr, end - j));
}

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Sum over the lanes of the vectors of a pack-shaped accumulator.
template <typename acc_t, int N>
acc_t horizontal_sum(const Vectorized<acc_t> (&v)[N]) {
  Vectorized<acc_t> total = v[0];
  for (int k = 1; k < N; ++k) total += v[k];
  return horizontal_sum(total);
}

// A row of `count` contiguous steps: `src` itself when its stride is 1, else gathered into `buffer`.
template <typename scalar_t>
const scalar_t* contiguous_row(const scalar_t* src, int64_t stride, int64_t count, std::vector<scalar_t>& buffer) {
  if (stride == 1) return src;
  buffer.resize(count);
  for (int64_t j = 0; j < count; ++j) buffer[j] = src[j * stride];
  return buffer.data();
}

// The rows of one sequence as contiguous scalar_t arrays (views of the tensors when their steps are contiguous)
// and its mask row as 1 / 0 values, with the buffers of one thread.
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
    x = contiguous_row(input_ + p_.input_layout.row_offset(seq), p_.input_layout.class_stride, p_.time, x_buffer_);
    y = contiguous_row(target_ + p_.target_layout.row_offset(seq), p_.target_layout.class_stride, p_.time,
                       y_buffer_);
    valid = mask_ != nullptr ? read_mask(seq / p_.channels) : nullptr;
  }

  const scalar_t* x = nullptr;
  const scalar_t* y = nullptr;
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
  std::vector<scalar_t> x_buffer_, y_buffer_;
  std::vector<acc_t> valid_buffer_;
};

// Exact moments of steps [begin, end) in one vectorised pass of sums of deviations from a shift, the block's
// first valid step. Shifting by a data value bounds the cancellation in sum d^2 - (sum d)^2 / n to about
// n ulps of the result, so blocks stay short (kBlockSteps) and Chan merges combine them.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Moments<acc_t> block_moments(const SequenceRows<scalar_t>& rows, int64_t begin, int64_t end) {
  using Pack = StepPack<scalar_t>;
  using Vec = typename Pack::Vec;
  constexpr int kVecs = Pack::kVecs;
  int64_t first = begin;
  if (rows.valid != nullptr) {
    while (first < end && rows.valid[first] == acc_t(0)) ++first;
  }
  if (first == end) return {};
  const acc_t shift_x = static_cast<acc_t>(rows.x[first]), shift_y = static_cast<acc_t>(rows.y[first]);
  Vec counted[kVecs], sum_dx[kVecs], sum_dy[kVecs], sum_dxx[kVecs], sum_dyy[kVecs], sum_dxy[kVecs];
  for (int k = 0; k < kVecs; ++k) counted[k] = sum_dx[k] = sum_dy[k] = sum_dxx[k] = sum_dyy[k] = sum_dxy[k] = Vec(0);
  int64_t unselected_steps = 0;  // steps of the packs that take no selection (all valid)
  for_each_pack<scalar_t>(rows.valid, first, end, [&](int64_t j, int64_t count, const auto& select) {
    const Pack x = Pack::load(rows.x + j, count), y = Pack::load(rows.y + j, count);
    if constexpr (std::decay_t<decltype(select)>::kSelects) {
      for (int k = 0; k < kVecs; ++k) counted[k] += select(Vec(1), k);
    } else {
      unselected_steps += count;
    }
    for (int k = 0; k < kVecs; ++k) {
      const Vec dx = select(x.v[k] - Vec(shift_x), k), dy = select(y.v[k] - Vec(shift_y), k);
      sum_dx[k] += dx;
      sum_dy[k] += dy;
      sum_dxx[k] = at::vec::fmadd(dx, dx, sum_dxx[k]);
      sum_dyy[k] = at::vec::fmadd(dy, dy, sum_dyy[k]);
      sum_dxy[k] = at::vec::fmadd(dx, dy, sum_dxy[k]);
    }
  });
  const acc_t n = static_cast<acc_t>(unselected_steps) + horizontal_sum(counted);
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
                         scalar_t* out) {
  using Pack = StepPack<scalar_t>;
  const Centre<acc_t> centre_x = m.centre_x(), centre_y = m.centre_y();
  for_each_pack<scalar_t>(rows.valid, 0, steps, [&](int64_t j, int64_t count, const auto& select) {
    const Pack x = Pack::load(rows.x + j, count), y = Pack::load(rows.y + j, count);
    Pack losses;
    for (int v = 0; v < Pack::kVecs; ++v) {
      losses.v[v] = select(per_timestep_loss(k, centre_x.deviation(x.v[v]), centre_y.deviation(y.v[v])), v);
    }
    losses.store(out + j, count);
  });
}

// (P, Gx, Gy) of one sequence for the per-timestep backward, from the per-step upstream gradient g.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
UpstreamSums<acc_t> upstream_sums(const SequenceRows<scalar_t>& rows, int64_t steps, const Moments<acc_t>& m,
                                  const acc_t* g) {
  using Pack = StepPack<scalar_t>;
  using Vec = typename Pack::Vec;
  const Centre<acc_t> centre_x = m.centre_x(), centre_y = m.centre_y();
  Vec p[Pack::kVecs], gx[Pack::kVecs], gy[Pack::kVecs];
  for (int k = 0; k < Pack::kVecs; ++k) p[k] = gx[k] = gy[k] = Vec(0);
  for_each_pack<scalar_t>(rows.valid, 0, steps, [&](int64_t j, int64_t count, const auto& select) {
    const Pack x = Pack::load(rows.x + j, count), y = Pack::load(rows.y + j, count);
    const Pack upstream = Pack::load_acc(g + j, count);
    for (int k = 0; k < Pack::kVecs; ++k) {
      const Vec dx = select(centre_x.deviation(x.v[k]), k), dy = select(centre_y.deviation(y.v[k]), k);
      const Vec gv = select(upstream.v[k], k);
      p[k] = at::vec::fmadd(gv * dx, dy, p[k]);
      gx[k] = at::vec::fmadd(gv, dx, gx[k]);
      gy[k] = at::vec::fmadd(gv, dy, gy[k]);
    }
  });
  UpstreamSums<acc_t> sums;
  sums.p = horizontal_sum(p);
  sums.gx = horizontal_sum(gx);
  sums.gy = horizontal_sum(gy);
  return sums;
}

// Gradient rows of one sequence (either output may be nullptr); g is the per-step upstream or nullptr.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void gradient_rows(const SequenceRows<scalar_t>& rows, int64_t steps, const GradientCoefficients<acc_t>& coef,
                   const acc_t* g, scalar_t* grad_x, scalar_t* grad_y) {
  using Pack = StepPack<scalar_t>;
  using Vec = typename Pack::Vec;
  for_each_pack<scalar_t>(rows.valid, 0, steps, [&](int64_t j, int64_t count, const auto& select) {
    const Pack x = Pack::load(rows.x + j, count), y = Pack::load(rows.y + j, count);
    Pack cross;
    if (g != nullptr) {
      const Pack upstream = Pack::load_acc(g + j, count);
      for (int k = 0; k < Pack::kVecs; ++k) cross.v[k] = coef.cross(upstream.v[k]);
    } else {
      for (int k = 0; k < Pack::kVecs; ++k) cross.v[k] = Vec(coef.b);
    }
    Pack dx, dy;
    for (int k = 0; k < Pack::kVecs; ++k) {
      dx.v[k] = coef.centre_x.deviation(x.v[k]);
      dy.v[k] = coef.centre_y.deviation(y.v[k]);
    }
    if (grad_x != nullptr) {
      Pack gradient;
      for (int k = 0; k < Pack::kVecs; ++k) gradient.v[k] = select(coef.input_gradient(dx.v[k], dy.v[k], cross.v[k]), k);
      gradient.store(grad_x + j, count);
    }
    if (grad_y != nullptr) {
      Pack gradient;
      for (int k = 0; k < Pack::kVecs; ++k) gradient.v[k] = select(coef.target_gradient(dx.v[k], dy.v[k], cross.v[k]), k);
      gradient.store(grad_y + j, count);
    }
  });
}

// Where one sequence's row of a (B, T, D) output goes: the row itself when its steps are contiguous, else a
// buffer that finish() scatters to it.
template <typename scalar_t>
class OutputRow {
 public:
  OutputRow(scalar_t* base, RowLayout layout, int64_t steps) : base_(base), layout_(layout), steps_(steps) {}
  scalar_t* begin(int64_t seq) {
    if (base_ == nullptr) return nullptr;
    row_ = base_ + layout_.row_offset(seq);
    if (layout_.class_stride == 1) return row_;
    buffer_.resize(steps_);
    return buffer_.data();
  }
  void finish() {
    if (base_ == nullptr || layout_.class_stride == 1) return;
    for (int64_t j = 0; j < steps_; ++j) row_[j * layout_.class_stride] = buffer_[j];
  }

 private:
  scalar_t* base_;
  RowLayout layout_;
  int64_t steps_;
  scalar_t* row_ = nullptr;
  std::vector<scalar_t> buffer_;
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
      p.sequences(), items_per_block(p.time, p.sequences()), [&](int64_t begin, int64_t end) {
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
      p.sequences(), items_per_block(p.time, p.sequences()), [&](int64_t begin, int64_t end) {
        acc_t weighted_loss_and_weight[2] = {0, 0};
        SequenceRows<scalar_t> rows(p);
        OutputRow<scalar_t> out(step_losses, step_layout, p.time);
        GradientOutputs<scalar_t> gradients(p, grad_input, grad_target);
        for (int64_t seq = begin; seq < end; ++seq) {
          rows.read(seq);
          const Moments<acc_t> m = sequence_moments(rows, p.time);
          const acc_t value = finish_sequence(cfg, m, stats + seq * Moments<acc_t>::kWidth, weighted_loss_and_weight);
          if (sequence_losses != nullptr) sequence_losses[seq] = static_cast<scalar_t>(value);
          if (scalar_t* row = out.begin(seq)) {
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
  // Scalars written in place: a fill_ is a dispatched op, microseconds that count in a small call.
  *total_weight.data_ptr<acc_t>() = sums[1];
  if (p.reduction == Reduction::Mean) *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(sums[0] / sums[1]);
  if (p.reduction == Reduction::Sum) *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(sums[0]);
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

  at::parallel_for(0, p.sequences(), items_per_block(p.time, p.sequences()), [&](int64_t begin, int64_t end) {
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
  advise_huge_pages(loss);
  advise_huge_pages(grad_input);
  advise_huge_pages(grad_target);
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
  advise_huge_pages(grad_input);
  advise_huge_pages(grad_target);
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
