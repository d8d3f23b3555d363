// The CUDA operators of fused_losses::weighted_bce_with_logits: checks, outputs, the pass (its kernels in
// weighted_bce_with_logits_kernels.cuh, compiled per pass in weighted_bce_with_logits_<pass>.cu) and the
// deterministic reduction of a reduced forward's per-block sums.
#include "cuda/weighted_bce_with_logits_kernels.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fused_losses::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input, const std::optional<at::Tensor>& target,
                                                const std::optional<at::Tensor>& positive_indices,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight, c10::string_view reduction,
                                                double gamma_pos, double gamma_neg, double clip, bool write_gradient) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p =
      make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos, gamma_neg, clip);
  const bool reduced = p.reduction != Reduction::None;
  at::Tensor loss = allocate_bce_loss(p);
  at::Tensor gradient = allocate_forward_gradient(p.input, "write_gradient", write_gradient, p.reduction);
  if (p.numel == 0) {
    fill_empty_reduction(loss, p.reduction);
    return {loss, gradient};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  at::Tensor* reduced_partials = reduced ? &partials : nullptr;
  const int64_t blocks = write_gradient ? launch_bce_forward_with_gradient(p, gradient, reduced_partials, stream)
                                        : launch_bce_forward(p, reduced ? nullptr : &loss, reduced_partials, stream);
  if (reduced) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "weighted_bce_with_logits", [&] {
      using acc_t = acc_type<scalar_t>;
      launch_reduce_partials<acc_t, 1>(
          partials.const_data_ptr<acc_t>(), blocks,
          FixedDivisorLossEpilogue<scalar_t>{loss.data_ptr<scalar_t>(), static_cast<acc_t>(bce_reduction_divisor(p))},
          stream);
    });
  }
  return {loss, gradient};
}

// Writes the gradient for grad_loss into `grad_input`; with `skip_unit_grad_loss`, nothing when grad_loss is 1.
void backward_into(const BceProblem& p, at::Tensor& grad_input, bool skip_unit_grad_loss) {
  if (p.numel == 0) return;
  launch_bce_backward(p, grad_input, skip_unit_grad_loss, c10::cuda::getCurrentCUDAStream());
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& positive_indices, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pos_weight, c10::string_view reduction, double gamma_pos,
                         double gamma_neg, double clip) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  at::Tensor grad_input = at::empty(p.input.sizes(), p.input.options());
  backward_into(p, grad_input, /*skip_unit_grad_loss=*/false);
  return grad_input;
}

void backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& gradient, const at::Tensor& input,
                           const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& positive_indices,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                           c10::string_view reduction, double gamma_pos, double gamma_neg, double clip) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BceProblem p = make_bce_problem(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                        gamma_neg, clip, grad_loss);
  check_forward_gradient(gradient, "gradient", p.input, "input", p.reduction);
  backward_into(p, gradient, /*skip_unit_grad_loss=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("weighted_bce_with_logits", &forward_cuda);
  m.impl("weighted_bce_with_logits_backward", &backward_cuda);
  m.impl("weighted_bce_with_logits_backward_inplace", &backward_inplace_cuda);
}

}  // namespace fused_losses::cuda
