// The float32 BCE formulas of the CUDA kernels (bce_math.h's FastFloatMath) with each approximate primitive
// off by its documented worst error (CUDA C++ Programming Guide, single-precision intrinsics; PTX ISA): the
// emulation's fast primitives are the exact functions, so this is where the device's approximation error is
// tested (tests/test_cuda_emulation.py, test_fast_float_math_accuracy).
#include "bce_math.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

// +1 / -1: every result of that primitive is moved up / down by its bound; 0: exact. Set per call.
struct Directions {
  int exp = 0, log = 0, divide = 0;
};
Directions directions;

// `value` moved `ulps` float32 units in the last place towards +inf (direction > 0) or -inf (< 0).
float move_ulps(float value, int64_t ulps, int direction) {
  const float towards = direction > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < ulps && direction != 0; ++i) value = std::nextafter(value, towards);
  return value;
}

struct WorstCasePrimitives {
  // ex2.approx.ftz of x log2(e): __expf's 2 + floor(|1.173 x|) ulp, and results below 2^-126 flushed to 0.
  static float exp_flush_subnormal(float x) {
    const auto ulps = 2 + static_cast<int64_t>(std::floor(std::abs(1.173 * x)));
    const float result = move_ulps(static_cast<float>(std::exp(static_cast<double>(x))), ulps, directions.exp);
    return std::abs(result) < std::numeric_limits<float>::min() ? 0.0f : result;
  }
  // __logf: absolute error 2^-21.41 for x in [0.5, 2], else 3 ulp.
  static float log(float x) {
    const double exact = std::log(static_cast<double>(x));
    if (x >= 0.5f && x <= 2.0f) return static_cast<float>(exact + directions.log * std::exp2(-21.41));
    return move_ulps(static_cast<float>(exact), 3, directions.log);
  }
  // __fdividef: 2 ulp for |b| in [2^-126, 2^126] (the kernels divide by values in (0, 3]).
  static float divide(float a, float b) {
    return move_ulps(static_cast<float>(static_cast<double>(a) / b), 2, directions.divide);
  }
  // rcp.approx.ftz: 1 ulp for a normal x (moved with the division's direction).
  static float reciprocal(float x) { return move_ulps(static_cast<float>(1.0 / x), 1, directions.divide); }
  static float fma(float a, float b, float c) { return std::fma(a, b, c); }
};

using Math = fused_losses::FastFloatMath<WorstCasePrimitives>;

// Per-element loss and gradient (weight and pos_weight 1) of float32 logits `z` and targets `y`; with
// unit_pos_weight the pos_weight is UnitPosWeight (the formulas of the unweighted kernels), else the value 1.
std::tuple<at::Tensor, at::Tensor> worst_case_loss_and_grad(const at::Tensor& z, const at::Tensor& y,
                                                            double gamma_pos, double gamma_neg, double clip,
                                                            int64_t exp_direction, int64_t log_direction,
                                                            int64_t divide_direction, bool unit_pos_weight) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && z.sizes() == y.sizes());
  directions = {static_cast<int>(exp_direction), static_cast<int>(log_direction), static_cast<int>(divide_direction)};
  const auto cfg = fused_losses::make_bce_config<float>(gamma_pos, gamma_neg, clip);
  const at::Tensor zc = z.contiguous(), yc = y.contiguous();
  at::Tensor loss = at::empty_like(zc), grad = at::empty_like(zc);
  const float *zp = zc.const_data_ptr<float>(), *yp = yc.const_data_ptr<float>();
  float *lp = loss.data_ptr<float>(), *gp = grad.data_ptr<float>();
  for (int64_t i = 0; i < zc.numel(); ++i) {
    const auto both = unit_pos_weight
                          ? fused_losses::bce_element_loss_and_grad<Math>(cfg, zp[i], yp[i], 1.0f,
                                                                          fused_losses::UnitPosWeight{})
                          : fused_losses::bce_element_loss_and_grad<Math>(cfg, zp[i], yp[i], 1.0f, 1.0f);
    lp[i] = both.loss;
    gp[i] = both.grad;
  }
  directions = {};
  return {loss, grad};
}

}  // namespace

// An indirection so that the namespace macro expands before TORCH_LIBRARY_FRAGMENT pastes it.
#define FAST_MATH_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
FAST_MATH_FRAGMENT(FUSED_LOSSES_EMULATED_NAMESPACE, m) {
  m.def("fast_bce_math_worst_case(Tensor z, Tensor y, float gamma_pos, float gamma_neg, float clip, int exp_direction, "
        "int log_direction, int divide_direction, bool unit_pos_weight) -> (Tensor, Tensor)",
        &worst_case_loss_and_grad);
}
