// The backward pass of fused_losses::weighted_bce_with_logits: its kernels
// (weighted_bce_with_logits_kernels.cuh) in a file of their own, so that nvcc compiles the passes in parallel.
#include "cuda/weighted_bce_with_logits_kernels.cuh"

namespace fused_losses::cuda {

void launch_bce_backward(const BceProblem& p, at::Tensor& grad_input, bool skip_unit_grad_loss, cudaStream_t stream) {
  launch_problem_pass<Pass::Backward>(p, &grad_input, nullptr, skip_unit_grad_loss, stream);
}

}  // namespace fused_losses::cuda
