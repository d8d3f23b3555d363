"""Fake (meta) kernels and autograd formulas of the fused_losses operators.

The schemas live in csrc/op_schemas.h and the device kernels in csrc/cpu and csrc/cuda; this module
teaches torch.compile the output shapes (fake kernels) and autograd the backward of each operator.
"""

import torch
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (loads the library, registering the operators)
from . import reference

_ops = torch.ops.fused_losses


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for double inputs, float32 otherwise: the dtype the kernels accumulate and save statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- autograd, higher orders, torch.func
# Each forward operator gets its autograd formula from _register_autograd. First-order backwards run the fused
# backward kernels. A backward that must itself be differentiable (grad mode on inside it: create_graph=True,
# torch.func.grad / jacrev / hessian) instead takes the vector-Jacobian product of the operator's pure-PyTorch
# reference (fused_losses.reference, the same formula), which autograd and torch.func differentiate to any
# order. torch.func cannot transform torch.library's autograd formulas, so under its transforms the functional
# API applies the same formulas as a torch.autograd.Function in the form torch.func accepts (call_operator);
# under vmap the forward operators run once per batch entry (_vmap_by_loop).


_FUNCTIONS = {}  # operator name -> its autograd.Function for torch.func
_EAGER_FUNCTIONS = {}  # operator name -> the same formulas as an autograd.Function for eager calls


def _register_autograd(name: str, setup_context, fused_backward, composite_backward, vmap_outputs: int) -> None:
    """Registers the autograd formula of operator `name` (`setup_context(ctx, inputs, output)` as
    torch.library's, and two backwards with the same signature: `fused_backward`, the kernels, and
    `composite_backward`, differentiable), its vmap rule, and the autograd.Functions call_operator applies under
    torch.func and in eager mode."""
    op = getattr(_ops, name).default

    def backward(ctx, *grads):
        return (composite_backward if torch.is_grad_enabled() else fused_backward)(ctx, *grads)

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def jvp(ctx, *tangents):
        raise _forward_mode_error(name)

    torch.library.register_autograd(f"fused_losses::{name}", backward, setup_context=setup_context)
    torch.library.register_vmap(op, _vmap_by_loop(op, vmap_outputs))
    _FUNCTIONS[name] = type(f"{name}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })

    # torch.func needs setup_context apart from forward; for such a Function, apply binds the arguments to
    # forward's signature (inspect.signature) on every call, ~15 us. Eager calls take this form instead, which
    # runs setup_context inside forward.
    def eager_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    _EAGER_FUNCTIONS[name] = type(f"{name}_eager_function", (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward),
        "backward": staticmethod(backward),
    })


def _forward_mode_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"fused_losses.{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
        "supported; use reverse mode: torch.func.grad, vjp, jacrev, and jacrev(jacrev(f)) for Hessians")


def _has_tangent(args) -> bool:
    """Whether torch.autograd.forward_ad dual tensors are among args (never outside a dual_level)."""
    return forward_ad._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def call_operator(name: str, *args):
    """torch.ops.fused_losses.<name>(*args). While torch.func transforms are active (where torch.library's
    autograd formulas are refused) and in eager mode, the same formulas are applied directly: the
    autograd.Function form when a backward will run, else the kernel below autograd. Both skip the Python layer
    torch.library puts in front of every call (~10-30 us: what a small loss takes in all). While torch.compile
    or torch.jit.trace traces, the operator itself, with its registered autograd formula (a traced
    autograd.Function would be a Python call that torch.jit.save cannot export)."""
    if torch._C._are_functorch_transforms_active():
        return _FUNCTIONS[name].apply(*args)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return getattr(_ops, name)(*args)
    if _has_tangent(args):  # the eager paths below would drop the tangent silently
        raise _forward_mode_error(name)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _EAGER_FUNCTIONS[name].apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(_ops, name)(*args)


def _vmap_by_loop(op, num_outputs: int):
    """A vmap rule that runs `op` once per entry of the vmapped dimension and stacks the outputs (the ops'
    kernels take whole batches already; per-sample use of a loss is what vmap serves here)."""

    def rule(info, in_dims, *args):
        def entry(i):
            return [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]

        results = [op(*entry(i)) for i in range(info.batch_size)]
        return tuple(torch.stack(outputs) for outputs in zip(*results)), (0,) * num_outputs

    return rule


def _vjp_of_reference(loss_fn, primals, wanted, grad_loss):
    """Gradients of loss_fn(*primals) for grad_loss, for the primals that are `wanted` (None for the others),
    as a differentiable expression; loss_fn computes in the accumulation dtype, the gradients come back in each
    primal's dtype."""
    acc = accumulation_dtype(primals[0].dtype)
    chosen = [p for p, w in zip(primals, wanted) if w]

    def loss_of_chosen(*values):
        it = iter(values)
        return loss_fn(*[next(it).to(acc) if w else p for p, w in zip(primals, wanted)])

    loss, vjp = torch.func.vjp(loss_of_chosen, *chosen)
    gradients = iter(vjp(grad_loss.to(loss.dtype)))
    return [next(gradients).to(p.dtype) if w else None for p, w in zip(primals, wanted)]


# ----------------------------------------------------------------------------- the gradients written by the forward
# With write_gradient (a reduced loss whose input requires grad; one flag per differentiable input where an op
# has several) an op's forward also writes d loss / d input for grad_loss = 1, and its in-place backward op
# leaves it as it is when grad_loss is 1 (compared on the device: no host synchronisation) or recomputes it
# from the inputs otherwise (csrc/common.h: schedules). Autograd hands that tensor out once: it is held on
# ctx (not saved, since the backward writes to it) and dropped when taken, so its memory goes with the first
# backward; a second backward (retain_graph) finds none and recomputes the gradient from the saved inputs, as
# the 3-pass schedule does. AOTAutograd (under torch.compile, opcheck) traces with functional tensors, where
# writing to a forward output from the backward cannot be expressed: there the backward recomputes too (the
# functional API does not even ask for the forward's gradient while compiling, see
# functional._writes_gradient).


def _check_devices(input, **tensors) -> None:
    """The C++ kernels' device check, for the fake kernels: a call whose tensors are on the meta device
    dispatches to the fake kernel, which would otherwise return uninitialised tensors on the input's device."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != input.device:
            raise ValueError(f"{name} must be on the same device as input ({input.device}), got {tensor.device}")


def _forward_gradient_fake(input, write_gradient: bool):
    return torch.empty_like(input, memory_format=torch.contiguous_format) if write_gradient else input.new_empty((0,))


def _keep_forward_gradients(ctx, gradients, written, *other_non_differentiable) -> None:
    """Holds the forward's `gradients` (those `written`) for _take_forward_gradients; they and the op's
    `other_non_differentiable` outputs are marked in one call, since each call replaces the previous one."""
    ctx.mark_non_differentiable(*other_non_differentiable, *gradients)
    # Autograd would otherwise hand the backward a zero-filled grad_output for every unused output: a pass
    # over memory of the input's size for each gradient. The backwards accept grad_loss None (the loss
    # itself unused): no gradient.
    ctx.set_materialize_grads(False)
    ctx.forward_gradients = [gradient if write else None for gradient, write in zip(gradients, written)]


def _take_forward_gradients(ctx):
    """The forward's gradients, each None where it was not written or was already taken (or is functional)."""
    gradients = ctx.forward_gradients
    ctx.forward_gradients = [None] * len(gradients)
    return [None if isinstance(gradient, FunctionalTensor) else gradient for gradient in gradients]


def _input_gradient(ctx, grad_loss, backward_inplace, backward):
    """d loss / d input for grad_loss: the forward's gradient brought to grad_loss by `backward_inplace` when
    there is one to take, else recomputed by the 3-pass `backward`. Both ops take the saved tensors and
    ctx.options after grad_loss (and the gradient)."""
    if grad_loss is None:
        return None
    gradient, = _take_forward_gradients(ctx)
    if gradient is None:
        return backward(grad_loss, *ctx.saved_tensors, *ctx.options)
    backward_inplace(grad_loss, gradient, *ctx.saved_tensors, *ctx.options)
    return gradient


# ----------------------------------------------------------------------------- cost-sensitive cross-entropy


def _num_row_stats(cost_matrix, cost_mode: str) -> int:
    has_cost = cost_matrix is not None
    return 2 + int(has_cost) + int(has_cost and cost_mode == "expected")


@torch.library.register_fake("fused_losses::cost_sensitive_cross_entropy")
def _cost_sensitive_cross_entropy_fake(input, target, cost_matrix, weight, ignore_index, reduction,
                                       label_smoothing, cost_mode, write_gradient):
    _check_devices(input, target=target, cost_matrix=cost_matrix, weight=weight)
    acc = accumulation_dtype(input.dtype)
    loss = input.new_empty(target.shape) if reduction == "none" else input.new_empty(())
    row_stats = input.new_empty((target.numel(), _num_row_stats(cost_matrix, cost_mode)), dtype=acc)
    return loss, row_stats, input.new_empty((), dtype=acc), _forward_gradient_fake(input, write_gradient)


@torch.library.register_fake("fused_losses::cost_sensitive_cross_entropy_backward")
def _cost_sensitive_cross_entropy_backward_fake(grad_loss, input, target, cost_matrix, weight, row_stats,
                                                total_weight, ignore_index, reduction, label_smoothing, cost_mode):
    _check_devices(input, grad_loss=grad_loss, target=target, cost_matrix=cost_matrix, weight=weight,
                   row_stats=row_stats, total_weight=total_weight)
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_losses::cost_sensitive_cross_entropy_backward_inplace")
def _cost_sensitive_cross_entropy_backward_inplace_fake(grad_loss, gradient, input, target, cost_matrix, weight,
                                                        row_stats, total_weight, ignore_index, reduction,
                                                        label_smoothing, cost_mode):
    return None


def _cost_sensitive_cross_entropy_setup(ctx, inputs, output):
    input, target, cost_matrix, weight, *options, write_gradient = inputs
    _, row_stats, total_weight, gradient = output
    ctx.save_for_backward(input, target, cost_matrix, weight, row_stats, total_weight)
    ctx.options = tuple(options)  # ignore_index, reduction, label_smoothing, cost_mode
    _keep_forward_gradients(ctx, [gradient], [write_gradient], row_stats, total_weight)


def _cost_sensitive_cross_entropy_backward(ctx, grad_loss, _grad_row_stats, _grad_total_weight, _grad_gradient):
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _input_gradient(ctx, grad_loss, _ops.cost_sensitive_cross_entropy_backward_inplace,
                                     _ops.cost_sensitive_cross_entropy_backward)
    return grad_input, None, None, None, None, None, None, None, None


def _cost_sensitive_cross_entropy_composite_backward(ctx, grad_loss, *_unused_grads):
    grad_input = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        input, target, cost_matrix, weight, _, _ = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, cost_mode = ctx.options

        def loss(z):
            return reference.cost_sensitive_cross_entropy(z, target, cost_matrix, weight, ignore_index, reduction,
                                                          label_smoothing, cost_mode)

        grad_input, = _vjp_of_reference(loss, [input], [True], grad_loss)
    return grad_input, None, None, None, None, None, None, None, None


_register_autograd("cost_sensitive_cross_entropy", _cost_sensitive_cross_entropy_setup,
                   _cost_sensitive_cross_entropy_backward, _cost_sensitive_cross_entropy_composite_backward,
                   vmap_outputs=4)


# ----------------------------------------------------------------------------- correlation losses

_MOMENTS_WIDTH = 8  # count, shifts and means of x and y, Cxx, Cyy, Cxy per sequence (csrc/correlation_math.h)


@torch.library.register_fake("fused_losses::correlation_loss")
def _correlation_loss_fake(input, target, mask, kind, reduction, per_timestep, eps, write_input_gradient,
                           write_target_gradient):
    _check_devices(input, target=target, mask=mask)
    acc = accumulation_dtype(input.dtype)
    batch, channels = input.shape[0], input.shape[2] if input.dim() == 3 else 1  # (B, T) is one channel
    if reduction != "none":
        loss = input.new_empty(())
    elif per_timestep:
        loss = torch.empty_like(input)  # the kernel keeps the input's (dense) strides
    else:
        loss = input.new_empty(input.shape[:1] + input.shape[2:])  # (B, D) or (B,)
    stats = input.new_empty((batch, channels, _MOMENTS_WIDTH), dtype=acc)
    return (loss, stats, input.new_empty((), dtype=acc), _forward_gradient_fake(input, write_input_gradient),
            _forward_gradient_fake(target, write_target_gradient))


@torch.library.register_fake("fused_losses::correlation_loss_backward")
def _correlation_loss_backward_fake(grad_loss, input, target, mask, stats, total_weight, kind, reduction,
                                    per_timestep, eps, input_requires_grad, target_requires_grad):
    _check_devices(input, grad_loss=grad_loss, target=target, mask=mask, stats=stats, total_weight=total_weight)
    def gradient(like, requested):
        return torch.empty_like(like) if requested else like.new_empty((0,))

    return gradient(input, input_requires_grad), gradient(target, target_requires_grad)


@torch.library.register_fake("fused_losses::correlation_loss_backward_inplace")
def _correlation_loss_backward_inplace_fake(grad_loss, grad_input, grad_target, input, target, mask, stats,
                                            total_weight, kind, reduction, per_timestep, eps, input_requires_grad,
                                            target_requires_grad):
    return None


def _correlation_loss_setup(ctx, inputs, output):
    input, target, mask, kind, reduction, per_timestep, eps, write_input_gradient, write_target_gradient = inputs
    _, stats, total_weight, grad_input, grad_target = output
    _keep_forward_gradients(ctx, [grad_input, grad_target], [write_input_gradient, write_target_gradient], stats,
                            total_weight)
    ctx.save_for_backward(input, target, mask, stats, total_weight)
    ctx.options = (kind, reduction, per_timestep, eps)


def _correlation_loss_backward(ctx, grad_loss, _grad_stats, _grad_total_weight, _grad_grad_input,
                               _grad_grad_target):
    input, target, mask, stats, total_weight = ctx.saved_tensors
    wanted = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input = grad_target = None
    if any(wanted) and grad_loss is not None:
        written = _take_forward_gradients(ctx)
        if all(gradient is not None for gradient, want in zip(written, wanted) if want):
            grad_input, grad_target = (input.new_empty((0,)) if gradient is None else gradient
                                       for gradient in written)
            _ops.correlation_loss_backward_inplace(grad_loss, grad_input, grad_target, input, target, mask, stats,
                                                   total_weight, *ctx.options, *wanted)
        else:
            grad_input, grad_target = _ops.correlation_loss_backward(
                grad_loss, input, target, mask, stats, total_weight, *ctx.options, *wanted)
    return (grad_input if wanted[0] else None, grad_target if wanted[1] else None,
            None, None, None, None, None, None, None)


def _correlation_loss_composite_backward(ctx, grad_loss, *_unused_grads):
    input, target, mask, _, _ = ctx.saved_tensors
    kind, reduction, per_timestep, eps = ctx.options
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input = grad_target = None
    if any(wanted) and grad_loss is not None:
        def loss(x, y):
            return reference._correlation_loss(kind, x, y, mask, 1, reduction, per_timestep, eps, None)

        grad_input, grad_target = _vjp_of_reference(loss, [input, target], wanted, grad_loss)
    return grad_input, grad_target, None, None, None, None, None, None, None


_register_autograd("correlation_loss", _correlation_loss_setup, _correlation_loss_backward,
                   _correlation_loss_composite_backward, vmap_outputs=5)


# ----------------------------------------------------------------------------- weighted / focal / ASL BCE


@torch.library.register_fake("fused_losses::weighted_bce_with_logits")
def _weighted_bce_with_logits_fake(input, target, positive_indices, weight, pos_weight, reduction, gamma_pos,
                                   gamma_neg, clip, write_gradient):
    _check_devices(input, target=target, positive_indices=positive_indices, weight=weight,
                   pos_weight=pos_weight)
    loss = input.new_empty(input.shape if reduction == "none" else ())
    return loss, _forward_gradient_fake(input, write_gradient)


@torch.library.register_fake("fused_losses::weighted_bce_with_logits_backward")
def _weighted_bce_with_logits_backward_fake(grad_loss, input, target, positive_indices, weight, pos_weight,
                                            reduction, gamma_pos, gamma_neg, clip):
    _check_devices(input, grad_loss=grad_loss, target=target, positive_indices=positive_indices,
                   weight=weight, pos_weight=pos_weight)
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_losses::weighted_bce_with_logits_backward_inplace")
def _weighted_bce_with_logits_backward_inplace_fake(grad_loss, gradient, input, target, positive_indices, weight,
                                                    pos_weight, reduction, gamma_pos, gamma_neg, clip):
    return None


def _weighted_bce_with_logits_setup(ctx, inputs, output):
    input, target, positive_indices, weight, pos_weight, *options, write_gradient = inputs
    ctx.save_for_backward(input, target, positive_indices, weight, pos_weight)
    ctx.options = tuple(options)  # reduction, gamma_pos, gamma_neg, clip
    _keep_forward_gradients(ctx, [output[1]], [write_gradient])


def _weighted_bce_with_logits_reference_gradients(ctx, grad_loss, wanted):
    input, target, positive_indices, weight, pos_weight = ctx.saved_tensors
    reduction, gamma_pos, gamma_neg, clip = ctx.options

    def loss(z, t):
        return reference.weighted_bce_with_logits(z, t, weight, pos_weight, reduction,
                                                  positive_indices=positive_indices, gamma_pos=gamma_pos,
                                                  gamma_neg=gamma_neg, clip=clip)

    return _vjp_of_reference(loss, [input, target], wanted, grad_loss)


def _weighted_bce_with_logits_backward(ctx, grad_loss, _grad_gradient):
    grad_input = grad_target = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        grad_input = _input_gradient(ctx, grad_loss, _ops.weighted_bce_with_logits_backward_inplace,
                                     _ops.weighted_bce_with_logits_backward)
    if grad_loss is not None and ctx.needs_input_grad[1]:
        # d loss / d target = weight (pos_weight l_pos - l_neg), elementwise: from the reference's formula.
        _, grad_target = _weighted_bce_with_logits_reference_gradients(ctx, grad_loss, [False, True])
    return grad_input, grad_target, None, None, None, None, None, None, None, None


def _weighted_bce_with_logits_composite_backward(ctx, grad_loss, _grad_gradient):
    grad_input = grad_target = None
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if grad_loss is not None and any(wanted):
        grad_input, grad_target = _weighted_bce_with_logits_reference_gradients(ctx, grad_loss, wanted)
    return grad_input, grad_target, None, None, None, None, None, None, None, None


_register_autograd("weighted_bce_with_logits", _weighted_bce_with_logits_setup, _weighted_bce_with_logits_backward,
                   _weighted_bce_with_logits_composite_backward, vmap_outputs=2)
