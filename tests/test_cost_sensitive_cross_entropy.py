"""Cost-sensitive cross-entropy: equality with F.cross_entropy and the reference, gradients, layouts,
edge cases, errors, registration (opcheck / gradcheck / compile) and determinism."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_losses
from fused_losses import reference
from conftest import FLOAT_DTYPES, TOLERANCES, assert_gradient_schedules_agree

ops = torch.ops.fused_losses
csce = fused_losses.cost_sensitive_cross_entropy


def make_problem(n, c, device, dtype=torch.float32, ignore_fraction=0.0, extra_dims=()):
    x = (torch.randn(n, c, *extra_dims, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, c, (n, *extra_dims), device=device)
    if ignore_fraction:
        y[torch.rand(y.shape, device=device) < ignore_fraction] = -100
    return x, y


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def assert_same_loss_and_grad(expected_fn, x, *args, **kwargs):
    """csce and expected_fn give the same loss and gradient (float32 tolerances)."""
    fused, fused_grad = loss_and_grad(csce, x, *args, **kwargs)
    expected, expected_grad = loss_and_grad(expected_fn, x, *args, **kwargs)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused_grad, expected_grad)


def assert_matches(fused, expected, dtype):
    torch.testing.assert_close(fused.double(), expected.double(), equal_nan=True, **TOLERANCES[dtype])


# --------------------------------------------------------------------------------------- F.cross_entropy


@pytest.mark.parametrize("n,c", [(7, 1), (33, 2), (64, 3), (257, 10), (48, 1000), (3, 32000), (2, 128256)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_equals_cross_entropy_without_cost(device, n, c, dtype):
    x, y = make_problem(n, c, device, dtype, ignore_fraction=0.2)
    for reduction in ("mean", "sum", "none"):
        fused, fused_grad = loss_and_grad(csce, x, y, reduction=reduction)
        expected, expected_grad = loss_and_grad(F.cross_entropy, x.double(), y, reduction=reduction)
        assert fused.dtype == dtype and fused_grad.dtype == dtype
        assert_matches(fused, expected, dtype)
        assert_matches(fused_grad, expected_grad, dtype)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_cross_entropy_with_weight_ignore_and_smoothing(device, label_smoothing, reduction):
    x, y = make_problem(300, 17, device)
    y[:5] = 3  # ignore_index may be a valid class index: those rows are ignored
    weight = torch.rand(17, device=device) + 0.1
    kwargs = dict(weight=weight, ignore_index=3, reduction=reduction, label_smoothing=label_smoothing)
    assert_same_loss_and_grad(F.cross_entropy, x, y, **kwargs)


def test_float32_matches_cross_entropy_tightly(device):
    x, y = make_problem(1000, 37, device)
    torch.testing.assert_close(csce(x, y), F.cross_entropy(x, y), rtol=1e-6, atol=1e-6)


def test_spatial_input_and_channels_last(device):
    x, y = make_problem(4, 5, device, extra_dims=(6, 7), ignore_fraction=0.2)
    for inp in (x, x.to(memory_format=torch.channels_last), x.permute(0, 1, 3, 2)):
        tgt = y if inp.shape[2:] == y.shape[1:] else y.permute(0, 2, 1)
        for reduction in ("mean", "none"):
            assert_same_loss_and_grad(F.cross_entropy, inp, tgt, reduction=reduction)


def test_non_contiguous_inputs(device):
    base = torch.randn(40, 64, device=device)
    y = torch.randint(0, 20, (40,), device=device)
    cost = torch.rand(20, 20, device=device)
    for x in (base[:, ::3][:, :20], base.t()[:20].t()[:, :20], base[:, 10:30]):
        assert not x.is_contiguous()
        assert_same_loss_and_grad(reference.cost_sensitive_cross_entropy, x, y, cost)
    transposed = torch.randn(20, 40, device=device).t()  # class stride 40
    torch.testing.assert_close(csce(transposed, y, cost), reference.cost_sensitive_cross_entropy(transposed, y, cost))


def test_unbatched_and_int32_target(device):
    x = torch.randn(6, device=device)
    y = torch.tensor(2, device=device)
    torch.testing.assert_close(csce(x, y), F.cross_entropy(x, y))
    torch.testing.assert_close(csce(x, y, reduction="none"), F.cross_entropy(x, y, reduction="none"))
    xb, yb = make_problem(50, 6, device)
    torch.testing.assert_close(csce(xb, yb.int()), F.cross_entropy(xb, yb))


def test_one_dimensional_input_with_a_batch_of_targets_names_the_shapes_passed(device):
    """(C,) logits are one sample, so its target is one class index: 1-D logits with a 1-D target (a binary
    classifier's (N,) scores) is named as passed, not as the (1, C) view the op runs on."""
    x, y = torch.randn(8, device=device), torch.randint(0, 2, (8,), device=device)
    message = (r"target must be a 0-d class index for input of shape \(8,\) \(one sample of 8 classes\), got shape "
               r"\(8,\); for N samples pass \(N, C\) logits")
    with pytest.raises(ValueError, match=message):
        csce(x, y)
    with pytest.raises(ValueError, match=message):
        fused_losses.CostSensitiveCrossEntropyLoss()(x, y)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_any_integer_target_dtype_equals_int64(device, dtype):
    x, y = make_problem(50, 6, device)
    cost = torch.rand(6, 6, device=device)
    for mode in ("argmax", "expected"):
        torch.testing.assert_close(csce(x, y.to(dtype), cost, cost_mode=mode), csce(x, y, cost, cost_mode=mode),
                                   rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- cost matrix


def test_cost_matrix_and_weight_as_array_likes(device):
    """Nested lists and NumPy arrays are accepted by the functional form as by the module; other objects raise
    a TypeError naming the argument."""
    x, y = make_problem(30, 3, device)
    cost = [[1, 1, 1], [1, 1, 1.2], [1, 1, 1]]
    weight = [0.5, 1.0, 2.0]
    expected = csce(x, y, torch.tensor(cost, device=device), torch.tensor(weight, device=device))
    for as_array in (list, np.array):
        torch.testing.assert_close(csce(x, y, as_array(cost), as_array(weight)), expected)
    with pytest.raises(TypeError, match="cost_matrix must be a tensor or an array-like"):
        csce(x, y, "costs")
    with pytest.raises(ValueError, match=r"cost_matrix must have 2 dimension\(s\)"):
        csce(x, y, [1.0, 2.0, 3.0])


def test_zero_diagonal_in_argmax_mode_warns_in_the_module():
    """A zero cost on the diagonal gives correctly classified samples zero loss and zero gradient in argmax mode
    (documented): the module warns once, at construction; the expected mode does not need the warning."""
    cost = [[0, 1, 1], [1, 0, 1.2], [1, 1, 0]]
    with pytest.warns(UserWarning, match="zeros on its diagonal"):
        criterion = fused_losses.CostSensitiveCrossEntropyLoss(cost)
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    loss = criterion(x, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_losses.CostSensitiveCrossEntropyLoss(cost, cost_mode="expected")
        fused_losses.CostSensitiveCrossEntropyLoss([[1, 1, 1], [1, 1, 1.2], [1, 1, 1]])



@pytest.mark.parametrize("cost_mode", ["argmax", "expected"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,c", [(129, 3), (64, 10), (16, 1000)])
def test_matches_reference_with_cost(device, cost_mode, dtype, n, c):
    x, y = make_problem(n, c, device, dtype, ignore_fraction=0.1)
    cost = torch.rand(c, c, device=device, dtype=torch.float64) * 2
    weight = torch.rand(c, device=device, dtype=torch.float64) + 0.5
    for kwargs in (dict(), dict(weight=weight, label_smoothing=0.05)):
        for reduction in ("mean", "sum", "none"):
            fused, fused_grad = loss_and_grad(csce, x, y, cost.to(dtype), reduction=reduction, cost_mode=cost_mode,
                                              **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()})
            # The reference runs in float64 on the same (rounded) logits; argmax ties cannot differ for
            # random logits, so both pick the same cost entry.
            expected, expected_grad = loss_and_grad(reference.cost_sensitive_cross_entropy, x.double(), y,
                                                    cost.to(dtype).double(), reduction=reduction,
                                                    cost_mode=cost_mode, **kwargs)
            assert_matches(fused, expected, dtype)
            assert_matches(fused_grad, expected_grad, dtype)


def test_issue_example_costs_exactly_one_point_two_more(device):
    # Classes A, B, C; B predicted as C costs 1.2, everything else 1.
    cost = torch.ones(3, 3, device=device, dtype=torch.float64)
    cost[1, 2] = 1.2
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.4, 0.5]], device=device, dtype=torch.float64)
    y = torch.tensor([1, 1], device=device)
    loss = csce(probs.log(), y, cost, reduction="none")
    assert loss[1].item() == pytest.approx(1.2 * loss[0].item(), rel=1e-14)
    assert loss[0].item() == pytest.approx(-math.log(0.4), rel=1e-14)


def test_argmax_ties_take_the_first_index(device):
    x = torch.zeros(2, 4, device=device)
    x[1, 1] = x[1, 3] = 5.0
    cost = torch.arange(16, dtype=torch.float32, device=device).reshape(4, 4) + 1
    y = torch.tensor([2, 2], device=device)
    ce = F.cross_entropy(x, y, reduction="none")
    loss = csce(x, y, cost, reduction="none")
    torch.testing.assert_close(loss, torch.stack([cost[2, 0] * ce[0], cost[2, 1] * ce[1]]))


def test_argmax_mode_treats_the_cost_factor_as_constant(device):
    x, y = make_problem(20, 5, device)
    cost = torch.rand(5, 5, device=device) + 0.5
    factor = cost[y, x.argmax(1)]
    _, grad = loss_and_grad(csce, x, y, cost, reduction="sum")
    _, expected = loss_and_grad(lambda z: (factor * F.cross_entropy(z, y, reduction="none")).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_identity_cost_matrix_zeroes_correct_predictions(device):
    x, y = make_problem(100, 4, device)
    zero_diagonal = 1 - torch.eye(4, device=device)
    loss = csce(x, y, zero_diagonal, reduction="none")
    correct = x.argmax(1) == y
    assert (loss[correct] == 0).all() and (loss[~correct] > 0).all()


# ------------------------------------------------------------------------------------------- edge cases


def test_extreme_and_infinite_logits_follow_cross_entropy(device):
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [float("-inf"), 2.0, 1.0], [0.0, float("-inf"), 5.0]],
                     device=device)
    y = torch.tensor([1, 0, 1, 2], device=device)
    for reduction in ("none", "mean"):
        assert_same_loss_and_grad(F.cross_entropy, x, y, reduction=reduction)


def test_nan_logits_propagate(device):
    x, y = make_problem(4, 6, device)
    x[2, 3] = float("nan")
    loss = csce(x, y, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


def test_all_ignored_and_empty_follow_cross_entropy(device):
    x, y = make_problem(5, 3, device)
    y[:] = -100
    assert torch.isnan(csce(x, y)) and torch.isnan(F.cross_entropy(x, y))
    assert csce(x, y, reduction="sum").item() == 0.0
    _, grad = loss_and_grad(csce, x, y, reduction="sum")
    assert (grad == 0).all()
    empty_x, empty_y = torch.randn(0, 3, device=device), torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(csce(empty_x, empty_y, reduction=reduction),
                                   F.cross_entropy(empty_x, empty_y, reduction=reduction), equal_nan=True)
    _, grad = loss_and_grad(csce, empty_x, empty_y, reduction="sum")
    assert grad.shape == (0, 3)


def test_no_classes(device):
    """C = 0 (once a crash of the CPU tile scan): all-ignored rows follow F.cross_entropy, a class index is
    out of range."""
    x = torch.randn(3, 0, device=device)
    ignored = torch.full((3,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(csce(x, ignored, reduction=reduction),
                                   F.cross_entropy(x, ignored, reduction=reduction), equal_nan=True)
    _, grad = loss_and_grad(csce, x, ignored, torch.ones(0, 0, device=device), reduction="sum", cost_mode="expected")
    assert grad.shape == (3, 0)
    if device == "cpu":  # CUDA reports bad labels as NaN (test_cuda_invalid_target_gives_nan_and_check_mode_raises)
        with pytest.raises(ValueError, match=r"target contains class index 0, outside \[0, 0\)"):
            csce(x, torch.zeros(3, dtype=torch.long, device=device))


def test_grad_output_scaling_and_retain_graph(device):
    x, y = make_problem(30, 7, device)
    cost = torch.rand(7, 7, device=device)
    x.requires_grad_(True)
    loss = csce(x, y, cost, cost_mode="expected")
    (3.5 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(retain_graph=True)
    torch.testing.assert_close(first, 3.5 * x.grad)
    x.grad = None
    loss.backward()
    torch.testing.assert_close(first, 3.5 * x.grad)
    per_sample = csce(x, y, cost, reduction="none")
    scale = torch.rand(30, device=device)
    (g,) = torch.autograd.grad(per_sample, x, scale)
    (g_ref,) = torch.autograd.grad(reference.cost_sensitive_cross_entropy(x, y, cost, reduction="none"), x, scale)
    torch.testing.assert_close(g, g_ref)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument(device):
    x, y = make_problem(8, 4, device)
    with pytest.raises(ValueError, match=r"target contains class index 7, outside \[0, 4\)"):
        bad = y.clone()
        bad[3] = 7
        csce(x.cpu(), bad.cpu())
    with pytest.raises(ValueError, match="target must have shape"):
        csce(x, y[:5])
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        csce(x, y.float())
    with pytest.raises(TypeError, match="input must be float32, float16, bfloat16 or float64"):
        csce(x.int(), y)
    with pytest.raises(ValueError, match=r"cost_matrix must have shape \[4, 4\]"):
        csce(x, y, torch.ones(3, 3, device=device))
    with pytest.raises(ValueError, match=r"weight must have shape \[4\]"):
        csce(x, y, weight=torch.ones(5, device=device))
    with pytest.raises(ValueError, match="reduction must be one of"):
        csce(x, y, reduction="avg")
    with pytest.raises(ValueError, match="cost_mode must be one of"):
        csce(x, y, cost_mode="max")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        csce(x, y, label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a real number, got NoneType"):
        csce(x, y, label_smoothing=None)
    # A float ignore_index would be truncated (1.5 ignoring class 1): a TypeError, as F.cross_entropy raises.
    with pytest.raises(TypeError, match="ignore_index must be an int, got 1.5"):
        csce(x, y, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int, got 1.0"):
        fused_losses.CostSensitiveCrossEntropyLoss(ignore_index=1.0)
    torch.testing.assert_close(csce(x, y, ignore_index=np.int64(1)), F.cross_entropy(x, y, ignore_index=1))
    # The operator takes an int64: a larger integer is named, not garbled by the schema's parser.
    with pytest.raises(ValueError, match=r"ignore_index must be an integer in \[-2\*\*63, 2\*\*63 - 1\] \(int64\), "
                                         r"got 1180591620717411303424"):
        csce(x, y, ignore_index=2**70)
    with pytest.raises(ValueError, match=r"ignore_index must be an integer in .*got -9223372036854775809"):
        fused_losses.CostSensitiveCrossEntropyLoss(ignore_index=-2**63 - 1)
    torch.testing.assert_close(csce(x, y, ignore_index=-2**63), F.cross_entropy(x, y, ignore_index=-2**63))
    with pytest.raises(ValueError, match="cost_matrix must not require grad"):
        csce(x, y, torch.ones(4, 4, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="weight must not require grad"):
        csce(x, y, weight=torch.ones(4, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="input must have shape"):
        ops.cost_sensitive_cross_entropy(x[0], y[0], None, None, -100, "mean", 0.0, "argmax", False)
    # Complex costs are refused alike by every form (a conversion would drop the imaginary part silently).
    complex_cost = torch.ones(4, 4, dtype=torch.complex64, device=device) + 5j * torch.eye(4, device=device)
    for call in (lambda: csce(x, y, complex_cost), lambda: fused_losses.CostSensitiveCrossEntropyLoss(complex_cost),
                 lambda: fused_losses.CostSensitiveCrossEntropyLoss([[1, 1 + 5j], [1, 1]])):
        with pytest.raises(TypeError, match="cost_matrix must hold real numbers, got torch.complex64"):
            call()
    # Sparse tensors are named, not left to PyTorch's "Could not run ... 'SparseCPU' backend".
    for name, call in [("input", lambda: csce(x.to_sparse(), y)), ("target", lambda: csce(x, y.to_sparse())),
                       ("cost_matrix", lambda: csce(x, y, torch.ones(4, 4, device=device).to_sparse())),
                       ("weight", lambda: csce(x, y, weight=torch.ones(4, device=device).to_sparse())),
                       ("cost_matrix", lambda: fused_losses.CostSensitiveCrossEntropyLoss(
                           torch.ones(4, 4).to_sparse()))]:
        with pytest.raises(TypeError, match=rf"{name} must be a dense tensor \(torch.strided layout\), got layout "
                                            r"torch.sparse_coo"):
            call()
    # The process stays usable after the errors.
    torch.testing.assert_close(csce(x, y), F.cross_entropy(x, y))


def test_cpu_rejects_negative_or_non_finite_costs():
    x, y = make_problem(8, 3, "cpu")
    with pytest.raises(ValueError, match="cost_matrix must be non-negative"):
        csce(x, y, -torch.ones(3, 3))
    with pytest.raises(ValueError, match="finite"):
        csce(x, y, torch.full((3, 3), float("inf")))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_device_mismatch_is_reported():
    x, y = make_problem(8, 3, "cuda")
    with pytest.raises(ValueError, match="cost_matrix must be on the same device as input"):
        csce(x, y, torch.ones(3, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_invalid_target_gives_nan_and_check_mode_raises(monkeypatch):
    x, y = make_problem(8, 4, "cuda")
    y[2] = 9
    loss = csce(x, y, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(csce(x, y))
    import fused_losses._validation as validation
    monkeypatch.setattr(validation, "CHECK_DATA_ON_CUDA", True)
    with pytest.raises(ValueError, match="target contains class index 9"):
        csce(x, y)
    torch.testing.assert_close(csce(x, y.clamp(max=3)), F.cross_entropy(x, y.clamp(max=3)))


# ---------------------------------------------------------------------------------------------- module


def test_module_buffers_and_state_dict(device):
    criterion = fused_losses.CostSensitiveCrossEntropyLoss([[1, 2, 1], [1, 1, 1.2], [3, 1, 1]], weight=[1, 2, 3],
                                                           label_smoothing=0.1).to(device)
    assert set(dict(criterion.named_buffers())) == {"cost_matrix", "weight"}
    x, y = make_problem(20, 3, device)
    expected = reference.cost_sensitive_cross_entropy(x, y, criterion.cost_matrix, criterion.weight,
                                                      label_smoothing=0.1)
    torch.testing.assert_close(criterion(x, y), expected)
    clone = fused_losses.CostSensitiveCrossEntropyLoss(torch.ones(3, 3), weight=torch.zeros(3), label_smoothing=0.1)
    clone.load_state_dict(criterion.state_dict())
    torch.testing.assert_close(clone.to(device)(x, y), criterion(x, y))
    with pytest.raises(ValueError, match="square"):
        fused_losses.CostSensitiveCrossEntropyLoss(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        fused_losses.CostSensitiveCrossEntropyLoss(-torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 2"):
        fused_losses.CostSensitiveCrossEntropyLoss(torch.ones(2, 2), label_smoothing=2)


# ---------------------------------------------------------------------------------------- registration


OPCHECK_CASES = [
    dict(),
    dict(cost=True),
    dict(cost=True, mode="expected", weight=True, smoothing=0.1),
    dict(reduction="none", weight=True),
    dict(reduction="sum", cost=True, spatial=True),
]


@pytest.mark.parametrize("write_gradient", [False, True])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case, write_gradient):
    reduction = case.get("reduction", "mean")
    if write_gradient and reduction == "none":
        pytest.skip("the forward writes the gradient for reduced losses only")
    extra = (3,) if case.get("spatial") else ()
    x, y = make_problem(12, 5, device, ignore_fraction=0.2, extra_dims=extra)
    cost = torch.rand(5, 5, device=device) if case.get("cost") else None
    weight = torch.rand(5, device=device) + 0.1 if case.get("weight") else None
    options = (-100, reduction, case.get("smoothing", 0.0), case.get("mode", "argmax"))
    args = (x.requires_grad_(True), y, cost, weight, *options)
    torch.library.opcheck(ops.cost_sensitive_cross_entropy, (*args, write_gradient))
    if write_gradient:
        _, row_stats, total_weight, gradient = ops.cost_sensitive_cross_entropy(*args, True)
        grad_loss = torch.tensor(0.5, device=device)
        torch.library.opcheck(ops.cost_sensitive_cross_entropy_backward_inplace,
                              (grad_loss, gradient, x.detach(), y, cost, weight, row_stats, total_weight, *options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_classes", [10, 1000])
@pytest.mark.parametrize("cost_mode", ["argmax", "expected"])
@pytest.mark.parametrize("variant", ["cost", "cost_weight_smoothing", "spatial", "weight_smoothing_no_cost"])
def test_forward_written_gradient(device, dtype, reduction, num_classes, cost_mode, variant, monkeypatch):
    """The gradient written by the forward (2-pass) is bitwise the 3-pass backward's, for any grad_output and
    repeated backwards: tiles and rows of many classes, ignored rows, odd sizes for the vector tails."""
    extra = (3,) if variant == "spatial" else ()
    x, y = make_problem(301 if num_classes == 10 else 37, num_classes, device, dtype, ignore_fraction=0.2,
                        extra_dims=extra)
    cost = None if variant == "weight_smoothing_no_cost" else torch.rand(num_classes, num_classes, device=device)
    weight = torch.rand(num_classes, device=device) + 0.1 if variant != "cost" else None
    smoothing = 0.1 if "smoothing" in variant else 0.0

    def loss(x):
        return csce(x, y, cost, weight, reduction=reduction, label_smoothing=smoothing, cost_mode=cost_mode)

    assert_gradient_schedules_agree(loss, [x], monkeypatch)
    # Writing the gradient leaves the other outputs bitwise as they were (the pre-pass's total weight too).
    args = (x, y, cost, weight, -100, reduction, smoothing, cost_mode)
    for without, with_gradient in zip(ops.cost_sensitive_cross_entropy(*args, False)[:3],
                                      ops.cost_sensitive_cross_entropy(*args, True)[:3]):
        torch.testing.assert_close(with_gradient, without, rtol=0, atol=0, equal_nan=True)


def test_forward_written_gradient_errors():
    x, y = make_problem(8, 4, "cpu")
    with pytest.raises(ValueError, match="write_gradient needs a reduced loss"):
        ops.cost_sensitive_cross_entropy(x, y, None, None, -100, "none", 0.0, "argmax", True)
    _, row_stats, total_weight, _ = ops.cost_sensitive_cross_entropy(x, y, None, None, -100, "mean", 0.0, "argmax",
                                                                     False)
    with pytest.raises(ValueError, match=r"gradient must be a contiguous tensor of the input's shape \[8, 4\]"):
        ops.cost_sensitive_cross_entropy_backward_inplace(torch.tensor(2.0), torch.empty(0), x, y, None, None,
                                                          row_stats, total_weight, -100, "mean", 0.0, "argmax")


@pytest.mark.parametrize("cost_mode", ["argmax", "expected"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(device, cost_mode, reduction):
    x, y = make_problem(6, 4, device, torch.float64, extra_dims=(2,))
    y[0, 0] = -100
    cost = torch.rand(4, 4, device=device, dtype=torch.float64) + 0.5
    weight = torch.rand(4, device=device, dtype=torch.float64) + 0.5
    for kwargs in (dict(), dict(weight=weight, label_smoothing=0.2)):
        fn = lambda z: csce(z, y, cost, reduction=reduction, cost_mode=cost_mode, **kwargs)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(True),))


def test_torch_compile_fullgraph(device):
    x, y = make_problem(64, 10, device, ignore_fraction=0.1)
    cost = torch.rand(10, 10, device=device)

    def step(logits):
        return csce(logits, y, cost, cost_mode="expected", label_smoothing=0.1) * 2

    compiled = torch.compile(step, fullgraph=True)
    eager_loss, eager_grad = loss_and_grad(step, x)
    compiled_loss, compiled_grad = loss_and_grad(compiled, x)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("num_classes", [4, 37, 1000])
@pytest.mark.parametrize("offset", [1e4, 1e7])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_with_a_large_logit_offset(device, num_classes, offset, weighted):
    """Logits sharing a large offset: the smoothing term is summed relative to the target's logit, so the loss is
    the offset-free F.cross_entropy's (it was 1.7693 for 1.7187 at C = 4, offset 1e7; 1e-3 off at 1e4)."""
    generator = torch.Generator().manual_seed(num_classes)
    shifted = (torch.randn(64, num_classes, generator=generator, dtype=torch.float64) * 3 + offset).float()
    y = torch.randint(0, num_classes, (64,), generator=generator)
    weight = torch.rand(num_classes, generator=generator) + 0.5 if weighted else None
    # The float32 logits, offset removed exactly in float64: the value a loss of these logits should have.
    exact = F.cross_entropy(shifted.double() - offset, y, weight=None if weight is None else weight.double(),
                            label_smoothing=0.1, reduction="none")
    loss = csce(shifted.to(device), y.to(device), weight=None if weight is None else weight.to(device),
                label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), exact, rtol=2e-5, atol=2e-5)


def test_label_smoothing_with_a_minus_inf_target_logit_is_inf(device):
    """A target logit of -inf (a masked class as the label) gives an infinite loss, as F.cross_entropy: the
    smoothing sum's shift falls back to 0 there instead of making the row NaN."""
    x = torch.randn(3, 5, device=device)
    x[1, 2] = float("-inf")
    y = torch.tensor([0, 2, 4], device=device)
    loss = csce(x, y, label_smoothing=0.1, reduction="none")
    expected = F.cross_entropy(x, y, label_smoothing=0.1, reduction="none")
    assert torch.isinf(loss[1]) and loss[1] > 0
    torch.testing.assert_close(loss, expected)


def test_mean_over_millions_of_rows_keeps_float32_accuracy(device):
    """2^24 + 3 rows whose loss is exactly log 2: every rounding of a float32 running sum errs the same way
    (the CPU total drifted to 0.69328, 1.9e-4 off); the per-block sums and their total are added in double."""
    rows = 2**24 + 3
    logits = torch.zeros(1, 2, device=device).expand(rows, 2)
    target = torch.ones(1, dtype=torch.long, device=device).expand(rows)
    loss = csce(logits, target)
    assert abs(loss.item() - math.log(2)) <= 1e-6 * math.log(2)
    assert abs(csce(logits, target, reduction="sum").item() - rows * math.log(2)) <= 1e-6 * rows * math.log(2)



def test_bitwise_deterministic_across_runs_and_thread_counts(device):
    x, y = make_problem(5000, 37, device, ignore_fraction=0.1)
    cost = torch.rand(37, 37, device=device)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 1, 2):
            torch.set_num_threads(num_threads)
            results.append(loss_and_grad(csce, x, y, cost, cost_mode="expected"))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
