// CPU kernels of fused_losses::weighted_bce_with_logits: the flat element range in fixed blocks run in
// parallel; each block walks its runs of the (merged) innermost dimension in tiles of kTile elements, converts
// every operand of the tile to the accumulation type in a small buffer (in place when it already is one),
// and evaluates bce_math.h on at::vec::Vectorized lanes. Sparse targets are scattered into the tile's target
// buffer from the row's index list, so no dense target is built. The forward sums the fixed blocks in block
// order (deterministic_parallel_sum): the result does not depend on the thread count. With write_gradient it
// also writes the gradient for grad_loss = 1 from the same tile (the 2-pass schedule of common.h).
#include "cpu/cpu_rows.h"
#include "cpu/huge_pages.h"
#include "weighted_bce_with_logits.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace fused_losses::cpu {
namespace {

using at::vec::Vectorized;

// bce_math.h's elementary functions on vector lanes. In float32 they trade a few ulps for speed, which the
// float32 result does not see: exp is PyTorch's 20-ulp polynomial (results below FLT_MIN flush to 0) and the
// softplus tail uses bce_math.h's log1p_unit_interval_series (within 3 ulps over [1e-37, 1] against float64;
// Sleef's general log1p is several times slower, the forward's hot spot). float64 keeps Sleef's 1-ulp functions.
template <typename acc_t>
struct VecMath {
  using Value = Vectorized<acc_t>;
  using Mask = Vectorized<acc_t>;
  static Value exp(Value x) { return x.exp_u20(); }
  static Value log(Value x) { return x.log(); }
  static Value log1p(Value x) { return x.log1p(); }
  static Value log1p_unit_interval(Value x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return log1p_unit_interval_series<VecMath>(x);
    } else {
      return x.log1p();
    }
  }
  static Value fma(Value a, Value b, Value c) { return at::vec::fmadd(a, b, c); }
  static Value abs(Value x) { return x.abs(); }
  static Value min(Value a, Value b) { return at::vec::minimum(a, b); }
  static Value max(Value a, Value b) { return at::vec::maximum(a, b); }
  static Mask greater(Value a, Value b) { return a > b; }
  static Mask greater_equal(Value a, Value b) { return a >= b; }
  static Value select(Mask condition, Value if_true, Value if_false) {
    return Value::blendv(if_false, if_true, condition);
  }
};

constexpr int64_t kTile = 256;  // elements converted and evaluated together (a few KB, in L1)

// The elements of one block of the parallel loops and of the deterministic sum: whole tiles (items_per_block).
inline int64_t block_elements_of(const BceProblem& p) {
  return items_per_block(kTile, ceil_div(p.numel, kTile)) * kTile;
}

// One tile's operands as accumulation-type arrays; nullptr for an absent weight, or for a uniform scale.
template <typename acc_t>
struct Tile {
  const acc_t* logits;
  const acc_t* target;
  const acc_t* weight;
  const acc_t* pos_weight;
  const acc_t* scale;
};

// Reads tiles of the problem's operands; one per thread (it owns the conversion buffers). The data pointers
// and inner strides are looked up once: a tile is only 256 elements.
template <typename scalar_t, typename target_t>
class TileReader {
 public:
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kSparse = std::is_same_v<target_t, SparseTargets>;

  explicit TileReader(const BceProblem& p)
      : p_(p),
        logits_(p, kLogits),
        target_(p, kTarget),
        weight_(p, kWeight),
        pos_weight_(p, kPosWeight),
        grad_loss_(p, kGradLoss),
        indices_(kSparse ? p.positive_indices->const_data_ptr<int64_t>() : nullptr) {}

  Tile<acc_t> read(int64_t flat, int64_t count, const int64_t (&offsets)[kNumBceOperands]) {
    Tile<acc_t> tile;
    tile.logits = logits_.read(offsets, count);
    tile.target = kSparse ? sparse_target(flat, count) : target_.read(offsets, count);
    tile.weight = weight_.read(offsets, count);
    tile.pos_weight = pos_weight_.read(offsets, count);
    tile.scale = grad_loss_.read(offsets, count);
    return tile;
  }

 private:
  // One operand stored as T: its tiles as acc_t arrays (nullptr when absent).
  template <typename T>
  struct Operand {
    const T* data = nullptr;
    int64_t stride = 0;
    BceOperand which;
    std::vector<acc_t> buffer;

    Operand(const BceProblem& p, BceOperand operand) : which(operand) {
      if constexpr (!std::is_same_v<T, SparseTargets>) {
        data = p.data<T>(operand);
        stride = p.layout.inner_stride(operand);
        buffer.reserve(kTile);
      }
    }
    const acc_t* read(const int64_t (&offsets)[kNumBceOperands], int64_t count) {
      if constexpr (std::is_same_v<T, SparseTargets>) {
        return nullptr;
      } else {
        return data != nullptr ? row_as_acc<acc_t>(data + offsets[which], stride, count, buffer) : nullptr;
      }
    }
  };

  // The tile's 0 / 1 targets from its row's index list. Runs never cross a row in the sparse layout; a label
  // listed twice is set twice: the row is a set.
  const acc_t* sparse_target(int64_t flat, int64_t count) {
    const int64_t row = flat / p_.num_labels, first_label = flat % p_.num_labels;
    sparse_buffer_.assign(count, acc_t(0));
    const int64_t* row_indices = indices_ + row * p_.max_positives;
    for (int64_t k = 0; k < p_.max_positives; ++k) {
      const int64_t label = row_indices[k];
      if (label >= first_label && label < first_label + count) sparse_buffer_[label - first_label] = acc_t(1);
    }
    return sparse_buffer_.data();
  }

  const BceProblem& p_;
  Operand<scalar_t> logits_;
  Operand<target_t> target_;
  Operand<acc_t> weight_, pos_weight_;
  Operand<scalar_t> grad_loss_;
  const int64_t* indices_;
  std::vector<acc_t> sparse_buffer_;
};

// Loads lanes [j, j + n) of an optional tile array; `absent` where there is none.
template <typename acc_t>
Vectorized<acc_t> load_or(const acc_t* values, int64_t j, int64_t n, acc_t absent) {
  return values != nullptr ? Vectorized<acc_t>::loadu(values + j, n) : Vectorized<acc_t>(absent);
}

// Evaluates `element(z, y, w, q)` (a bce_math.h formula) over a tile, lanes [j, j + n) at a time, and hands
// each vector of values to `consume(j, n, values)`.
template <typename acc_t, typename Element, typename Consume>
void evaluate_tile(const Tile<acc_t>& tile, int64_t count, const Element& element, const Consume& consume) {
  using Vec = Vectorized<acc_t>;
  for (int64_t j = 0; j < count; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), count - j);
    consume(j, n,
            element(Vec::loadu(tile.logits + j, n), Vec::loadu(tile.target + j, n), load_or(tile.weight, j, n, acc_t(1)),
                    load_or(tile.pos_weight, j, n, acc_t(1))));
  }
}

// The forward: per-element losses ('none') or their sum, and with a defined `gradient` (a reduced loss) the
// gradient for grad_loss = 1 from the same evaluation of sigmoid, scaled exactly as backward_tiles would.
template <typename scalar_t, typename target_t>
void forward_tiles(const BceProblem& p, at::Tensor& loss, at::Tensor& gradient) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const BceConfig<acc_t> cfg = p.config<acc_t>();
  const bool write_gradient = gradient.numel() > 0;
  scalar_t* out_values = write_gradient                    ? gradient.data_ptr<scalar_t>()
                         : p.reduction == Reduction::None ? loss.data_ptr<scalar_t>()
                                                          : nullptr;
  const Vec gradient_scale(static_cast<acc_t>(1.0 / bce_reduction_divisor(p)));
  const auto loss_only = [&](Vec z, Vec y, Vec w, Vec q) {
    return LossAndGrad<Vec>{bce_element_loss<VecMath<acc_t>>(cfg, z, y, w, q), Vec(0)};
  };
  const auto loss_and_grad = [&](Vec z, Vec y, Vec w, Vec q) {
    return bce_element_loss_and_grad<VecMath<acc_t>>(cfg, z, y, w, q);
  };

  const int64_t block_elements = block_elements_of(p);
  const auto total = deterministic_parallel_sum<acc_t, 1>(p.numel, block_elements, [&](int64_t begin, int64_t end) {
    TileReader<scalar_t, target_t> reader(p);
    std::vector<acc_t> out_buffer;
    double block_total = 0;  // the tiles' sums of the block
    const auto run_tile = [&](int64_t flat, int64_t count, const int64_t (&offsets)[kNumBceOperands],
                              const auto& element) {
      const Tile<acc_t> tile = reader.read(flat, count, offsets);
      acc_t* out = out_values != nullptr ? row_output<acc_t>(out_values + flat, 1, count, out_buffer) : nullptr;
      Vec tile_sum(0);
      evaluate_tile(tile, count, element, [&](int64_t j, int64_t n, const LossAndGrad<Vec>& values) {
        tile_sum = tile_sum + Vec::set(Vec(0), values.loss, n);  // the tail's padding lanes must not count
        if (out != nullptr) (write_gradient ? values.grad * gradient_scale : values.loss).store(out + j, n);
      });
      block_total += at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, tile_sum);
      if (out != nullptr) store_row(out, out_values + flat, 1, count);
    };
    for_each_run(p.layout, begin, end, kTile, [&](int64_t flat, int64_t count, const int64_t (&offsets)[kNumBceOperands]) {
      if (write_gradient) {
        run_tile(flat, count, offsets, loss_and_grad);
      } else {
        run_tile(flat, count, offsets, loss_only);
      }
    });
    return std::array<double, 1>{block_total};
  });
  if (p.reduction != Reduction::None) loss.fill_(total[0] / static_cast<acc_t>(bce_reduction_divisor(p)));
}

template <typename scalar_t, typename target_t>
void backward_tiles(const BceProblem& p, at::Tensor& grad_input) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const BceConfig<acc_t> cfg = p.config<acc_t>();
  // 'none' reads a scale per element (the grad_loss operand); otherwise one scale for all.
  const acc_t uniform_scale =
      p.grad_loss.has_value() ? acc_t(1)
                              : static_cast<acc_t>(p.grad_loss_scalar->item<double>() / bce_reduction_divisor(p));
  scalar_t* grad = grad_input.data_ptr<scalar_t>();
  const auto element = [&](Vec z, Vec y, Vec w, Vec q) { return bce_element_grad<VecMath<acc_t>>(cfg, z, y, w, q); };

  at::parallel_for(0, p.numel, block_elements_of(p), [&](int64_t begin, int64_t end) {
    TileReader<scalar_t, target_t> reader(p);
    std::vector<acc_t> out_buffer;
    for_each_run(p.layout, begin, end, kTile, [&](int64_t flat, int64_t count, const int64_t (&offsets)[kNumBceOperands]) {
      const Tile<acc_t> tile = reader.read(flat, count, offsets);
      acc_t* out = row_output<acc_t>(grad + flat, 1, count, out_buffer);
      evaluate_tile(tile, count, element, [&](int64_t j, int64_t n, Vec values) {
        (values * load_or(tile.scale, j, n, uniform_scale)).store(out + j, n);
      });
      store_row(out, grad + flat, 1, count);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                               const std::optional<at::Tensor>& positive_indices,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& pos_weight, c10::string_view reduction,
                                               double gamma_pos, double gamma_neg, double clip, bool write_gradient) {
  const BceProblem p =
      make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos, gamma_neg, clip);
  check_positive_index_values(p);
  at::Tensor loss = allocate_bce_loss(p);
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  advise_huge_pages(loss);
  advise_huge_pages(gradient);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits", [&] {
    dispatch_bce_target<scalar_t>(p, [&](auto target_tag) {
      forward_tiles<scalar_t, decltype(target_tag)>(p, loss, gradient);
    });
  });
  return {loss, gradient};
}

void backward_into(const BceProblem& p, at::Tensor& grad_input) {
  if (p.numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits_backward",
                                  [&] {
                                    dispatch_bce_target<scalar_t>(p, [&](auto target_tag) {
                                      backward_tiles<scalar_t, decltype(target_tag)>(p, grad_input);
                                    });
                                  });
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& positive_indices, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& pos_weight, c10::string_view reduction, double gamma_pos,
                        double gamma_neg, double clip) {
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  check_positive_index_values(p);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  advise_huge_pages(grad_input);
  backward_into(p, grad_input);
  return grad_input;
}

void backward_inplace_cpu(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                          const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& positive_indices,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                          c10::string_view reduction, double gamma_pos, double gamma_neg, double clip) {
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  if (is_unit_grad_loss_cpu(*p.grad_loss_scalar)) return;
  check_positive_index_values(p);
  backward_into(p, gradient);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("weighted_bce_with_logits", &forward_cpu);
  m.impl("weighted_bce_with_logits_backward", &backward_cpu);
  m.impl("weighted_bce_with_logits_backward_inplace", &backward_inplace_cpu);
}

}  // namespace fused_losses::cpu
