"""Higher-order gradients and torch.func transforms of every op: gradgradcheck in float64, a gradient penalty
and a MAML-style two-step update against the same computation in plain PyTorch, and torch.func.grad / vjp /
vmap / vmap(grad) (per-sample gradients) against autograd and a Python loop."""

import pytest
import torch
from torch.autograd import forward_ad

import fused_losses
from fused_losses import reference

# name -> (fused loss(logits, target), reference loss(logits, target), logits shape, target maker(generator)).
# Every option that changes the formula appears in at least one case.
C, L, T = 5, 6, 9


def _class_targets(gen, shape):
    y = torch.randint(0, C, shape, generator=gen)
    y.view(-1)[0] = -100  # one ignored sample
    return y


def _case(name, device="cpu"):
    """(fused(x, t), reference(x, t), x shape, target(gen, dtype), target differentiable); the constants the
    losses close over live on `device`."""
    gen = torch.Generator().manual_seed(1)
    cost = (torch.rand(C, C, generator=gen, dtype=torch.float64) + 0.2).to(device)
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(device)
    pos_weight = (torch.rand(L, generator=gen, dtype=torch.float64) * 3).to(device)
    indices = torch.tensor([[0, 3, -1], [1, -1, -1], [-1, -1, -1], [5, 2, 1]], device=device)
    lengths = torch.tensor([9, 4, 2], device=device)
    ce = dict(cost_matrix=cost, weight=weight, label_smoothing=0.1)
    cases = {
        "ce_argmax": (lambda x, t: fused_losses.cost_sensitive_cross_entropy(x, t, **ce),
                      lambda x, t: reference.cost_sensitive_cross_entropy(x, t, **ce), (4, C),
                      lambda g, d: _class_targets(g, (4,)), False),
        "ce_expected": (lambda x, t: fused_losses.cost_sensitive_cross_entropy(x, t, cost_mode="expected", **ce),
                        lambda x, t: reference.cost_sensitive_cross_entropy(x, t, cost_mode="expected", **ce),
                        (4, C), lambda g, d: _class_targets(g, (4,)), False),
        "ce_spatial_none": (
            lambda x, t: fused_losses.cost_sensitive_cross_entropy(x, t, cost, reduction="none", cost_mode="expected"),
            lambda x, t: reference.cost_sensitive_cross_entropy(x, t, cost, reduction="none", cost_mode="expected"),
            (3, C, 2), lambda g, d: _class_targets(g, (3, 2)), False),
        "pearson": (lambda x, t: fused_losses.pearson_correlation_loss(x, t),
                    lambda x, t: reference.pearson_correlation_loss(x, t), (3, T),
                    lambda g, d: torch.randn(3, T, generator=g, dtype=d), True),
        "pearson_masked_per_timestep": (
            lambda x, t: fused_losses.pearson_correlation_loss(x, t, lengths=lengths,
                                                               reduction="none", per_timestep=True),
            lambda x, t: reference.pearson_correlation_loss(x, t, lengths=lengths,
                                                            reduction="none", per_timestep=True),
            (3, T, 2), lambda g, d: torch.randn(3, T, 2, generator=g, dtype=d), True),
        "concordance": (lambda x, t: fused_losses.concordance_correlation_loss(x, t, reduction="sum"),
                        lambda x, t: reference.concordance_correlation_loss(x, t, reduction="sum"), (3, T),
                        lambda g, d: torch.randn(3, T, generator=g, dtype=d), True),
        "bce": (lambda x, t: fused_losses.weighted_bce_with_logits(x, t, pos_weight=pos_weight),
                lambda x, t: reference.weighted_bce_with_logits(x, t, pos_weight=pos_weight), (4, L),
                lambda g, d: torch.rand(4, L, generator=g, dtype=d), True),
        "bce_asl": (lambda x, t: fused_losses.weighted_bce_with_logits(x, t, gamma_pos=1.0, gamma_neg=3.0, clip=0.05),
                    lambda x, t: reference.weighted_bce_with_logits(x, t, gamma_pos=1.0, gamma_neg=3.0, clip=0.05),
                    (4, L), lambda g, d: torch.rand(4, L, generator=g, dtype=d), True),
        "bce_sparse_focal": (
            lambda x, t: fused_losses.weighted_bce_with_logits(x, positive_indices=t, gamma_pos=2.0, gamma_neg=2.0,
                                                               reduction="none"),
            lambda x, t: reference.weighted_bce_with_logits(x, positive_indices=t, gamma_pos=2.0, gamma_neg=2.0,
                                                            reduction="none"),
            (4, L), lambda g, d: indices, False),
    }
    return cases[name]


CASES = ["ce_argmax", "ce_expected", "ce_spatial_none", "pearson", "pearson_masked_per_timestep", "concordance",
         "bce", "bce_asl", "bce_sparse_focal"]


def _inputs(name, device, requires_grad=True):
    _, _, shape, make_target, target_differentiable = _case(name, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    t = make_target(gen, torch.float64).to(device)
    if target_differentiable and requires_grad:
        t.requires_grad_()
    return x, t


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck(device, name):
    fused, _, _, _, target_differentiable = _case(name, device)
    x, t = _inputs(name, device)
    if target_differentiable:
        assert torch.autograd.gradgradcheck(fused, (x, t))
    else:
        assert torch.autograd.gradgradcheck(lambda z: fused(z, t), (x,))


def _gradient_penalty_and_maml(loss_fn, x, t):
    """Gradients, with respect to a linear layer's weight, of (a) a gradient penalty |d loss / d W|^2 and (b)
    the loss after one inner SGD step (MAML's outer loss)."""
    gen = torch.Generator().manual_seed(1)
    # (3, C, 2) cross-entropy logits have their class axis at 1: the layer maps features (3, 2, 3) to (3, 2, C).
    feature_shape = (x.shape[0], x.shape[2], 3) if x.dim() == 3 else (*x.shape[:-1], 3)
    outputs = x.shape[1] if x.dim() == 3 else x.shape[-1]
    features = torch.randn(feature_shape, generator=gen, dtype=x.dtype).to(x.device)
    weight = (0.3 * torch.randn(outputs, 3, generator=gen, dtype=x.dtype)).to(x.device).requires_grad_()

    def logits(w):
        out = features @ w.t()
        return out.movedim(-1, 1) if x.dim() == 3 else out

    def loss(w):
        return loss_fn(logits(w), t).sum()

    (g,) = torch.autograd.grad(loss(weight), weight, create_graph=True)
    (penalty_grad,) = torch.autograd.grad(g.pow(2).sum(), weight)
    (g,) = torch.autograd.grad(loss(weight), weight, create_graph=True)
    (maml_grad,) = torch.autograd.grad(loss(weight - 0.5 * g), weight)
    return penalty_grad, maml_grad


@pytest.mark.parametrize("name", CASES)
def test_gradient_penalty_and_maml_match_plain_pytorch(device, name):
    fused, ref, _, _, _ = _case(name, device)
    x, t = _inputs(name, device, requires_grad=False)
    actual = _gradient_penalty_and_maml(fused, x, t)
    expected = _gradient_penalty_and_maml(ref, x, t)
    for a, e in zip(actual, expected):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_torch_func_grad_and_vjp_match_autograd(device, name):
    fused, _, _, _, target_differentiable = _case(name, device)
    x, t = _inputs(name, device)
    argnums = (0, 1) if target_differentiable else 0
    expected = torch.autograd.grad(fused(x, t).sum(), (x, t) if target_differentiable else (x,))
    grads = torch.func.grad(lambda a, b: fused(a, b).sum(), argnums=argnums)(x.detach(), t.detach())
    grads = grads if target_differentiable else (grads,)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    out, vjp = torch.func.vjp(lambda a: fused(a, t.detach()), x.detach())
    cotangent = torch.rand_like(out)
    (expected_x,) = torch.autograd.grad(fused(x, t.detach()), x, cotangent)
    torch.testing.assert_close(vjp(cotangent)[0], expected_x, rtol=1e-12, atol=1e-14)
    # Second order through torch.func (reverse over reverse): the Hessian-vector product of the summed loss.
    direction = torch.randn_like(x)
    gradient = torch.func.grad(lambda a: fused(a, t.detach()).sum())
    hvp = torch.func.grad(lambda a: (gradient(a) * direction).sum())(x.detach())
    (g,) = torch.autograd.grad(fused(x, t.detach()).sum(), x, create_graph=True)
    (expected_hvp,) = torch.autograd.grad(g, x, direction)
    torch.testing.assert_close(hvp, expected_hvp, rtol=1e-9, atol=1e-12)
    # Forward mode is refused with the op's name, through torch.func and through torch.autograd.forward_ad.
    with pytest.raises(NotImplementedError, match=r"fused_losses\.\w+: forward-mode AD"):
        torch.func.jvp(lambda a: fused(a, t.detach()), (x.detach(),), (direction,))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=r"fused_losses\.\w+: forward-mode AD"):
        fused(forward_ad.make_dual(x.detach(), direction), t.detach())


@pytest.mark.parametrize("name", CASES)
def test_vmap_and_per_sample_gradients_match_a_loop(device, name):
    """vmap over a leading batch of problems, and vmap(grad) per-sample gradients, equal a Python loop."""
    fused, _, _, _, _ = _case(name, device)
    x, t = _inputs(name, device, requires_grad=False)
    xs = torch.stack([x, 2 * x, -x])
    looped = torch.stack([fused(xi, t) for xi in xs])
    torch.testing.assert_close(torch.func.vmap(lambda a: fused(a, t))(xs), looped, rtol=0, atol=0)
    per_sample = torch.func.vmap(torch.func.grad(lambda a: fused(a, t).sum()))(xs)
    for xi, g in zip(xs, per_sample):
        xi = xi.clone().requires_grad_()
        (expected,) = torch.autograd.grad(fused(xi, t).sum(), xi)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_of_a_classifier():
    """The usual per-sample-gradient recipe: vmap(grad) over (sample, label) pairs of a model's parameters."""
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(C, C, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(4, C).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    features = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (6,), generator=gen)

    def sample_loss(p, feature, label):
        logits = torch.func.functional_call(model, p, (feature.unsqueeze(0),))
        return fused_losses.cost_sensitive_cross_entropy(logits, label.unsqueeze(0), cost, cost_mode="expected")

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, features, labels)
    for i in range(6):
        model.zero_grad()
        sample_loss(dict(model.named_parameters()), features[i], labels[i]).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("focusing", [{}, dict(gamma_pos=1.0, gamma_neg=3.0, clip=0.05)])
def test_per_sample_gradients_with_vmapped_positive_indices(device, focusing):
    """vmap(grad) over (logits row, positive_indices row) pairs: each row's indices (a duplicate, -1 padding)
    are a batched tensor inside the differentiable backward, and its gradient is the one of the same row with
    the dense 0/1 target."""
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    indices = torch.tensor([[0, -1], [2, 3], [1, 1]], device=device)
    dense = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float64, device=device)

    def row_loss(row, row_indices):
        return fused_losses.weighted_bce_with_logits(row[None], positive_indices=row_indices[None], **focusing)

    per_sample = torch.func.vmap(torch.func.grad(row_loss))(x, indices)
    for row, target, gradient in zip(x, dense, per_sample):
        row = row.clone().requires_grad_()
        (expected,) = torch.autograd.grad(fused_losses.weighted_bce_with_logits(row[None], target[None], **focusing),
                                          row)
        torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["ce_expected", "pearson", "bce_asl"])
def test_jacrev_and_hessian_match_autograd(name):
    """jacrev of the per-sample losses and jacrev(jacrev(.)) of their sum (the Hessian) equal autograd's."""
    fused, _, _, _, _ = _case(name)
    x, t = _inputs(name, "cpu", requires_grad=False)
    jacobian = torch.func.jacrev(lambda a: fused(a, t))(x)
    expected = torch.autograd.functional.jacobian(lambda a: fused(a, t), x)
    torch.testing.assert_close(jacobian, expected, rtol=1e-10, atol=1e-12)
    hessian = torch.func.jacrev(torch.func.jacrev(lambda a: fused(a, t).sum()))(x)
    expected = torch.autograd.functional.hessian(lambda a: fused(a, t).sum(), x)
    torch.testing.assert_close(hessian, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("module", [fused_losses.CostSensitiveCrossEntropyLoss([[1.0, 2.0], [1.0, 1.0]]),
                                    fused_losses.ConcordanceCorrelationLoss(),
                                    fused_losses.WeightedBCEWithLogitsLoss(pos_weight=[2.0])])
def test_jit_script_refuses_the_modules_clearly(module):
    """TorchScript cannot compile the Python argument checks: torch.jit.script of a loss module, or of a model
    holding one, raises an error naming the module and what to use instead (not a compiler error on an
    f-string deep in fused_losses)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.loss = module
    for scripted in (module, model):
        with pytest.raises(TypeError, match=f"{type(module).__name__} cannot be compiled by torch.jit.script.*"
                                            "torch.export.export, torch.compile or torch.jit.trace"):
            torch.jit.script(scripted)


@pytest.mark.parametrize("loss, make_target", [
    (fused_losses.CostSensitiveCrossEntropyLoss(torch.ones(4, 4) + torch.eye(4)), lambda rows: torch.arange(rows) % 4),
    (fused_losses.PearsonCorrelationLoss(), lambda rows: torch.randn(rows, 4)),
    (fused_losses.WeightedBCEWithLogitsLoss(pos_weight=[1.0, 2.0, 3.0, 4.0], gamma_neg=2.0),
     lambda rows: torch.rand(rows, 4)),
])
def test_export_of_a_model_with_the_loss(loss, make_target):
    """torch.export.export of a model ending in a loss module, with a dynamic batch size: the exported program
    computes the eager loss for another batch size."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 4)
            self.loss = loss

        def forward(self, features, target):
            return self.loss(self.layer(features), target)

    model = Model()
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(5, 3), make_target(5)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    features, target = torch.randn(9, 3), make_target(9)
    torch.testing.assert_close(program.module()(features, target), model(features, target))


@pytest.mark.parametrize("name", ["ce_argmax", "pearson_masked_per_timestep", "bce_sparse_focal"])
def test_jit_trace_records_the_operator_and_saves(name, tmp_path):
    """torch.jit.trace of a loss whose input requires grad records the operator (not a Python autograd.Function,
    which torch.jit.save cannot export); the saved module computes the same loss and gradient."""
    fused, _, shape, make_target, _ = _case(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = make_target(gen, torch.float64)
    traced = torch.jit.trace(lambda x: fused(x, t), (x,), check_trace=False)
    assert any(node.kind().startswith("fused_losses::") for node in traced.graph.nodes())
    torch.jit.save(traced, str(tmp_path / "loss.pt"))
    loaded = torch.jit.load(str(tmp_path / "loss.pt"))
    expected = fused(x, t)
    got = loaded(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
