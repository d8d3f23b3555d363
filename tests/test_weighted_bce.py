"""Tests of fused_losses.weighted_bce_with_logits / WeightedBCEWithLogitsLoss (weighted, focal and asymmetric
BCE with logits on dense or sparse multi-label targets), on every device of the `device` fixture."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_losses
import fused_losses._validation as validation
from conftest import FLOAT_DTYPES, TOLERANCES, assert_gradient_schedules_agree
from fused_losses import WeightedBCEWithLogitsLoss, reference, weighted_bce_with_logits

REDUCTIONS = ["none", "mean", "sum"]
# (gamma_pos, gamma_neg, clip): focal, ASL, gammas below 1, clip alone, positive focusing alone.
FOCUSING = [(2.0, 2.0, 0.0), (1.0, 4.0, 0.05), (0.5, 0.3, 0.2), (0.0, 0.0, 0.1), (3.0, 0.0, 0.0)]


def random_indices(rows, num_labels, max_positives, device, generator=None):
    """(rows, K) positive labels padded with -1, with a duplicate in the first row when K allows."""
    scores = torch.rand(rows, num_labels, generator=generator)
    indices = scores.topk(min(max_positives, num_labels), dim=1).indices
    counts = torch.randint(0, indices.shape[1] + 1, (rows, 1), generator=generator)
    indices = indices.where(torch.arange(indices.shape[1]) < counts, -1)
    if rows > 0 and indices.shape[1] >= 2:
        indices[0, :2] = indices[0, 0].clamp(min=0)  # a duplicated label: rows are sets
    return indices.to(device)


def dense_from(indices, num_labels, dtype):
    return reference.dense_target_from_indices(indices, num_labels, dtype)


def torch_bce64(input, target, weight=None, pos_weight=None, reduction="mean"):
    """F.binary_cross_entropy_with_logits in float64 on the same (rounded) values."""
    as64 = (lambda t: None if t is None else t.detach().double())
    return F.binary_cross_entropy_with_logits(input.double(), as64(target), as64(weight), reduction=reduction,
                                              pos_weight=as64(pos_weight))


def loss_and_grad(fn, input, grad_output=None):
    """fn(x) and d(fn(x) * grad_output)/dx for a fresh leaf x = input."""
    x = input.detach().clone().requires_grad_()
    loss = fn(x)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss.detach(), grad


def assert_matches(actual, expected, dtype):
    # NaN only where both are NaN: the mean of an empty input.
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **TOLERANCES[dtype])


# --------------------------------------------------------------------------- equality with PyTorch's BCE


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(), (7,), (5, 9), (2, 3, 17), (0, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_torch_bce(device, dtype, shape, reduction):
    x = (torch.randn(shape) * 3).to(device, dtype)
    target = torch.rand(shape).to(device, dtype)
    pos_weight = (torch.rand(shape[-1:]) + 0.5).to(device) if shape else None
    grad_output = torch.randn(shape, device=device, dtype=dtype) if reduction == "none" else None

    loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, pos_weight=pos_weight,
                                                                  reduction=reduction), x, grad_output)
    expected, expected_grad = loss_and_grad(lambda x: torch_bce64(x, target, pos_weight=pos_weight,
                                                                  reduction=reduction), x.double(),
                                            None if grad_output is None else grad_output.double())
    assert loss.dtype == dtype and loss.shape == expected.shape
    assert_matches(loss, expected, dtype)
    assert grad.dtype == dtype
    assert_matches(grad, expected_grad, dtype)


def _broadcast_forms(shape):
    """Weights broadcastable to `shape` (N, M, L): named tensor factories."""
    n, m, num_labels = shape
    full = torch.rand(shape, dtype=torch.float64) + 0.5
    return {
        "none": None,
        "scalar": torch.tensor(1.7, dtype=torch.float64),
        "per_label": torch.rand(num_labels, dtype=torch.float64) + 0.5,
        "per_label_strided": (torch.rand(2 * num_labels, dtype=torch.float64) + 0.5)[::2],
        "leading_one": torch.rand(1, 1, num_labels, dtype=torch.float64) + 0.5,
        "middle": torch.rand(m, 1, dtype=torch.float64) + 0.5,
        "outer_and_last": torch.rand(n, 1, num_labels, dtype=torch.float64) + 0.5,
        "full": full,
        "full_transposed": full.transpose(0, 1).contiguous().transpose(0, 1),
        "float32": (torch.rand(num_labels) + 0.5),
    }


WEIGHT_FORMS = list(_broadcast_forms((2, 3, 4)))


@pytest.mark.parametrize("weight_form", WEIGHT_FORMS)
@pytest.mark.parametrize("pos_weight_form", ["none", "per_label", "middle", "outer_and_last"])
def test_weight_and_pos_weight_forms(device, weight_form, pos_weight_form):
    shape = (4, 6, 10)
    forms = _broadcast_forms(shape)
    weight = forms[weight_form]
    pos_weight = forms[pos_weight_form]
    weight = None if weight is None else weight.to(device)
    pos_weight = None if pos_weight is None else pos_weight.to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    target = torch.rand(shape, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        grad_output = torch.randn(shape, dtype=torch.float64, device=device) if reduction == "none" else None
        loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, weight, pos_weight, reduction), x,
                                   grad_output)
        expected, expected_grad = loss_and_grad(lambda x: torch_bce64(x, target, weight, pos_weight, reduction), x,
                                                grad_output)
        assert_matches(loss, expected, torch.float64)
        assert_matches(grad, expected_grad, torch.float64)


# ------------------------------------------------------------------------------------ target forms


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_labels", [37, 64, 4100])
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (1.0, 4.0, 0.05)])
def test_target_forms_agree(device, dtype, num_labels, focusing):
    """Float, float32, bool, uint8 and sparse targets of the same labels: same loss and gradient."""
    gamma_pos, gamma_neg, clip = focusing
    rows = 5
    x = (torch.randn(rows, num_labels) * 4).to(device, dtype)
    indices = random_indices(rows, num_labels, 6, device)
    pos_weight = (torch.rand(num_labels) + 0.5).to(device)
    targets = {
        "float": dict(target=dense_from(indices, num_labels, dtype)),
        "float32": dict(target=dense_from(indices, num_labels, torch.float32)),
        "bool": dict(target=dense_from(indices, num_labels, torch.bool)),
        "uint8": dict(target=dense_from(indices, num_labels, torch.uint8)),
        "sparse": dict(positive_indices=indices),
    }
    grad_output = torch.randn(rows, num_labels, device=device, dtype=dtype)
    for reduction in REDUCTIONS:
        results = {
            name: loss_and_grad(lambda x: weighted_bce_with_logits(
                x, pos_weight=pos_weight, reduction=reduction, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip,
                **kwargs), x, grad_output if reduction == "none" else None)
            for name, kwargs in targets.items()
        }
        loss, grad = results["float"]
        # The CPU kernels evaluate every target form with the same vector code: per-element values are equal
        # to the bit; only the order of a reduction's sum may differ. CUDA runs different kernels per form.
        exact = dict(rtol=0, atol=0) if device == "cpu" else TOLERANCES[dtype]
        for name, (other_loss, other_grad) in results.items():
            torch.testing.assert_close(other_loss, loss, **(exact if reduction == "none" else TOLERANCES[dtype]),
                                       msg=lambda m: f"{name} loss: {m}")
            torch.testing.assert_close(other_grad, grad, **exact, msg=lambda m: f"{name} grad: {m}")


def test_mean_over_tens_of_millions_of_elements_keeps_float32_accuracy(device):
    """2^25 + 5 elements whose loss is exactly log 2: a float32 running total of the blocks' sums errs the same
    way at every addition; the CPU adds them in double."""
    numel = 2**25 + 5
    logits = torch.zeros(1, device=device).expand(numel)
    target = torch.zeros(1, device=device).expand(numel)
    loss = weighted_bce_with_logits(logits, target)
    assert abs(loss.item() - math.log(2)) <= 1e-6 * math.log(2)


def test_bool_target_reads_any_nonzero_byte_as_true(device):
    """A bool target viewed from uint8 may hold bytes other than 0 / 1: every non-zero byte is a positive, as
    PyTorch reads bools (contiguous and strided kernels)."""
    padded = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).repeat(8, 17).to(device)
    bytes_ = padded[:, :67]
    x = torch.randn(8, 67, device=device)
    for transpose in (False, True):
        # clean: the same padded-row layout as raw (another layout sums in another grouping: other bits)
        raw, clean, logits = bytes_.view(torch.bool), (padded != 0)[:, :67], x
        if transpose:
            raw, clean, logits = raw.t(), clean.t(), logits.t()
        for reduction in REDUCTIONS:
            expected = loss_and_grad(lambda z: weighted_bce_with_logits(z, clean, reduction=reduction), logits)
            actual = loss_and_grad(lambda z: weighted_bce_with_logits(z, raw, reduction=reduction), logits)
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_sparse_rows_are_sets_and_padding_anywhere(device):
    x = torch.randn(3, 12, device=device)
    with_duplicates = torch.tensor([[2, 2, -1, 5, -1], [-1, -1, -1, -1, -1], [11, 0, 11, 0, 3]], device=device)
    as_sets = torch.tensor([[2, 5, -1], [-1, -1, -1], [0, 3, 11]], device=device)
    loss = weighted_bce_with_logits(x, positive_indices=with_duplicates, reduction="none")
    torch.testing.assert_close(loss, weighted_bce_with_logits(x, positive_indices=as_sets, reduction="none"),
                               rtol=0, atol=0)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(x, dense_from(as_sets, 12, x.dtype),
                                                                        reduction="none"))


@pytest.mark.parametrize("rows, max_positives", [(0, 3), (4, 0)])
def test_sparse_empty(device, rows, max_positives):
    x = torch.randn(rows, 6, device=device, requires_grad=True)
    indices = torch.full((rows, max_positives), -1, dtype=torch.int64, device=device)
    loss = weighted_bce_with_logits(x, positive_indices=indices, reduction="sum")
    expected = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="sum")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()))


# ------------------------------------------------------------------------------- focusing and stability


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focusing", [None, (1.0, 4.0, 0.05)])
def test_target_gradient(device, reduction, focusing):
    """A soft target that requires grad is differentiated as F.binary_cross_entropy_with_logits does (d loss /
    d target = weight (pos_weight l_pos - l_neg)), also with focusing; the input's gradient is unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=gen, dtype=torch.float64).to(device)
    t = torch.rand(6, 11, generator=gen, dtype=torch.float64).to(device)
    weight = torch.rand(6, 11, generator=gen, dtype=torch.float64).to(device)
    pos_weight = (3 * torch.rand(11, generator=gen, dtype=torch.float64)).to(device)
    focus = dict(zip(("gamma_pos", "gamma_neg", "clip"), focusing)) if focusing else {}

    def fused(a, b):
        return weighted_bce_with_logits(a, b, weight, pos_weight, reduction, **focus)

    def expected(a, b):
        if focusing is None:
            return F.binary_cross_entropy_with_logits(a, b, weight, pos_weight=pos_weight, reduction=reduction)
        return reference.weighted_bce_with_logits(a, b, weight, pos_weight, reduction, **focus)

    assert torch.autograd.gradcheck(fused, (x.clone().requires_grad_(), t.clone().requires_grad_()))
    a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
    c, d = x.clone().requires_grad_(), t.clone().requires_grad_()
    upstream = torch.rand_like(fused(x, t))
    for actual, wanted in zip(torch.autograd.grad(fused(a, b), (a, b), upstream),
                              torch.autograd.grad(expected(c, d), (c, d), upstream)):
        torch.testing.assert_close(actual, wanted, **TOLERANCES[torch.float64])
    # float32 logits with a float32 target: the target's gradient comes back in its dtype.
    b32 = t.float().requires_grad_()
    (grad_target,) = torch.autograd.grad(fused(x.float(), b32).sum(), b32)
    assert grad_target.dtype == torch.float32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("focusing", FOCUSING)
def test_focusing_matches_reference(device, dtype, focusing):
    gamma_pos, gamma_neg, clip = focusing
    shape = (6, 33)
    x = (torch.randn(shape) * 3).to(device, dtype)
    target = torch.rand(shape).to(device, dtype)  # soft labels mix the two terms
    weight = (torch.rand(shape[0], 1) + 0.5).to(device)
    pos_weight = (torch.rand(shape[1]) + 0.5).to(device)
    options = dict(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    for reduction in REDUCTIONS:
        grad_output = torch.randn(shape, device=device, dtype=dtype) if reduction == "none" else None
        loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, weight, pos_weight, reduction,
                                                                      **options), x, grad_output)
        expected, expected_grad = loss_and_grad(
            lambda x: reference.weighted_bce_with_logits(x, target.double(), weight.double(), pos_weight.double(),
                                                         reduction, **options),
            x.double(), None if grad_output is None else grad_output.double())
        assert_matches(loss, expected, dtype)
        assert_matches(grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0)] + FOCUSING)
def test_extreme_logits_stay_finite(device, dtype, focusing):
    gamma_pos, gamma_neg, clip = focusing
    logits = torch.tensor([-1e4, -300.0, -30.0, -1.0, 0.0, 1.0, 30.0, 300.0, 1e4])
    x = logits.repeat(3).to(device, dtype)
    target = torch.tensor([0.0, 1.0, 0.5]).repeat_interleave(len(logits)).to(device, dtype)
    options = dict(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, reduction="none", **options), x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected, expected_grad = loss_and_grad(
        lambda x: reference.weighted_bce_with_logits(x, target.double(), reduction="none", **options), x.double())
    assert torch.isfinite(expected).all() and torch.isfinite(expected_grad).all()
    assert_matches(loss, expected, dtype)
    assert_matches(grad, expected_grad, dtype)
    mean_loss, mean_grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, **options), x)
    assert torch.isfinite(mean_loss) and torch.isfinite(mean_grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_focusing_parameters_below_the_accumulation_range_are_zero(device, dtype):
    """A clip or gamma that rounds to 0 in float32 accumulation takes the formulas of 0, bit for bit (the kernels
    choose plain / focal / ASL formulas from the values they compute with), and so does a clip below float32's
    normal range (bce_math.h: it moves no probability that matters)."""
    x = (torch.randn(7, 33, generator=torch.Generator().manual_seed(5)) * 4).to(device, dtype)
    target = (torch.rand(7, 33, generator=torch.Generator().manual_seed(6)) < 0.3).to(device)
    for tiny, zero in [(dict(gamma_neg=2.0, clip=1e-50), dict(gamma_neg=2.0)),
                       (dict(gamma_neg=2.0, clip=1e-40), dict(gamma_neg=2.0)),
                       (dict(gamma_pos=1e-50), {})]:
        loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, reduction="none", **tiny), x)
        expected, expected_grad = loss_and_grad(
            lambda x: weighted_bce_with_logits(x, target, reduction="none", **zero), x)
        assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)


# ------------------------------------------------------------------------------------------- layouts


def test_non_contiguous_operands(device):
    """Transposed / sliced logits and targets, a stride-0 grad_output and sparse rows with a row stride."""
    base = torch.randn(40, 24, dtype=torch.float64, device=device) * 3
    target_base = torch.rand(24, 40, dtype=torch.float64, device=device)
    pos_weight = torch.rand(24, dtype=torch.float64, device=device) + 0.5
    cases = {
        "transposed": (base.t().contiguous().t(), target_base.t()),
        "sliced": (base[::2, 1:], target_base.t()[::2, 1:]),
        "offset_by_one": (base.flatten()[1:].view(-1, 7)[:, :], torch.rand(137, 7, dtype=torch.float64,
                                                                              device=device)),
    }
    for name, (x, target) in cases.items():
        assert not x.is_contiguous() or x.data_ptr() % 16 != 0, name
        pw = pos_weight[: x.shape[-1]] if x.shape[-1] <= 24 else None
        for reduction in REDUCTIONS:
            loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, pos_weight=pw,
                                                                          reduction=reduction), x)
            expected, expected_grad = loss_and_grad(lambda x: torch_bce64(x, target, pos_weight=pw,
                                                                          reduction=reduction), x)
            assert_matches(loss, expected, torch.float64)
            assert_matches(grad, expected_grad, torch.float64)

    # loss.sum() on reduction='none' hands the backward an expanded (stride-0) grad_output.
    for target in (target_base.t(), target_base.t().contiguous()):
        x = base.clone().requires_grad_()
        weighted_bce_with_logits(x, target, pos_weight=pos_weight, reduction="none").sum().backward()
        x_ref = base.clone().requires_grad_()
        F.binary_cross_entropy_with_logits(x_ref, target, pos_weight=pos_weight, reduction="none").sum().backward()
        assert_matches(x.grad, x_ref.grad, torch.float64)

    # Sparse targets on a row-strided, column-strided input.
    wide = torch.randn(10, 50, dtype=torch.float64, device=device)
    x = wide[:, ::2]
    indices = random_indices(10, 25, 4, device)
    loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, positive_indices=indices, gamma_neg=2.0), x)
    expected, expected_grad = loss_and_grad(
        lambda x: reference.weighted_bce_with_logits(x, positive_indices=indices, gamma_neg=2.0), x)
    assert_matches(loss, expected, torch.float64)
    assert_matches(grad, expected_grad, torch.float64)


def test_permuted_layouts_of_many_dimensions(device):
    """Logits, target and a weight in layouts where no two neighbouring dimensions merge: three and five strided
    dimensions (the weight broadcast along the middle ones), and nine, more than a strided layout keeps
    (kMaxLayoutDims): every operand is then made contiguous first."""
    # (3, 4, 2, 5, 6) views of storage in another order.
    x = torch.randn(6, 2, 5, 3, 4, dtype=torch.float64, device=device).permute(3, 4, 1, 2, 0) * 3
    target = torch.rand(6, 5, 4, 3, 2, dtype=torch.float64, device=device).permute(3, 2, 4, 1, 0)
    weight = torch.rand(3, 1, 2, 1, 6, dtype=torch.float64, device=device) + 0.5
    # (2,) * 9 viewed from storage in the order 8, 6, 4, 2, 0, 7, 5, 3, 1.
    order = (8, 6, 4, 2, 0, 7, 5, 3, 1)
    x9 = torch.randn((2,) * 9, dtype=torch.float64, device=device).permute([order.index(d) for d in range(9)])
    target9 = torch.rand((2,) * 9, dtype=torch.float64, device=device).transpose(0, 8)
    weight9 = torch.rand((2,) + (1,) * 7 + (2,), dtype=torch.float64, device=device) + 0.5
    cases = {"five_dims": (x, target, weight),
             "three_dims": (x[:, :, 0, 0, :], target[:, :, 0, 0, :], weight[:, :, 0, 0, :]),
             "nine_dims": (x9, target9, weight9)}
    pos_weight = {name: torch.rand(y.shape[-1], dtype=torch.float64, device=device) + 0.5
                  for name, (_, y, _) in cases.items()}
    for name, (x, y, w) in cases.items():
        assert not x.is_contiguous(), name
        for reduction in REDUCTIONS:
            kwargs = dict(weight=w, pos_weight=pos_weight[name], reduction=reduction)
            loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, y, **kwargs), x)
            expected, expected_grad = loss_and_grad(lambda x: torch_bce64(x, y, **kwargs), x)
            assert_matches(loss, expected, torch.float64)
            assert_matches(grad, expected_grad, torch.float64)


def test_any_grad_output_and_repeated_backward(device):
    x = torch.randn(7, 19, device=device, requires_grad=True)
    target = torch.rand(7, 19, device=device) > 0.7
    loss = weighted_bce_with_logits(x, target, reduction="none", gamma_neg=2.0, clip=0.05)
    grad_output = torch.randn(7, 19, device=device)
    loss.backward(grad_output, retain_graph=True)
    first = x.grad.clone()
    loss.backward(grad_output * 3)
    torch.testing.assert_close(x.grad, first * 4)
    expected, expected_grad = loss_and_grad(lambda x: reference.weighted_bce_with_logits(
        x, target, reduction="none", gamma_neg=2.0, clip=0.05), x.detach(), grad_output)
    torch.testing.assert_close(first, expected_grad)


# -------------------------------------------------------------------------- torch.library integration


def _op_variants(device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    indices = random_indices(4, 9, 3, device)
    pos_weight = torch.rand(9, dtype=torch.float64, device=device) + 0.5
    weight = torch.rand(4, 1, dtype=torch.float64, device=device)
    return {
        "dense_float": (x, torch.rand(4, 9, dtype=torch.float64, device=device), None, weight, pos_weight, "mean",
                        0.0, 0.0, 0.0),
        "dense_bool_focal": (x, dense_from(indices, 9, torch.bool), None, None, pos_weight, "none", 2.0, 2.0, 0.0),
        "sparse_asl": (x, None, indices, weight, pos_weight, "sum", 1.0, 4.0, 0.05),
    }


@pytest.mark.parametrize("write_gradient", [False, True])
@pytest.mark.parametrize("variant", ["dense_float", "dense_bool_focal", "sparse_asl"])
def test_opcheck(device, variant, write_gradient):
    args = list(_op_variants(device)[variant])
    if write_gradient and args[5] == "none":
        pytest.skip("the forward writes the gradient for reduced losses only")
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.fused_losses.weighted_bce_with_logits, (*args, write_gradient))
    if write_gradient:
        _, gradient = torch.ops.fused_losses.weighted_bce_with_logits(*args, True)
        grad_loss = torch.tensor(0.5, dtype=args[0].dtype, device=device)
        torch.library.opcheck(torch.ops.fused_losses.weighted_bce_with_logits_backward_inplace,
                              (grad_loss, gradient, args[0].detach(), *args[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target_form", ["float", "bool", "sparse"])
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (1.0, 4.0, 0.05)])
def test_forward_written_gradient(device, dtype, reduction, target_form, focusing, monkeypatch):
    """The gradient written by the forward (2-pass) is bitwise the 3-pass backward's, for any grad_output
    and repeated backwards; odd sizes reach the vector tails."""
    gamma_pos, gamma_neg, clip = focusing
    x = (torch.randn(37, 203, device=device) * 3).to(dtype)
    indices = random_indices(37, 203, 5, device)
    target = {"float": torch.rand(37, 203, device=device), "bool": dense_from(indices, 203, torch.bool),
              "sparse": None}[target_form]
    pos_weight = torch.rand(203, device=device) + 0.5

    def loss(x):
        return weighted_bce_with_logits(x, target, pos_weight=pos_weight, reduction=reduction,
                                        positive_indices=indices if target is None else None,
                                        gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)

    assert_gradient_schedules_agree(loss, [x], monkeypatch)


def test_forward_written_gradient_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="write_gradient needs a reduced loss"):
        torch.ops.fused_losses.weighted_bce_with_logits(x, torch.rand(4, 5), None, None, None, "none", 0.0, 0.0,
                                                        0.0, True)
    with pytest.raises(ValueError, match=r"gradient must be a contiguous tensor of the input's shape \[4, 5\]"):
        torch.ops.fused_losses.weighted_bce_with_logits_backward_inplace(
            torch.tensor(2.0), torch.empty(0), x, torch.rand(4, 5), None, None, None, "mean", 0.0, 0.0, 0.0)


def _logits_away_from_clip_kink(shape, clip, device):
    """float64 logits whose sigmoid is at least 0.02 away from `clip` (finite differences must not cross it)."""
    x = torch.linspace(-4, 4, int(torch.tensor(shape).prod())).reshape(shape)[:, torch.randperm(shape[1])]
    if clip > 0:
        p = torch.sigmoid(x)
        x = torch.where((p - clip).abs() < 0.02, x + 0.5, x)
        assert ((torch.sigmoid(x) - clip).abs() >= 0.02).all()
    return x.to(device, torch.float64).requires_grad_()


@pytest.mark.parametrize("target_form", ["float", "bool", "sparse"])
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (2.0, 2.0, 0.0), (0.5, 3.0, 0.1), (1.0, 0.7, 0.3)])
def test_gradcheck(device, target_form, focusing):
    gamma_pos, gamma_neg, clip = focusing
    shape = (4, 7)
    x = _logits_away_from_clip_kink(shape, clip, device)
    indices = random_indices(4, 7, 3, device)
    targets = {"float": dict(target=torch.rand(shape, dtype=torch.float64, device=device)),
               "bool": dict(target=dense_from(indices, 7, torch.bool)),
               "sparse": dict(positive_indices=indices)}
    weight = torch.rand(4, 1, dtype=torch.float64, device=device) + 0.5
    pos_weight = torch.rand(7, dtype=torch.float64, device=device) + 0.5
    for reduction in ("none", "mean"):
        def fn(x):
            return weighted_bce_with_logits(x, weight=weight, pos_weight=pos_weight, reduction=reduction,
                                            gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, **targets[target_form])
        assert torch.autograd.gradcheck(fn, (x,))


def test_weight_and_pos_weight_as_array_likes(device):
    """Nested lists and NumPy arrays are accepted by the functional form as by the module (and as the
    cost-sensitive cross-entropy takes its weight and cost matrix), on the input's device."""
    x, target = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    weight, pos_weight = [[1.0], [0.5], [2.0]], [1.0, 2.0, 3.0, 0.5]
    expected = F.binary_cross_entropy_with_logits(x, target, torch.tensor(weight, device=device),
                                                  pos_weight=torch.tensor(pos_weight, device=device))
    for as_array in (list, np.array):
        torch.testing.assert_close(weighted_bce_with_logits(x, target, as_array(weight), as_array(pos_weight)),
                                   expected)


def test_compile_fullgraph_matches_eager(device):
    x = torch.randn(8, 40, device=device)
    indices = random_indices(8, 40, 5, device)
    target = dense_from(indices, 40, torch.bool)
    pos_weight = torch.rand(40, device=device) + 0.5

    def step(x):
        dense = weighted_bce_with_logits(x, target, pos_weight=pos_weight, gamma_neg=2.0)
        sparse = weighted_bce_with_logits(x, positive_indices=indices, clip=0.05, reduction="sum")
        return dense + 0.01 * sparse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss, grad = loss_and_grad(compiled, x)
    expected, expected_grad = loss_and_grad(step, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_deterministic_across_runs_and_threads(device):
    x = torch.randn(300, 1000, device=device) * 4  # several fixed blocks of the deterministic sum
    target = torch.rand(300, 1000, device=device)
    indices = random_indices(300, 1000, 8, device)

    def run():
        dense = loss_and_grad(lambda x: weighted_bce_with_logits(x, target, gamma_neg=1.5, clip=0.05), x)
        sparse = loss_and_grad(lambda x: weighted_bce_with_logits(x, positive_indices=indices), x)
        return dense + sparse

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        results = [run(), run()]
    finally:
        torch.set_num_threads(threads)
    for result in results:
        for value, expected in zip(result, single):
            assert torch.equal(value, expected)


# --------------------------------------------------------------------------------------------- module


def test_module(device):
    pos_weight = [1.0, 2.0, 3.0, 0.5]
    criterion = WeightedBCEWithLogitsLoss(weight=[[1.0], [2.0]], pos_weight=pos_weight, gamma_neg=2.0, clip=0.05)
    assert set(criterion.state_dict()) == {"weight", "pos_weight"}
    criterion = criterion.to(device)
    assert criterion.pos_weight.device.type == device
    x = torch.randn(2, 4, device=device)
    indices = torch.tensor([[0, -1], [3, 1]], device=device)
    expected = weighted_bce_with_logits(x, positive_indices=indices, weight=criterion.weight,
                                        pos_weight=criterion.pos_weight, gamma_neg=2.0, clip=0.05)
    torch.testing.assert_close(criterion(x, positive_indices=indices), expected, rtol=0, atol=0)
    torch.testing.assert_close(criterion(x, dense_from(indices, 4, torch.uint8)), expected)
    assert "gamma_neg=2.0" in repr(criterion)
    with pytest.raises(ValueError, match="gamma_neg must be a finite number >= 0"):
        WeightedBCEWithLogitsLoss(gamma_neg=-1.0)
    with pytest.raises(ValueError, match="clip must be in"):
        WeightedBCEWithLogitsLoss(clip=1.0)


# --------------------------------------------------------------------------------------------- errors


def _error_cases(device):
    x = torch.randn(3, 5, device=device)
    target = torch.rand(3, 5, device=device)
    indices = torch.tensor([[0, -1], [4, 2], [-1, -1]], device=device)
    return {
        "both_targets": (lambda: weighted_bce_with_logits(x, target, positive_indices=indices),
                         ValueError, "exactly one of target .* got both"),
        "no_target": (lambda: weighted_bce_with_logits(x), ValueError, "exactly one of target .* got neither"),
        "target_shape": (lambda: weighted_bce_with_logits(x, target[:, :4]), ValueError,
                         r"target must have the input's shape \[3, 5\], got \[3, 4\]"),
        "target_int64": (lambda: weighted_bce_with_logits(x, target.long()), TypeError,
                         "target must be a float tensor .* or float32, bool or uint8 .* positive_indices"),
        "weight_broadcast": (lambda: weighted_bce_with_logits(x, target, weight=torch.ones(4, device=device)),
                             ValueError, r"weight of shape \[4\] is not broadcastable to the input's shape \[3, 5\]"),
        "pos_weight_broadcast": (lambda: weighted_bce_with_logits(x, target, pos_weight=torch.ones(2, 5, device=device)),
                                 ValueError, r"pos_weight of shape \[2, 5\] is not broadcastable"),
        "pos_weight_int": (lambda: weighted_bce_with_logits(x, target, pos_weight=torch.ones(5, dtype=torch.int64,
                                                                                               device=device)),
                           TypeError, "pos_weight must be float32, float16, bfloat16 or float64"),
        "index_too_large": (lambda: weighted_bce_with_logits(x, positive_indices=indices + 1), ValueError,
                            r"positive_indices contains 5 \(row 1\), outside \[0, 5\) and not the padding value -1"),
        "index_below_padding": (lambda: weighted_bce_with_logits(x, positive_indices=indices - 2), ValueError,
                                r"positive_indices contains -2 .* outside \[0, 5\)"),
        "index_float": (lambda: weighted_bce_with_logits(x, positive_indices=indices.float()), TypeError,
                        "positive_indices must be int64 label indices"),
        "target_sparse": (lambda: weighted_bce_with_logits(x, target.to_sparse()), TypeError,
                          r"target must be a dense tensor \(torch.strided layout\), got layout torch.sparse_coo; for "
                          r"sparse multi-label targets pass positive_indices"),
        "input_sparse_csr": (lambda: weighted_bce_with_logits(x.to_sparse_csr(), target), TypeError,
                             r"input must be a dense tensor \(torch.strided layout\), got layout torch.sparse_csr$"),
        "input_nested": (lambda: weighted_bce_with_logits(torch.nested.as_nested_tensor([x, x[:2]],
                                                                                       layout=torch.jagged), target),
                         TypeError, r"input must be a dense tensor \(torch.strided layout\), got a nested tensor"),
        "weight_sparse": (lambda: weighted_bce_with_logits(x, target, weight=torch.ones(5, device=device).to_sparse()),
                          TypeError, r"weight must be a dense tensor \(torch.strided layout\), got layout"),
        "positive_indices_sparse": (lambda: weighted_bce_with_logits(x, positive_indices=indices.to_sparse()),
                                    TypeError, r"positive_indices must be a dense tensor"),
        "index_rows": (lambda: weighted_bce_with_logits(x, positive_indices=indices[:2]), ValueError,
                       r"positive_indices must have shape \(N, K\) = \(3, K\)"),
        "sparse_3d_input": (lambda: weighted_bce_with_logits(x[None], positive_indices=indices), ValueError,
                            r"input must have shape \(N, L\) when positive_indices is given"),
        "input_int": (lambda: weighted_bce_with_logits(x.long(), target), TypeError,
                      "input must be float32, float16, bfloat16 or float64"),
        "reduction": (lambda: weighted_bce_with_logits(x, target, reduction="avg"), ValueError,
                      "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        "gamma": (lambda: weighted_bce_with_logits(x, target, gamma_pos=-0.5), ValueError,
                  "gamma_pos must be a finite number >= 0, got -0.5"),
        "gamma_infinite": (lambda: weighted_bce_with_logits(x, target, gamma_neg=math.inf), ValueError,
                           "gamma_neg must be a finite number >= 0, got inf"),
        "gamma_none": (lambda: weighted_bce_with_logits(x, target, gamma_pos=None), TypeError,
                       "gamma_pos must be a real number, got NoneType"),
        "clip_none": (lambda: weighted_bce_with_logits(x, target, clip=None), TypeError,
                      "clip must be a real number, got NoneType"),
        "weight_not_numbers": (lambda: weighted_bce_with_logits(x, target, weight="ones"), TypeError,
                               "weight must be a tensor or an array-like of numbers"),
        "clip_high": (lambda: weighted_bce_with_logits(x, target, clip=1.0), ValueError, r"clip must be in \[0, 1\)"),
        "clip_negative": (lambda: weighted_bce_with_logits(x, target, clip=-0.1), ValueError,
                          r"clip must be in \[0, 1\)"),
        "weight_requires_grad": (lambda: weighted_bce_with_logits(x, target, weight=torch.ones(5, device=device,
                                                                                              requires_grad=True)),
                                 ValueError, "weight must not require grad"),
        "op_direct_gamma": (lambda: torch.ops.fused_losses.weighted_bce_with_logits(x, target, None, None, None,
                                                                                    "mean", 0.0, -1.0, 0.0, False),
                            ValueError, "gamma_pos and gamma_neg must be finite numbers >= 0"),
        "op_direct_gamma_infinite": (lambda: torch.ops.fused_losses.weighted_bce_with_logits(
            x, target, None, None, None, "mean", math.inf, 0.0, 0.0, False),
            ValueError, "gamma_pos and gamma_neg must be finite numbers >= 0"),
    }


ERROR_CASES = list(_error_cases("cpu"))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors(device, case):
    if device != "cpu" and case.startswith("index_") and case != "index_float" and case != "index_rows":
        pytest.skip("index values are validated on CUDA only with FUSED_LOSSES_CHECK=1 (test_cuda_invalid_indices)")
    call, error, match = _error_cases(device)[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch():
    x = torch.randn(3, 5, device="cuda")
    with pytest.raises(ValueError, match="target must be on the same device as input"):
        weighted_bce_with_logits(x, torch.rand(3, 5))
    with pytest.raises(ValueError, match="pos_weight must be on the same device as input"):
        weighted_bce_with_logits(x, torch.rand(3, 5, device="cuda"), pos_weight=torch.ones(5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_invalid_indices(monkeypatch):
    """Unchecked, a row with an invalid index is NaN (never out-of-bounds memory); FUSED_LOSSES_CHECK=1 raises."""
    x = torch.randn(3, 5, device="cuda", requires_grad=True)
    indices = torch.tensor([[0, -1], [7, 2], [-1, -3]], device="cuda")
    loss = weighted_bce_with_logits(x, positive_indices=indices, reduction="none")
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1:]).all() and torch.isfinite(x.grad[0]).all()
    monkeypatch.setattr(validation, "CHECK_DATA_ON_CUDA", True)
    with pytest.raises(ValueError, match=r"positive_indices contains 7 \(row 1\)"):
        weighted_bce_with_logits(x, positive_indices=indices)


def test_strided_dense_targets_are_copied_for_the_flat_kernels():
    """On CUDA a dense target in a layout the flat kernels cannot read (a padded-row slice, a transposed view) is
    copied once before the operator; a broadcast target (a copy would materialise it), a contiguous one, and any
    target beside logits that are not contiguous themselves are passed as they are."""
    from fused_losses.functional import _copy_target_for_flat_kernels as copies
    x = torch.randn(6, 5)
    wide = torch.rand(6, 7)
    assert copies(x, wide[:, :5])  # padded rows
    assert copies(x, torch.rand(5, 6).t())  # transposed
    assert not copies(x, torch.rand(6, 5))  # contiguous
    assert not copies(x, torch.rand(1, 5).expand(6, 5))  # broadcast along the rows
    assert not copies(x, torch.rand(6, 1).expand(6, 5)[:, :5])  # broadcast along the labels
    assert not copies(torch.randn(5, 6).t(), wide[:, :5])  # the logits themselves are strided
    assert not copies(torch.randn(31)[1:].view(6, 5), wide[:, :5])  # logits 4 bytes off 16: strided anyway


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["padded", "transposed"])
def test_cuda_strided_target_runs_the_flat_kernels(layout):
    """A padded or transposed target beside contiguous logits is copied once, so every pass runs the flat kernels,
    never the strided one, and gives the contiguous target's loss and gradient bit for bit: 'mean' with
    grad_output 1 (the forward's gradient kept) and 2.5 (recomputed in place), and 'none'."""
    x = torch.randn(64, 300, device="cuda", dtype=torch.bfloat16) * 3
    dense = (torch.rand(64, 300, device="cuda") < 0.05).to(torch.bfloat16)
    strided = (torch.cat([dense, dense[:, :4]], dim=1)[:, :300] if layout == "padded"
               else dense.t().contiguous().t())
    assert not strided.is_contiguous() and torch.equal(strided, dense)
    pos_weight = torch.rand(300, device="cuda") + 0.5
    calls = [("mean", 1.0), ("mean", 2.5), ("none", 2.5)]

    def run(target, reduction, scale):
        z = x.detach().clone().requires_grad_()
        loss = weighted_bce_with_logits(z, target, pos_weight=pos_weight, gamma_neg=2.0, clip=0.05,
                                        reduction=reduction)
        (grad,) = torch.autograd.grad((loss * scale).sum(), z)
        return loss.detach(), grad

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        got = [run(strided, *call) for call in calls]
        torch.cuda.synchronize()
    names = {event.name for event in profile.events() if "fused_losses" in event.name}
    if names:  # without CUPTI (a gVisor machine) the profiler records nothing: the values are still compared
        assert any("flat_kernel" in n for n in names) and not any("strided_kernel" in n for n in names), names
    for call, (loss, grad) in zip(calls, got):
        want_loss, want_grad = run(dense, *call)
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad), call


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["float", "bool", "sparse"])
def test_cuda_grid_stride_loops(form):
    """More work than one pass of the grid (16384 blocks for the passes that sum; the backwards' and 'none''s
    one wave of resident blocks is smaller): every thread / warp loops several times."""
    rows, num_labels = (140_000, 40) if form == "sparse" else (70_001, 1000)  # odd numel: a flat tail too
    x = torch.randn(rows, num_labels, device="cuda") * 3
    indices = random_indices(rows, num_labels, 4, "cuda")
    target = dense_from(indices, num_labels, torch.float32)
    pos_weight = torch.rand(num_labels, device="cuda") + 0.5
    kwargs = dict(positive_indices=indices) if form == "sparse" else dict(
        target=target if form == "float" else target.bool())
    for reduction in ("mean", "none"):
        loss, grad = loss_and_grad(lambda x: weighted_bce_with_logits(x, pos_weight=pos_weight, reduction=reduction,
                                                                      **kwargs), x)
        expected, expected_grad = loss_and_grad(lambda x: torch_bce64(x, target, pos_weight=pos_weight,
                                                                      reduction=reduction), x.double())
        scale = x.numel() if reduction == "mean" else 1  # mean gradients (~1e-8) would sit below atol
        assert_matches(loss, expected, torch.float32)
        assert_matches(grad * scale, expected_grad * scale, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    """Forward + backward capture into a CUDA graph (no host synchronisation inside the ops) and replay
    correctly on new logits."""
    static_x = torch.randn(64, 100, device="cuda", requires_grad=True)
    indices = random_indices(64, 100, 5, "cuda")
    target = dense_from(indices, 100, torch.bool)
    pos_weight = torch.rand(100, device="cuda") + 0.5

    def step(x):
        dense = weighted_bce_with_logits(x, target, pos_weight=pos_weight, gamma_neg=2.0)
        sparse = weighted_bce_with_logits(x, positive_indices=indices, clip=0.05, reduction="sum")
        loss = dense + 0.01 * sparse
        return loss, torch.autograd.grad(loss, x)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step(static_x)
    new_x = torch.randn(64, 100, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    expected, expected_grad = step(new_x.clone().requires_grad_())
    torch.testing.assert_close(static_loss, expected)
    torch.testing.assert_close(static_grad, expected_grad)


def test_exports():
    assert fused_losses.weighted_bce_with_logits is weighted_bce_with_logits
    assert "WeightedBCEWithLogitsLoss" in fused_losses.__all__


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cuda_opcheck_misaligned_input(reduction):
    """Logits and target one element off 16 bytes (the flat kernel peels a head): the outputs are plain
    contiguous tensors (storage offset 0), as the fake kernel's, so opcheck's fake-tensor check passes."""
    def offset_by_one(tensor):
        return torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device="cuda")[1:].view(tensor.shape).copy_(tensor)

    x = offset_by_one(torch.randn(6, 37, device="cuda")).requires_grad_()
    target = offset_by_one(torch.rand(6, 37, device="cuda"))
    args = (x, target, None, None, torch.rand(37, device="cuda") + 0.5, reduction, 0.0, 0.0, 0.0)
    for write_gradient in [False] + ([True] if reduction != "none" else []):
        torch.library.opcheck(torch.ops.fused_losses.weighted_bce_with_logits, (*args, write_gradient))
        outputs = torch.ops.fused_losses.weighted_bce_with_logits(*args, write_gradient)
        assert all(output.storage_offset() == 0 for output in outputs)
    grad_loss = torch.rand(6, 37, device="cuda") if reduction == "none" else torch.tensor(0.5, device="cuda")
    grad = torch.ops.fused_losses.weighted_bce_with_logits_backward(grad_loss, x.detach(), *args[1:])
    assert grad.storage_offset() == 0
    torch.library.opcheck(torch.ops.fused_losses.weighted_bce_with_logits_backward, (grad_loss, x.detach(), *args[1:]))
