// The pass of fused_losses::weighted_bce_with_logits that writes the gradient with the loss (2-pass schedule):
// its kernels (weighted_bce_with_logits_kernels.cuh) in a file of their own, so that nvcc compiles the passes in
// parallel.
#include "cuda/weighted_bce_with_logits_kernels.cuh"

namespace fused_losses::cuda {

int64_t launch_bce_forward_with_gradient(const BceProblem& p, at::Tensor& gradient, at::Tensor* partials,
                                         cudaStream_t stream) {
  return launch_problem_pass<Pass::ForwardWithGradient>(p, &gradient, partials, /*skip_unit_grad_loss=*/false, stream);
}

}  // namespace fused_losses::cuda
