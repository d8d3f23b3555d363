"""Tests of the Pearson and concordance (CCC) correlation losses: against the pure-PyTorch reference and closed
forms, over layouts, masks, dtypes and reductions; edge cases (flat, short, empty, NaN); stability far from
zero; operator registration (opcheck, gradcheck, torch.compile); errors; determinism."""

import numpy as np
import pytest
import torch

import fused_losses
from fused_losses import reference
from conftest import FLOAT_DTYPES, TOLERANCES, assert_gradient_schedules_agree

KINDS = {
    "pearson": (fused_losses.pearson_correlation_loss, reference.pearson_correlation_loss),
    "concordance": (fused_losses.concordance_correlation_loss, reference.concordance_correlation_loss),
}
MODULES = {"pearson": fused_losses.PearsonCorrelationLoss, "concordance": fused_losses.ConcordanceCorrelationLoss}
REDUCTIONS = ["none", "mean", "sum"]

# (shape, dim): batch-first (B, T), (B, T, 1), (B, T, D); time-major (T, B, D); channels before time (B, D, T).
LAYOUTS = {
    "BT": ((5, 23), 1),
    "BT1": ((5, 23, 1), 1),
    "BTD": ((4, 19, 3), 1),
    "TBD": ((19, 4, 3), 0),
    "BDT": ((4, 3, 19), -1),
}


def mask_shape(shape, dim):
    """The mask has the input's shape without the channel axis (the second non-time axis)."""
    ndim = len(shape)
    time = dim % ndim
    others = [a for a in range(ndim) if a != time]
    mask_axes = [a for a in range(ndim) if a != (others[1] if ndim == 3 else None)]
    # (mask shape, batch axis of the input, time axis of the input, time axis of the mask)
    return tuple(shape[a] for a in mask_axes), others[0], time, mask_axes.index(time)


def make_case(shape, dim, device, dtype=torch.float64, masking="mask"):
    x = torch.randn(shape, dtype=torch.float64)
    y = 0.6 * x + 0.8 * torch.randn(shape, dtype=torch.float64) + 0.3
    kwargs = {"dim": dim}
    m_shape, batch_axis, time_axis, mask_time_axis = mask_shape(shape, dim)
    if masking == "mask":
        mask = torch.rand(m_shape) > 0.3
        mask.select(mask_time_axis, 0).fill_(True)  # at least a few valid steps everywhere
        mask.select(mask_time_axis, 1).fill_(True)
        kwargs["mask"] = mask.to(device)
    elif masking == "lengths":
        lengths = torch.randint(2, shape[time_axis] + 1, (shape[batch_axis],))
        kwargs["lengths"] = lengths.to(device)
    return x.to(device, dtype), y.to(device, dtype), kwargs


def loss_and_grads(fn, x, y, upstream=None, **kwargs):
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    loss = fn(x, y, **kwargs)
    upstream = torch.randn_like(loss) if upstream is None else upstream
    grad_x, grad_y = torch.autograd.grad(loss, (x, y), upstream)
    return loss, grad_x, grad_y, upstream


def assert_close_scaled(actual, expected, rtol, atol):
    """Compares with atol relative to the largest magnitude (gradients have no natural unit)."""
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masking", ["none", "mask", "lengths"])
@pytest.mark.parametrize("per_timestep", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_float64(device, kind, layout, masking, per_timestep, reduction):
    fused, ref = KINDS[kind]
    shape, dim = LAYOUTS[layout]
    x, y, kwargs = make_case(shape, dim, device, masking=masking)
    kwargs.update(reduction=reduction, per_timestep=per_timestep)
    loss, gx, gy, upstream = loss_and_grads(fused, x, y, **kwargs)
    ref_loss, ref_gx, ref_gy, _ = loss_and_grads(ref, x, y, upstream, **kwargs)
    expected_shape = {"none": ref_loss.shape}.get(reduction, ())
    assert loss.shape == expected_shape and loss.dtype == x.dtype
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(gx, ref_gx, **tol)
    torch.testing.assert_close(gy, ref_gy, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes(device, kind):
    fused, _ = KINDS[kind]
    cases = {(6, 10): ((6,), (6, 10)), (6, 10, 1): ((6, 1), (6, 10, 1)), (6, 10, 4): ((6, 4), (6, 10, 4))}
    for shape, (per_sequence, per_step) in cases.items():
        x, y = torch.randn(shape, device=device), torch.randn(shape, device=device)
        assert fused(x, y, reduction="none").shape == per_sequence
        assert fused(x, y, reduction="none", per_timestep=True).shape == per_step
        assert fused(x, y).shape == () and fused(x, y, reduction="sum").shape == ()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_timestep", [False, True])
def test_dtypes(device, kind, dtype, per_timestep):
    """Every dtype against the reference in float64 on the same (rounded) values; grads in the input dtype."""
    fused, ref = KINDS[kind]
    x, y, kwargs = make_case((6, 150, 2), 1, device, dtype=dtype)
    kwargs.update(reduction="none", per_timestep=per_timestep)
    loss, gx, gy, upstream = loss_and_grads(fused, x, y, **kwargs)
    ref_loss, ref_gx, ref_gy, _ = loss_and_grads(ref, x.double(), y.double(), upstream.double(), **kwargs)
    assert loss.dtype == gx.dtype == gy.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    assert_close_scaled(gx, ref_gx, **tol)
    assert_close_scaled(gy, ref_gy, **tol)


@pytest.mark.parametrize("steps", [7, 100, 1000, 5000, 70000])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("per_timestep", [False, True])
def test_sequence_lengths_and_alignments(device, steps, offset, per_timestep):
    """Short to long sequences, rows starting 16-byte aligned or not (offset, with a row stride that moves the
    misalignment from row to row): on CUDA these take every sweep (1, 4 or 32 lanes or a block per sequence,
    several chunks per sequence, 16-byte packs with peeled heads and tails, single steps)."""
    batch = max(2, 20000 // steps)
    x = torch.randn(batch, steps + offset, device=device)[:, offset:]
    y = torch.empty(batch, steps + offset, device=device)[:, offset:]
    y.copy_(0.5 * x + torch.randn_like(x))  # same layout as x
    mask = torch.rand(batch, steps, device=device) > 0.1
    mask[:, -2:] = True  # >= 2 valid steps: the reference's Pearson gradient is NaN for a single one
    kwargs = dict(mask=mask, reduction="none", per_timestep=per_timestep)
    for kind, (fused, ref) in KINDS.items():
        loss, gx, gy, upstream = loss_and_grads(fused, x, y, **kwargs)
        kwargs_ref = dict(kwargs, mask=mask.cpu())
        expected = loss_and_grads(ref, x.double().cpu(), y.double().cpu(), upstream.double().cpu(), **kwargs_ref)
        torch.testing.assert_close(loss.double().cpu(), expected[0], rtol=1e-5, atol=1e-5)
        assert_close_scaled(gx.cpu(), expected[1], rtol=1e-4, atol=1e-5)
        assert_close_scaled(gy.cpu(), expected[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(device, kind):
    """Strided views (every other step, transposed channels, a sliced offset, a transposed mask) are read in
    place and give the same result as contiguous copies."""
    fused, _ = KINDS[kind]
    base_x = torch.randn(7, 3, 61, dtype=torch.float64, device=device)
    base_y = 0.5 * base_x + torch.randn_like(base_x)
    mask_t = torch.rand(30, 7, device=device) > 0.2  # (T, B) storage, used transposed
    x = base_x[:, :, 1::2].transpose(1, 2)  # (7, 30, 3), time stride 2, channel stride 61, offset 1
    y = base_y[:, :, 1::2].transpose(1, 2)
    mask = mask_t.t()
    assert not x.is_contiguous() and not mask.is_contiguous()
    for per_timestep in (False, True):
        kwargs = dict(mask=mask, reduction="none", per_timestep=per_timestep)
        loss, gx, gy, upstream = loss_and_grads(fused, x, y, **kwargs)
        kwargs["mask"] = mask.contiguous()
        expected = loss_and_grads(fused, x.contiguous(), y.contiguous(), upstream.contiguous(), **kwargs)
        for actual, want in zip((loss, gx, gy), expected):
            torch.testing.assert_close(actual, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_equal_prefix_mask(device, kind):
    fused, _ = KINDS[kind]
    x, y = torch.randn(5, 40, device=device), torch.randn(5, 40, device=device)
    lengths = torch.tensor([40, 1, 0, 17, 2], device=device)
    mask = torch.arange(40, device=device) < lengths[:, None]
    for per_timestep in (False, True):
        a = fused(x, y, lengths=lengths, reduction="none", per_timestep=per_timestep)
        b = fused(x, y, mask=mask, reduction="none", per_timestep=per_timestep)
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_reads_any_nonzero_byte_as_valid(device, kind):
    """A bool mask viewed from uint8 may hold bytes other than 0 / 1: every non-zero byte is a valid step."""
    fused, _ = KINDS[kind]
    x, y = torch.randn(4, 30, device=device), torch.randn(4, 30, device=device)
    bytes_ = torch.tensor([0, 2, 255, 1, 7], dtype=torch.uint8).repeat(4, 6).to(device)
    valid = bytes_ != 0
    for transpose in (False, True):
        raw = bytes_.t().contiguous().view(torch.bool).t() if transpose else bytes_.view(torch.bool)
        # The 0 / 1 mask in the same layout: on CUDA a mask that is not time-contiguous changes the sweep's
        # split (single steps, not 16-byte packs), so the sums round differently (seen on an H200).
        same_layout = valid.t().contiguous().t() if transpose else valid
        for reduction, per_timestep in (("mean", False), ("none", True)):
            actual = fused(x, y, mask=raw, reduction=reduction, per_timestep=per_timestep)
            expected = fused(x, y, mask=same_layout, reduction=reduction, per_timestep=per_timestep)
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_match_functional(device, kind):
    fused, _ = KINDS[kind]
    module = MODULES[kind](dim=0, reduction="sum", per_timestep=True, eps=1e-6)
    x, y, kwargs = make_case((12, 3, 2), 0, device)
    assert torch.equal(module(x, y, kwargs["mask"]), fused(x, y, reduction="sum", per_timestep=True, eps=1e-6,
                                                          **kwargs))
    assert "per_timestep=True" in repr(module) and "dim=0" in repr(module)


# ----------------------------------------------------------------------------- closed forms


def test_closed_forms(device):
    t = torch.linspace(-1, 1, 50, dtype=torch.float64, device=device)
    x = torch.stack([t, t.sin(), t ** 3])
    pearson, ccc = fused_losses.pearson_correlation_loss, fused_losses.concordance_correlation_loss
    eps = 1e-12
    # Pearson is invariant to positive affine maps; an identical copy has CCC 1.
    torch.testing.assert_close(pearson(x, 2 * x + 3, reduction="none", eps=eps), torch.zeros(3, dtype=x.dtype,
                                                                                              device=device))
    torch.testing.assert_close(pearson(x, -x, reduction="none", eps=eps), torch.full_like(x[:, 0], 2.0))
    torch.testing.assert_close(ccc(x, x.clone(), reduction="none", eps=eps), torch.zeros_like(x[:, 0]))
    centred = x - x.mean(1, keepdim=True)
    torch.testing.assert_close(ccc(centred, -centred, reduction="none", eps=eps), torch.full_like(x[:, 0], 2.0))
    # CCC penalises a shift that Pearson ignores: 1 - 2 var / (2 var + shift^2).
    var = x.var(1, unbiased=False)
    torch.testing.assert_close(ccc(x, x + 0.5, reduction="none", eps=eps), 1 - 2 * var / (2 * var + 0.25))


@pytest.mark.parametrize("masking", ["none", "mask"])
def test_against_numpy(device, masking):
    x, y, kwargs = make_case((6, 80), 1, device, masking=masking)
    mask = kwargs.get("mask", torch.ones(6, 80, dtype=torch.bool, device=device))
    r = fused_losses.pearson_correlation_loss(x, y, reduction="none", eps=0.0, **kwargs)
    c = fused_losses.concordance_correlation_loss(x, y, reduction="none", eps=0.0, **kwargs)
    for i in range(6):
        xi, yi = x[i][mask[i]].cpu().numpy(), y[i][mask[i]].cpu().numpy()
        np.testing.assert_allclose(r[i].item(), 1 - np.corrcoef(xi, yi)[0, 1], rtol=1e-10, atol=1e-12)
        cov = np.mean((xi - xi.mean()) * (yi - yi.mean()))
        ccc = 2 * cov / (xi.var() + yi.var() + (xi.mean() - yi.mean()) ** 2)
        np.testing.assert_allclose(c[i].item(), 1 - ccc, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_short_and_empty_sequences_are_finite(device, kind, dtype):
    fused, _ = KINDS[kind]
    T = 9
    x = torch.randn(6, T, dtype=dtype, device=device)
    y = torch.randn(6, T, dtype=dtype, device=device)
    x[0] = 0.3        # flat input
    y[1] = -2.0       # flat target
    x[2], y[2] = 1.5, 1.5  # both flat
    mask = torch.ones(6, T, dtype=torch.bool, device=device)
    mask[3, 1:] = False   # one valid step
    mask[4] = False       # no valid step
    x[4] = float("nan")   # ... whose (masked) values are NaN
    for per_timestep in (False, True):
        x_, y_ = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = fused(x_, y_, mask=mask, reduction="none", per_timestep=per_timestep)
        gx, gy = torch.autograd.grad(loss, (x_, y_), torch.ones_like(loss))
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
        per_sequence = loss if not per_timestep else loss.sum(1) / mask.sum(1).clamp_min(1)
        # Covariance 0: the loss is 1 (no valid step: 1 as well, with no per-step value).
        torch.testing.assert_close(per_sequence[:4], torch.ones(4, dtype=dtype, device=device))
        assert per_sequence[4] == (0 if per_timestep else 1)
        assert (gx[4] == 0).all() and (gy[4] == 0).all() and (gx[3] == 0).all() and (gy[3] == 0).all()
    if kind == "pearson":
        # Flat x: d loss / d x_i = -(y_i - mean y) / (n sqrt(eps (var y + eps))), d loss / d y = 0.
        x_, y_ = x[:1].clone().requires_grad_(), y[:1].clone().requires_grad_()
        eps = 1e-3
        gx, gy = torch.autograd.grad(fused(x_, y_, reduction="sum", eps=eps), (x_, y_))
        var_y = y[:1].var(unbiased=False)
        torch.testing.assert_close(gx, -(y[:1] - y[:1].mean()) / (T * (eps * (var_y + eps)).sqrt()), rtol=1e-4,
                                   atol=1e-4)
        assert gy.abs().max() <= 1e-6 * gx.abs().max()  # 0 up to the rounding of the flat mean
    else:
        # CCC is smooth at a flat sequence: the reference (no sqrt) gives the same gradient.
        _, ref = KINDS[kind]
        actual = loss_and_grads(fused, x[:3], y[:3], torch.ones(3, dtype=dtype, device=device), reduction="none")
        expected = loss_and_grads(ref, x[:3], y[:3], torch.ones(3, dtype=dtype, device=device), reduction="none")
        for a, e in zip(actual[:3], expected[:3]):
            torch.testing.assert_close(a, e, **TOLERANCES[dtype])


def gradient_bound(kind, steps, eps=1e-8):
    """The bound on |d loss / d x_t| and |d loss / d y_t| of one sequence's loss over `steps` valid steps
    (csrc/correlation_math.h, README "Bounded gradients")."""
    if kind == "pearson":
        return 1.5 / (steps * eps) ** 0.5
    return (2 * (2 * steps) ** 0.5 + 2) / (steps * eps ** 0.5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("steps,offset", [(64, 0.3), (2, 100.0)])
def test_gradient_bounded_for_flat_and_nearly_flat_predictions(device, kind, dtype, noise, steps, offset):
    """A flat or nearly flat prediction (an untrained model's output) gets a finite gradient within the stated
    bound, in every dtype, and the same loss and gradient as the float64 reference of the same formula."""
    fused, ref = KINDS[kind]
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(16, steps, generator=gen, dtype=torch.float64) + offset
    x = offset + noise * torch.randn(16, steps, generator=gen, dtype=torch.float64)
    x, y = x.to(dtype).to(device), y.to(dtype).to(device)  # the rounded values both implementations see
    loss, gx, gy, _ = loss_and_grads(lambda a, b: fused(a, b, reduction="sum"), x, y, torch.tensor(1.0))
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    bound = gradient_bound(kind, steps)
    assert gx.abs().max() <= bound and gy.abs().max() <= bound
    expected = loss_and_grads(lambda a, b: ref(a, b, reduction="sum"), x.double(), y.double(), torch.tensor(1.0))
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), expected[0], **tolerance)
    # atol relative to the largest gradient of either side: one side's may be rounding-sized (a flat x
    # leaves d loss / d y at the rounding of its mean).
    scale = max(expected[1].abs().max().item(), expected[2].abs().max().item())
    for actual, wanted in zip((gx, gy), expected[1:3]):
        torch.testing.assert_close(actual.double(), wanted, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_bound_holds_for_random_sequences(kind):
    """The bound is not only for flat sequences: random scales, lengths and correlations stay under it."""
    gen = torch.Generator().manual_seed(1)
    fused, _ = KINDS[kind]
    for steps in (2, 3, 10, 200):
        scale = 10.0 ** torch.randint(-6, 3, (64, 1), generator=gen)
        x = torch.randn(64, steps, generator=gen, dtype=torch.float64) * scale
        y = 0.3 * x + torch.randn(64, steps, generator=gen, dtype=torch.float64) * scale.flip(0)
        _, gx, gy, _ = loss_and_grads(lambda a, b: fused(a, b, reduction="sum"), x, y, torch.tensor(1.0))
        assert gx.abs().max() <= gradient_bound(kind, steps) and gy.abs().max() <= gradient_bound(kind, steps)


def test_pearson_value_is_one_minus_r_for_variances_far_above_eps(device):
    """eps inside the variances moves the loss by about eps / var: below float32 rounding for unit variances."""
    x, y, _ = make_case((6, 80), 1, device, masking="none")
    loss = fused_losses.pearson_correlation_loss(x, y, reduction="none")
    for i in range(6):
        r = np.corrcoef(x[i].cpu().numpy(), y[i].cpu().numpy())[0, 1]
        np.testing.assert_allclose(loss[i].item(), 1 - r, rtol=0, atol=6e-8)
    loss32 = fused_losses.pearson_correlation_loss(x.float(), y.float(), reduction="none")
    torch.testing.assert_close(loss32.double(), loss, rtol=0, atol=2 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_from_constant_output_trains_with_pearson(dtype):
    """A linear model started with zero weights (a constant output: every prediction sequence flat) trains
    with plain SGD: the first gradient is bounded, and the loss falls."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(8, 100, 5, generator=gen)
    target = features @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0]) + 0.5 * torch.randn(8, 100, generator=gen)
    model = torch.nn.Linear(5, 1).to(dtype)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = fused_losses.pearson_correlation_loss(model(features.to(dtype)).squeeze(-1), target.to(dtype))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0) and losses[-1] < 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates_from_valid_steps_only(device, kind):
    fused, _ = KINDS[kind]
    x, y = torch.randn(3, 20, device=device), torch.randn(3, 20, device=device)
    mask = torch.ones(3, 20, dtype=torch.bool, device=device)
    mask[1, 15:] = False
    clean = fused(x, y, mask=mask, reduction="none")
    x[0, 4] = float("nan")   # valid: sequence 0 becomes NaN
    y[1, 17] = float("nan")  # masked: ignored
    loss = fused(x, y, mask=mask, reduction="none")
    assert torch.isnan(loss[0]) and torch.equal(loss[1:], clean[1:])
    assert torch.isnan(fused(x, y, mask=mask))


@pytest.mark.parametrize("kind", KINDS)
def test_per_timestep_identity(device, kind):
    """The mean of the per-step values over the valid steps is the sequence's loss; padding is 0; the
    reductions of per-step values are the valid-step sum and the valid-step mean."""
    fused, _ = KINDS[kind]
    x, y, kwargs = make_case((5, 33, 2), 1, device, dtype=torch.float32)
    mask = kwargs["mask"]
    steps = fused(x, y, reduction="none", per_timestep=True, **kwargs)
    per_sequence = fused(x, y, reduction="none", **kwargs)
    counts = mask.sum(1, keepdim=True).float()  # (B, 1), shared by the channels
    torch.testing.assert_close(steps.sum(1) / counts, per_sequence, rtol=1e-5, atol=1e-5)
    assert (steps[~mask] == 0).all()
    total = (per_sequence * counts).sum()
    torch.testing.assert_close(fused(x, y, reduction="sum", per_timestep=True, **kwargs), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x, y, reduction="mean", per_timestep=True, **kwargs),
                               total / (counts.sum() * 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_stable_far_from_zero(device, kind):
    """Data at 1e4 with unit spread: a naive sum of squares in float32 loses every digit of the variance;
    the kernels (block two-pass + Chan merges) match float64 on the same float32 values."""
    fused, ref = KINDS[kind]
    noise = torch.randn(4, 20000, dtype=torch.float64)
    x = (1e4 + noise).float()
    y = (1e4 + 0.5 + 0.7 * noise + 0.7 * torch.randn_like(noise)).float()
    loss, gx, gy, upstream = loss_and_grads(fused, x.to(device), y.to(device), reduction="none")
    ref_loss, ref_gx, ref_gy, _ = loss_and_grads(ref, x.double(), y.double(), upstream.double().cpu(),
                                                 reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-4, atol=1e-5)
    assert_close_scaled(gx.cpu(), ref_gx, rtol=1e-3, atol=1e-3)
    assert_close_scaled(gy.cpu(), ref_gy, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_with_respect_to_one_side(device, kind):
    fused, _ = KINDS[kind]
    x, y, kwargs = make_case((4, 25), 1, device)
    _, gx_both, gy_both, upstream = loss_and_grads(fused, x, y, reduction="none", **kwargs)
    x_only = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fused(x_only, y, reduction="none", **kwargs), (x_only,), upstream)
    y_only = y.clone().requires_grad_()
    (gy,) = torch.autograd.grad(fused(x, y_only, reduction="none", **kwargs), (y_only,), upstream)
    assert torch.equal(gx, gx_both) and torch.equal(gy, gy_both)


@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_backward_twice(device, kind):
    fused, _ = KINDS[kind]
    x = torch.randn(4, 30, device=device, requires_grad=True)
    y = torch.randn(4, 30, device=device)
    loss = fused(x, y, reduction="none", per_timestep=True)
    upstream = torch.randn_like(loss)
    loss.backward(upstream, retain_graph=True)
    first = x.grad.clone()
    loss.backward(2 * upstream)
    torch.testing.assert_close(x.grad, 3 * first)


# ----------------------------------------------------------------------------- operator registration


def op_args(device, masked, kind="pearson", reduction="mean", per_timestep=False):
    x = torch.randn(3, 11, 2, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(3, 11, 2, dtype=torch.float64, device=device, requires_grad=True)
    mask = (torch.rand(3, 11, device=device) > 0.3) if masked else None
    return x, y, mask, kind, reduction, per_timestep, 1e-8


@pytest.mark.parametrize("write_gradients", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction,per_timestep", [("mean", False), ("none", False), ("none", True),
                                                    ("sum", True)])
def test_opcheck(device, masked, reduction, per_timestep, write_gradients):
    if reduction == "none" and any(write_gradients):
        pytest.skip("the forward writes the gradients of reduced losses only")
    args = (*op_args(device, masked, "concordance" if masked else "pearson", reduction, per_timestep),
            *write_gradients)
    torch.library.opcheck(torch.ops.fused_losses.correlation_loss.default, args)
    loss, stats, total_weight, grad_x, grad_y = torch.ops.fused_losses.correlation_loss(*args)
    x, y, mask, kind, reduction, per_timestep, eps, *_ = args
    grad = torch.randn_like(loss)
    for want_x, want_y in ((True, True), (True, False), (False, True)):
        backward_args = (x.detach(), y.detach(), mask, stats, total_weight, kind, reduction, per_timestep, eps,
                         want_x, want_y)
        torch.library.opcheck(torch.ops.fused_losses.correlation_loss_backward.default, (grad, *backward_args))
        if (want_x, want_y) == write_gradients or write_gradients == (True, True):
            torch.library.opcheck(torch.ops.fused_losses.correlation_loss_backward_inplace.default,
                                  (grad, grad_x.clone(), grad_y.clone(), *backward_args))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction,per_timestep", [("mean", False), ("none", False), ("none", True),
                                                    ("mean", True)])
def test_gradcheck(device, kind, masked, reduction, per_timestep):
    x, y, mask, *_ = op_args(device, masked)
    fused, _ = KINDS[kind]

    def fn(x, y):
        return fused(x, y, mask, reduction=reduction, per_timestep=per_timestep)

    assert torch.autograd.gradcheck(fn, (x, y))


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()

    def step(x, y, mask):
        steps = fused_losses.concordance_correlation_loss(x, y, mask, dim=0, reduction="none", per_timestep=True)
        return fused_losses.pearson_correlation_loss(x, y, mask, dim=0) + steps.sum()

    x, y, kwargs = make_case((16, 4, 2), 0, device, dtype=torch.float32)
    compiled = torch.compile(step, fullgraph=True)
    eager_out = loss_and_grads(lambda a, b: step(a, b, kwargs["mask"]), x, y, torch.tensor(1.0, device=device))
    compiled_out = loss_and_grads(lambda a, b: compiled(a, b, kwargs["mask"]), x, y, torch.tensor(1.0, device=device))
    for a, b in zip(compiled_out[:3], eager_out[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[6, 2], [-1, 2]])
def test_out_of_range_lengths_raise_under_compile(lengths):
    """Eager raises ValueError; a compiled graph keeps the check as an assertion (RuntimeError), no graph break."""
    torch._dynamo.reset()
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    compiled = torch.compile(lambda a, b, n: fused_losses.pearson_correlation_loss(a, b, lengths=n), fullgraph=True)
    torch.testing.assert_close(compiled(x, y, torch.tensor([5, 2])),
                               fused_losses.pearson_correlation_loss(x, y, lengths=torch.tensor([5, 2])))
    with pytest.raises(RuntimeError, match=r"lengths must be in \[0, 5\]"):
        compiled(x, y, torch.tensor(lengths))


# ----------------------------------------------------------------------------- the gradient written by the forward


def edge_case_batch(shape, dim, device, dtype, masked):
    """x, y and mask (or None) in the layout (shape, dim) whose sequences include a flat one and, masked, one
    with a single valid step and one with none."""
    x, y, _ = make_case(shape, dim, device, dtype, masking="none")
    x = x.movedim(dim, 1)
    x[0, :, 0] = 0.75  # flat input
    x = x.movedim(1, dim)
    if not masked:
        return x, y, None
    m_shape, *_ = mask_shape(shape, dim)
    mask = torch.rand(m_shape, device=device) > 0.3
    mask[1] = False
    mask[1, 3] = True  # one valid step
    mask[2] = False    # none
    return x, y, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["BTD", "BDT"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction,per_timestep", [("mean", False), ("sum", False), ("mean", True)])
@pytest.mark.parametrize("sides", ["input", "both"])
def test_forward_written_gradient(device, kind, layout, masked, dtype, reduction, per_timestep, sides,
                                  monkeypatch):
    """The gradients written by the forward (2-pass) are bitwise the 3-pass backward's, for any grad_output and
    repeated backwards; 37 steps reach the vector tails."""
    fused, _ = KINDS[kind]
    shape, dim = {"BTD": ((5, 37, 3), 1), "BDT": ((5, 3, 37), -1)}[layout]
    x, y, mask = edge_case_batch(shape, dim, device, dtype, masked)

    def loss(*leaves):
        return fused(*leaves, *([y] if sides == "input" else []), mask, dim=dim, reduction=reduction,
                     per_timestep=per_timestep)

    assert_gradient_schedules_agree(loss, [x] if sides == "input" else [x, y], monkeypatch)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [7, 1000, 70000])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("reduction,per_timestep", [("mean", True), ("sum", False)])
def test_forward_written_gradient_lengths(device, kind, steps, offset, reduction, per_timestep):
    """At the operator: the forward's loss and statistics are bitwise those it gives without writing the
    gradients, and the gradients are bitwise the backward's for grad_loss 1, over sequence lengths and
    alignments (on CUDA: every group size, and several chunks per sequence, where the gradient gets a kernel of
    its own)."""
    x = torch.randn(3, steps + offset, 1, device=device)[:, offset:]
    y = 0.5 * x + torch.randn_like(x)
    mask = torch.rand(3, steps, device=device) > 0.2
    args = (x, y, mask, kind, reduction, per_timestep, 1e-8)
    loss, stats, total_weight, grad_x, grad_y = torch.ops.fused_losses.correlation_loss(*args, True, True)
    plain = torch.ops.fused_losses.correlation_loss(*args, False, False)
    for written, expected in zip((loss, stats, total_weight), plain):
        assert torch.equal(written, expected)
    expected = torch.ops.fused_losses.correlation_loss_backward(torch.ones((), device=device), x, y, mask, stats,
                                                                total_weight, *args[3:], True, True)
    for written, backward in zip((grad_x, grad_y), expected):
        assert written.is_contiguous() and torch.equal(written, backward)


def test_forward_written_gradient_errors():
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    op, inplace = torch.ops.fused_losses.correlation_loss, torch.ops.fused_losses.correlation_loss_backward_inplace
    with pytest.raises(ValueError, match="write_input_gradient needs a reduced loss"):
        op(x, y, None, "pearson", "none", False, 0.0, True, False)
    with pytest.raises(ValueError, match="write_target_gradient needs a reduced loss"):
        op(x, y, None, "pearson", "none", False, 0.0, False, True)
    _, stats, total_weight, grad_x, grad_y = op(x, y, None, "pearson", "mean", False, 0.0, True, False)
    assert grad_y.shape == (0,)
    rest = (x, y, None, stats, total_weight, "pearson", "mean", False, 0.0)
    two = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"grad_target must be a contiguous tensor of the target's shape \[2, 5, 3\]"
                                         r", got shape \[0\]"):
        inplace(two, grad_x, grad_y, *rest, True, True)  # the forward did not write grad_target
    with pytest.raises(ValueError, match=r"grad_input must be a contiguous tensor of the input's shape"):
        inplace(two, torch.empty(2, 3, 5).transpose(1, 2), grad_y, *rest, True, False)
    with pytest.raises(TypeError, match=r"grad_input must have the input's dtype Float, got Double"):
        inplace(two, grad_x.double(), grad_y, *rest, True, False)
    with pytest.raises(ValueError, match=r"the in-place backward needs a reduced loss, got reduction='none'"):
        inplace(torch.ones(2, 3), grad_x, grad_y, x, y, None, stats, total_weight, "pearson", "none", False, 0.0,
                True, False)


# ----------------------------------------------------------------------------- errors


def test_errors(device):
    f = fused_losses.pearson_correlation_loss
    x, y = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    with pytest.raises(ValueError, match=r"target must have the input's shape \(2, 5\), got \(2, 4\)"):
        f(x, y[:, :4])
    with pytest.raises(ValueError, match=r"input must have shape \(B, T\) or \(B, T, D\)"):
        f(x[0], y[0])
    with pytest.raises(IndexError, match=r"dim \(the time axis\) must be an int in \[-2, 1\].*got 2"):
        f(x, y, dim=2)
    # Any integer, NumPy's included (an axis read from a config array); a float is refused, as torch does.
    torch.testing.assert_close(f(x, y, dim=np.int64(0)), f(x, y, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(fused_losses.PearsonCorrelationLoss(dim=np.int64(0))(x, y), f(x, y, dim=0),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"dim must be an int, got 1.0"):
        f(x, y, dim=1.0)
    # The modules check dim's type at construction; its range needs the input.
    for module in (fused_losses.PearsonCorrelationLoss, fused_losses.ConcordanceCorrelationLoss):
        with pytest.raises(TypeError, match=r"dim must be an int, got 1.0"):
            module(dim=1.0)
        with pytest.raises(IndexError, match=r"dim \(the time axis\) must be an int in \[-2, 1\].*got 5"):
            module(dim=5)(x, y)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\).*got \(5, 2\)"):
        f(x, y, torch.ones(5, 2, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        f(x, y, torch.ones(2, 5, device=device))
    with pytest.raises(TypeError, match=r"mask must be a dense tensor \(torch.strided layout\), got layout "
                                        r"torch.sparse_coo"):
        f(x, y, torch.ones(2, 5, dtype=torch.bool, device=device).to_sparse())
    with pytest.raises(TypeError, match=r"input must be a dense tensor \(torch.strided layout\), got layout "
                                        r"torch.sparse_coo"):
        f(x.to_sparse(), y.to_sparse())
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 5\].*got 6"):
        f(x.cpu(), y.cpu(), lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        f(x, y, lengths=torch.tensor([1, 2, 3], device=device))
    with pytest.raises(TypeError, match=r"lengths must be an integer tensor"):
        f(x, y, lengths=torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match=r"either mask or lengths"):
        f(x, y, torch.ones(2, 5, dtype=torch.bool, device=device), lengths=torch.tensor([1, 2], device=device))
    with pytest.raises(TypeError, match=r"target must have the input's dtype \(Float\), got Double"):
        torch.ops.fused_losses.correlation_loss(x.unsqueeze(-1), y.double().unsqueeze(-1), None, "pearson", "mean",
                                                False, 1e-8, False, False)
    # The functional form promotes mixed floating dtypes, as torch's elementwise losses do.
    promoted = f(x, y.double())
    assert promoted.dtype == torch.float64
    torch.testing.assert_close(promoted, f(x.double(), y.double()))
    with pytest.raises(TypeError, match=r"input must be float32, float16, bfloat16 or float64, got Long"):
        f(x.long(), y.long())
    # A string flag is truthy: "False" would have returned per-step losses.
    with pytest.raises(TypeError, match=r"per_timestep must be a bool, got 'False'"):
        f(x, y, reduction="none", per_timestep="False")
    with pytest.raises(TypeError, match=r"per_timestep must be a bool, got 1"):
        fused_losses.PearsonCorrelationLoss(per_timestep=1)
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        f(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1e-08"):
        f(x, y, eps=-1e-8)
    with pytest.raises(TypeError, match=r"eps must be a real number, got NoneType"):
        f(x, y, eps=None)
    # Any real number, NumPy's included (a float32 hyperparameter read from a config array).
    torch.testing.assert_close(f(x, y, eps=np.float32(1e-6)), f(x, y, eps=float(np.float32(1e-6))))
    torch.testing.assert_close(fused_losses.PearsonCorrelationLoss(eps=np.float32(1e-6))(x, y),
                               f(x, y, eps=float(np.float32(1e-6))))
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fused_losses.ConcordanceCorrelationLoss(reduction="mean ")
    with pytest.raises(ValueError, match=r"kind must be 'pearson' or 'concordance'"):
        torch.ops.fused_losses.correlation_loss(x[..., None], y[..., None], None, "spearman", "mean", False, 0.0,
                                                False, False)
    with pytest.raises(ValueError, match=r"input must have shape \(batch, time\) or \(batch, time, channels\)"):
        torch.ops.fused_losses.correlation_loss(x[0], y[0], None, "pearson", "mean", False, 0.0, False, False)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[2\] for reduction='none', got \[2, 1\]"):
        _, stats, total, *_ = torch.ops.fused_losses.correlation_loss(x, y, None, "pearson", "none", False, 0.0,
                                                                      False, False)
        torch.ops.fused_losses.correlation_loss_backward(torch.ones(2, 1, device=device), x, y, None, stats, total,
                                                         "pearson", "none", False, 0.0, True, False)


def test_vmap_over_lengths_names_the_mask_instead():
    """vmap cannot read the lengths' values for their range check: vmapping over lengths raises an error naming
    lengths and the mask that replaces it (PyTorch's own error names neither); that mask vmaps, and lengths
    closed over (not vmapped) work as they are."""
    x, y = torch.randn(2, 3, 6), torch.randn(3, 6)
    lengths = torch.tensor([[1, 2, 3], [4, 5, 6]])
    f = fused_losses.pearson_correlation_loss
    with pytest.raises(ValueError, match=r"lengths cannot be vmapped over.*mask=torch.arange\(6\) < "
                                         r"lengths.unsqueeze\(-1\)"):
        torch.vmap(lambda a, n: f(a, y, lengths=n))(x, lengths)
    expected = torch.stack([f(a, y, lengths=n) for a, n in zip(x, lengths)])
    torch.testing.assert_close(torch.vmap(lambda a, m: f(a, y, mask=m))(x, torch.arange(6) < lengths.unsqueeze(-1)),
                               expected)
    torch.testing.assert_close(torch.vmap(lambda a: f(a, y, lengths=lengths[0]))(x),
                               torch.stack([f(a, y, lengths=lengths[0]) for a in x]))


@pytest.mark.parametrize("reduction, per_timestep", [("none", False), ("none", True), ("mean", False), ("sum", True)])
def test_operator_takes_two_dimensional_sequences_as_one_channel(device, reduction, per_timestep):
    """A (B, T) input goes to the operator as it is (no view with an autograd node in front of a small loss):
    every output is the one of its (B, T, 1) view, in the (B, T) layout."""
    x, y = torch.randn(3, 7, device=device), torch.randn(3, 7, device=device)
    mask = torch.rand(3, 7, device=device) > 0.2
    op = torch.ops.fused_losses.correlation_loss
    for kind in ("pearson", "concordance"):
        writes = reduction != "none"
        flat = op(x, y, mask, kind, reduction, per_timestep, 1e-8, writes, writes)
        channel = op(x[..., None], y[..., None], mask, kind, reduction, per_timestep, 1e-8, writes, writes)
        loss_shape = {"none": x.shape if per_timestep else x.shape[:1]}.get(reduction, ())
        assert flat[0].shape == loss_shape
        assert torch.equal(flat[0], channel[0].reshape(loss_shape))
        assert torch.equal(flat[1], channel[1]) and torch.equal(flat[2], channel[2])
        if writes:
            assert torch.equal(flat[3], channel[3].squeeze(-1)) and torch.equal(flat[4], channel[4].squeeze(-1))
        grad_loss = torch.randn(loss_shape, device=device)
        gradients = torch.ops.fused_losses.correlation_loss_backward(grad_loss, x, y, mask, flat[1], flat[2], kind,
                                                                     reduction, per_timestep, 1e-8, True, True)
        expected = torch.ops.fused_losses.correlation_loss_backward(
            grad_loss.reshape(channel[0].shape), x[..., None], y[..., None], mask, channel[1], channel[2], kind,
            reduction, per_timestep, 1e-8, True, True)
        for got, want in zip(gradients, expected):
            assert got.shape == x.shape and torch.equal(got, want.squeeze(-1))
    torch.library.opcheck(op, (x, y, mask, "pearson", reduction, per_timestep, 1e-8, False, False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put the arguments on two devices")
def test_device_mismatch_errors():
    x, y = torch.randn(2, 5, device="cuda"), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"target must be on the same device as input"):
        fused_losses.pearson_correlation_loss(x, y)
    with pytest.raises(ValueError, match=r"mask must be on the same device as input"):
        fused_losses.pearson_correlation_loss(x, y.cuda(), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lengths must be on the input's device"):
        fused_losses.pearson_correlation_loss(x, y.cuda(), lengths=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_across_runs_and_threads(device, kind):
    fused, _ = KINDS[kind]
    # Enough sequences for several parallel blocks on the CPU and several chunks per sequence on CUDA.
    x, y, kwargs = make_case((1500, 64), 1, device, dtype=torch.float32)
    long_x, long_y, _ = make_case((2, 70000), 1, device, dtype=torch.float32, masking="none")

    def run():
        outputs = []
        for a, b, extra in ((x, y, kwargs), (long_x, long_y, {})):
            loss, gx, gy, _ = loss_and_grads(fused, a, b, torch.tensor(1.0, device=device), **extra)
            outputs += [loss, gx, gy]
        return outputs

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        first, second = run(), run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)
