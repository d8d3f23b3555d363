// CPU kernels of fused_losses::cost_sensitive_cross_entropy: rows in parallel, vectorised scans per row.
#include "cost_sensitive_cross_entropy.h"
#include "cpu/cpu_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace fused_losses::cpu {
namespace {

using at::vec::Vectorized;

// Scans one contiguous row of accumulation-type logits. The common case (finite max) uses vector loops;
// rows containing NaN or infinities take the element-wise RowScan, whose edge cases follow F.cross_entropy.
template <typename acc_t>
RowScan<acc_t> scan_row(const CrossEntropyConfig<acc_t>& cfg, const acc_t* z, int64_t target) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = cfg.num_classes;
  const acc_t* cost_row = cfg.cost != nullptr ? cfg.cost + target * C : nullptr;
  const bool need_argmax = cfg.cost != nullptr && cfg.mode == CostMode::Argmax;
  const bool need_cost_exp = cfg.cost != nullptr && cfg.mode == CostMode::Expected;
  const bool need_logit_sum = cfg.label_smoothing != acc_t(0);

  RowScan<acc_t> scan;
  const acc_t max = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, z, C);
  if (!std::isfinite(max)) {
    for (int64_t j = 0; j < C; ++j) {
      scan.add(z[j], j, need_cost_exp ? cost_row[j] : acc_t(0), class_weight_of(cfg, j));
    }
    return scan;
  }
  const Vec max_vec(max);
  scan.max = max;
  scan.sum_exp = at::vec::map_reduce_all<acc_t>([&](Vec x) { return (x - max_vec).exp(); },
                                                [](Vec a, Vec b) { return a + b; }, z, C);
  if (need_cost_exp) {
    scan.cost_exp = at::vec::map2_reduce_all<acc_t>([&](Vec x, Vec c) { return (x - max_vec).exp() * c; },
                                                    [](Vec a, Vec b) { return a + b; }, z, cost_row, C);
  }
  if (need_logit_sum) {
    scan.weighted_logit_sum =
        cfg.class_weight != nullptr
            ? at::vec::map2_reduce_all<acc_t>([](Vec x, Vec w) { return x * w; }, [](Vec a, Vec b) { return a + b; },
                                              z, cfg.class_weight, C)
            : at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, z, C);
  }
  if (need_argmax) {
    int64_t j = 0;
    while (z[j] != max) ++j;  // the max is finite and present, so this stops at the first maximum
    scan.best_index = j;
    scan.best_value = max;
  }
  return scan;
}

[[noreturn]] void throw_invalid_target(int64_t target, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "target contains class index ", target, ", outside [0, ", num_classes,
                    ") and not ignore_index (", ignore_index, ")");
}

template <typename scalar_t>
void forward_rows(const CrossEntropyProblem& p, const CrossEntropyConfig<acc_type<scalar_t>>& cfg, at::Tensor& loss,
                  at::Tensor& row_stats, at::Tensor& total_weight) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.num_classes;
  const scalar_t* input = p.input.const_data_ptr<scalar_t>();
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  acc_t* stats = row_stats.data_ptr<acc_t>();
  scalar_t* row_losses = p.reduction == Reduction::None ? loss.data_ptr<scalar_t>() : nullptr;

  const auto sums = deterministic_parallel_sum<acc_t, 2>(
      p.num_rows, items_per_block(C), [&](int64_t begin, int64_t end) {
        std::array<acc_t, 2> loss_and_weight{};
        std::vector<acc_t> buffer;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t y = target[row];
          acc_t row_loss = 0;
          switch (classify_target(y, C, cfg.ignore_index)) {
            case TargetKind::Ignored:
              store_row_stats(stats + row * p.num_stats, p.num_stats, RowLoss<acc_t>{});
              break;
            case TargetKind::Invalid:
              throw_invalid_target(y, C, cfg.ignore_index);
            case TargetKind::Valid: {
              const acc_t* z = row_as_acc<acc_t>(input + p.layout.row_offset(row), p.layout.class_stride, C, buffer);
              const RowLoss<acc_t> result = finish_row(cfg, scan_row(cfg, z, y), y, z[y]);
              store_row_stats(stats + row * p.num_stats, p.num_stats, result);
              row_loss = result.loss();
              loss_and_weight[0] += row_loss;
              loss_and_weight[1] += class_weight_of(cfg, y);
              break;
            }
          }
          if (row_losses != nullptr) row_losses[row] = static_cast<scalar_t>(row_loss);
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
  using Vec = Vectorized<acc_t>;
  const int64_t C = p.num_classes;
  const scalar_t* input = p.input.const_data_ptr<scalar_t>();
  const int64_t* target = p.target.const_data_ptr<int64_t>();
  const acc_t* stats = row_stats.const_data_ptr<acc_t>();
  scalar_t* grad = grad_input.data_ptr<scalar_t>();
  const RowLayout grad_layout = contiguous_row_layout(grad_input);
  const scalar_t* per_row_grad = p.reduction == Reduction::None ? grad_loss.const_data_ptr<scalar_t>() : nullptr;
  acc_t uniform_scale = 0;
  if (per_row_grad == nullptr) {
    uniform_scale = static_cast<acc_t>(grad_loss.item<double>());
    if (p.reduction == Reduction::Mean) uniform_scale /= total_weight.item<acc_t>();
  }

  at::parallel_for(0, p.num_rows, items_per_block(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buffer, out_buffer;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = target[row];
      scalar_t* grad_row = grad + grad_layout.row_offset(row);
      acc_t* g = row_output<acc_t>(grad_row, grad_layout.class_stride, C, out_buffer);
      const TargetKind kind = classify_target(y, C, cfg.ignore_index);
      if (kind != TargetKind::Valid) {
        const acc_t fill = kind == TargetKind::Ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
        std::fill(g, g + C, fill);
        store_row(g, grad_row, grad_layout.class_stride, C);
        continue;
      }
      const acc_t scale = per_row_grad != nullptr ? static_cast<acc_t>(per_row_grad[row]) : uniform_scale;
      const auto k = make_gradient_coefficients(cfg, stats + row * p.num_stats, p.num_stats, y, scale);
      const acc_t* z = row_as_acc<acc_t>(input + p.layout.row_offset(row), p.layout.class_stride, C, in_buffer);
      const acc_t* cost_row = k.b != acc_t(0) ? cfg.cost + y * C : nullptr;
      const Vec lse(k.lse), a(k.a), b(k.b), d(k.d);
      for (int64_t j = 0; j < C; j += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), C - j);
        const Vec prob = (Vec::loadu(z + j, n) - lse).exp();
        Vec value = cost_row != nullptr ? prob * (a + b * Vec::loadu(cost_row + j, n)) : prob * a;
        if (k.d != acc_t(0)) value = value - (cfg.class_weight != nullptr ? d * Vec::loadu(cfg.class_weight + j, n) : d);
        value.store(g + j, n);
      }
      g[y] -= k.e;
      store_row(g, grad_row, grad_layout.class_stride, C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& cost_matrix,
                                                           const std::optional<at::Tensor>& weight,
                                                           int64_t ignore_index, c10::string_view reduction,
                                                           double label_smoothing, c10::string_view cost_mode) {
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_cost_values(p);
  at::Tensor loss = allocate_loss(p);
  at::Tensor row_stats = allocate_row_stats(p);
  at::Tensor total_weight = at::empty({}, row_stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cost_sensitive_cross_entropy", [&] {
    const auto cfg = make_config<acc_type<scalar_t>>(p, ignore_index, label_smoothing);
    forward_rows<scalar_t>(p, cfg, loss, row_stats, total_weight);
  });
  return {loss, row_stats, total_weight};
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& cost_matrix, const std::optional<at::Tensor>& weight,
                        const at::Tensor& row_stats, const at::Tensor& total_weight, int64_t ignore_index,
                        c10::string_view reduction, double label_smoothing, c10::string_view cost_mode) {
  const CrossEntropyProblem p =
      make_cross_entropy_problem(input, target, cost_matrix, weight, reduction, label_smoothing, cost_mode);
  check_backward_arguments(p, grad_loss, row_stats, total_weight);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor grad = grad_loss.to(p.input.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "cost_sensitive_cross_entropy_backward", [&] {
                                    const auto cfg = make_config<acc_type<scalar_t>>(p, ignore_index, label_smoothing);
                                    backward_rows<scalar_t>(p, cfg, grad, row_stats.contiguous(), total_weight,
                                                            grad_input);
                                  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("cost_sensitive_cross_entropy", &forward_cpu);
  m.impl("cost_sensitive_cross_entropy_backward", &backward_cpu);
}

}  // namespace fused_losses::cpu
