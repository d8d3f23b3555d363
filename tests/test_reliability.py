"""Reliability across ops: PyTorch's own OpInfo samples, differential fuzzing against the references,
concurrency, and a 2-process DDP step matching the single-process gradient."""

import datetime
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fused_losses
from fused_losses import reference
from conftest import TOLERANCES


def _opinfo_samples(name, device, dtype):
    common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
    (op,) = [op for op in common_methods_invocations.op_db if op.name == name and op.variant_test_name == ""]
    return list(op.sample_inputs(device, dtype, requires_grad=True))


def _assert_same_loss_and_grad(fused_fn, torch_fn, input, dtype=torch.float32, reference_nan_grads=False,
                               **tolerance):
    """Loss and gradient of fused_fn equal torch_fn's. With reference_nan_grads, the reference is known to give
    NaN gradients where the true gradient is finite (e.g. sqrt differentiated at 0): there the fused gradient
    must be finite instead."""
    tolerance = tolerance or TOLERANCES[dtype]
    a = input.detach().clone().requires_grad_(True)
    b = input.detach().clone().requires_grad_(True)
    fused, expected = fused_fn(a), torch_fn(b)
    assert fused.dtype == input.dtype and fused.shape == expected.shape
    # The reference may run in float64: compare with its value rounded to the output dtype (an fp16 sum past
    # 65504 is inf in both).
    torch.testing.assert_close(fused, expected.to(fused.dtype), equal_nan=True, **tolerance)
    if expected.requires_grad and expected.numel() > 0:
        upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(0),
                              dtype=expected.dtype).to(expected.device)
        (ga,) = torch.autograd.grad(fused, a, upstream.to(fused.dtype))
        (gb,) = torch.autograd.grad(expected, b, upstream)
        assert ga.dtype == input.dtype
        if reference_nan_grads:
            undefined = torch.isnan(gb) & torch.isfinite(input)
            assert torch.isfinite(ga[undefined]).all()
            gb = torch.where(undefined, ga.to(gb.dtype), gb)
        torch.testing.assert_close(ga, gb.to(ga.dtype), equal_nan=True, **tolerance)


# ---------------------------------------------------------------------------- PyTorch's OpInfo samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_opinfo_samples(device, dtype):
    ran = 0
    for sample in _opinfo_samples("nn.functional.cross_entropy", device, dtype):
        target = sample.args[0]
        if target.dtype.is_floating_point:
            continue  # class-probability targets are not supported by the cost-sensitive op (documented)
        kwargs = dict(sample.kwargs)
        _assert_same_loss_and_grad(lambda x: fused_losses.cost_sensitive_cross_entropy(x, target, **kwargs),
                                   lambda x: F.cross_entropy(x, target, **kwargs), sample.input, dtype)
        ran += 1
    assert ran >= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_with_logits_opinfo_samples(device, dtype):
    ran = 0
    for sample in _opinfo_samples("nn.functional.binary_cross_entropy_with_logits", device, dtype):
        target = sample.args[0].detach()
        kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in sample.kwargs.items()}
        _assert_same_loss_and_grad(lambda x: fused_losses.weighted_bce_with_logits(x, target, **kwargs),
                                   lambda x: F.binary_cross_entropy_with_logits(x, target, **kwargs),
                                   sample.input, dtype)
        ran += 1
    assert ran >= 20


# ------------------------------------------------------------------------------------------ fuzzing


@st.composite
def cross_entropy_problems(draw):
    n = draw(st.sampled_from([0, 1, 2, 7, 31, 97, 256]))
    c = draw(st.sampled_from([1, 2, 3, 5, 10, 17, 33, 64, 257]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "spatial"]))
    scale = draw(st.sampled_from([0.0, 1.0, 10.0, 1e4]))
    return dict(n=n, c=c, dtype=dtype, layout=layout, scale=scale,
                ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                use_weight=draw(st.booleans()), label_smoothing=draw(st.sampled_from([0.0, 0.2])),
                cost=draw(st.sampled_from([None, "argmax", "expected"])), seed=draw(st.integers(0, 2**16)))


def _make_logits(p, device):
    gen = torch.Generator().manual_seed(p["seed"])
    n, c = p["n"], p["c"]
    if p["layout"] == "transposed":
        x = (torch.randn(c, n, generator=gen) * p["scale"]).t()
    elif p["layout"] == "sliced":
        x = (torch.randn(n, 2 * c + 1, generator=gen) * p["scale"])[:, 1::2]
    elif p["layout"] == "expanded":
        x = (torch.randn(1, c, generator=gen) * p["scale"]).expand(n, c)
    elif p["layout"] == "spatial":
        x = (torch.randn(n, c, 3, generator=gen) * p["scale"])
    else:
        x = torch.randn(n, c, generator=gen) * p["scale"]
    # Round to the tested dtype first so that the float64 reference sees the same values.
    x = x.to(p["dtype"]).to(device)
    target_shape = (n, 3) if p["layout"] == "spatial" else (n,)
    y = torch.randint(0, c, target_shape, generator=gen)
    y[torch.rand(target_shape, generator=gen) < p["ignore_fraction"]] = -100
    return x, y.to(device), gen


@given(problem=cross_entropy_problems())
def test_fuzz_cost_sensitive_cross_entropy(device, problem):
    x, y, gen = _make_logits(problem, device)
    c, dtype = problem["c"], problem["dtype"]
    weight = (torch.rand(c, generator=gen) + 0.1).to(device) if problem["use_weight"] else None
    cost = (torch.rand(c, c, generator=gen) * 2).to(device) if problem["cost"] else None
    kwargs = dict(weight=weight, reduction=problem["reduction"], label_smoothing=problem["label_smoothing"])
    mode = problem["cost"] or "argmax"

    def fused(z):
        return fused_losses.cost_sensitive_cross_entropy(z, y, cost, cost_mode=mode, **kwargs)

    def expected(z):
        kw = dict(kwargs, weight=None if weight is None else weight.double())
        return reference.cost_sensitive_cross_entropy(z.double(), y, None if cost is None else cost.double(),
                                                      cost_mode=mode, **kw)

    tolerance = dict(TOLERANCES[dtype])
    if problem["scale"] >= 1e4 and dtype != torch.float64:
        tolerance["atol"] = max(tolerance["atol"], 2e-2)  # logits of 1e4 carry about 1e-3 of rounding
    elif mode == "expected" and y.ne(-100).any():
        # d(ce f)/dz_j holds ce * p_j (W[y, j] - f): the rounding of f (relative eps) comes back multiplied by
        # the row's cross-entropy, tens of units for logits of scale 10.
        tolerance["atol"] *= 1 + F.cross_entropy(x.double(), y, reduction="none").max().item()
    _assert_same_loss_and_grad(fused, expected, x, **tolerance)


def _correlation_gradient_term_scale(x, y, mask, kind, per_timestep, eps=1e-8):
    """The largest term of the input gradient's formula (csrc/correlation_math.h) over the sequences, in float64:
    |y~| / sqrt((Cxx + n eps)(Cyy + n eps)) and |x~| / (Cxx + n eps) for Pearson, 2 (|x~| + |y~| + |mean gap|) /
    (Cxx + Cyy + n (gap^2 + eps)) for CCC; times n with per-step upstreams."""
    x, y = x.double().cpu(), y.double().cpu()
    if x.dim() == 2:
        x, y = x.unsqueeze(-1), y.unsqueeze(-1)
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.cpu()
    valid = valid.unsqueeze(-1).expand_as(x)
    n = valid.sum(1).double().clamp_min(1)
    mean_x, mean_y = (torch.where(valid, v, 0).sum(1) / n for v in (x, y))
    dx, dy = torch.where(valid, x - mean_x.unsqueeze(1), 0), torch.where(valid, y - mean_y.unsqueeze(1), 0)
    cxx, cyy = (dx * dx).sum(1), (dy * dy).sum(1)
    max_dx, max_dy = dx.abs().amax(1), dy.abs().amax(1)
    if kind == "pearson":
        scale = max_dy / ((cxx + n * eps) * (cyy + n * eps)).sqrt() + max_dx / (cxx + n * eps)
    else:
        gap = mean_x - mean_y
        scale = 2 * (max_dx + max_dy + gap.abs()) / (cxx + cyy + n * (gap * gap + eps))
    scale = scale * (n if per_timestep else 1)
    return float(scale.amax()) if scale.numel() else 0.0


@st.composite
def correlation_problems(draw):
    return dict(b=draw(st.sampled_from([0, 1, 3, 17])), t=draw(st.sampled_from([1, 2, 5, 64, 131])),
                d=draw(st.sampled_from([None, 1, 3])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                kind=draw(st.sampled_from(["pearson", "concordance"])), masked=draw(st.booleans()),
                transposed=draw(st.booleans()), offset=draw(st.sampled_from([0.0, 100.0])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                per_timestep=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@given(problem=correlation_problems())
# Found by fuzzing: a float16 sequence of 2 steps at offset 100 whose two predictions round to one value (a flat
# sequence: the gradient was +-inf before eps moved inside the variances).
@example(problem=dict(b=17, t=2, d=None, dtype=torch.float16, kind="pearson", masked=False, transposed=False,
                      offset=100.0, reduction="mean", per_timestep=False, seed=0))
# Found by `make fuzz`: float32, 2 steps, some of them close: gradient terms ~100x the gradient, whose float32
# rounding exceeded a fixed atol (the tolerance now scales with the terms, _correlation_gradient_term_scale).
@example(problem=dict(b=17, t=2, d=None, dtype=torch.float32, kind="pearson", masked=False, transposed=False,
                      offset=0.0, reduction="sum", per_timestep=False, seed=0))
def test_fuzz_correlation_losses(device, problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    b, t, d = problem["b"], problem["t"], problem["d"]
    shape = (b, t) if d is None else (b, t, d)
    x = torch.randn(shape, generator=gen) + problem["offset"]
    y = 0.5 * x + torch.randn(shape, generator=gen)
    if problem["transposed"]:  # time-major storage, viewed batch-first
        x, y = x.transpose(0, 1).contiguous().transpose(0, 1), y.transpose(0, 1).contiguous().transpose(0, 1)
    x, y = (v.to(problem["dtype"]).to(device) for v in (x, y))
    mask = (torch.rand(b, t, generator=gen) < 0.8).to(device) if problem["masked"] else None
    kwargs = dict(mask=mask, reduction=problem["reduction"], per_timestep=problem["per_timestep"])
    fused_fn = getattr(fused_losses, f"{problem['kind']}_correlation_loss")
    reference_fn = getattr(reference, f"{problem['kind']}_correlation_loss")
    tolerance = dict(TOLERANCES[problem["dtype"]])
    if problem["dtype"] in (torch.float16, torch.bfloat16):
        tolerance["atol"] *= 4  # short sequences amplify the rounding of the stored inputs
    # Far from zero, deviations from the mean carry the rounding of the offset: with 2 steps (r = +-1, a zero
    # true gradient made of cancelling terms) the gradient is that rounding, in both implementations.
    tolerance["atol"] += 10 * torch.finfo(problem["dtype"]).eps * problem["offset"]
    # More generally the gradient is a sum of terms that can be far larger than it (two close steps: small
    # variances); the kernels' float32 rounding of those terms is the error to allow.
    acc_eps = torch.finfo(torch.float64 if problem["dtype"] == torch.float64 else torch.float32).eps
    tolerance["atol"] += 8 * acc_eps * _correlation_gradient_term_scale(x, y, mask, problem["kind"],
                                                                          problem["per_timestep"])
    y_fixed = y.detach()
    _assert_same_loss_and_grad(lambda z: fused_fn(z, y_fixed, **kwargs),
                               lambda z: reference_fn(z.double(), y_fixed.double(), **kwargs), x,
                               reference_nan_grads=True, **tolerance)


@st.composite
def bce_problems(draw):
    return dict(shape=draw(st.sampled_from([(0, 5), (1, 1), (7, 13), (33, 100), (3, 4, 5)])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                target=draw(st.sampled_from(["float", "bool", "uint8"])),
                weight=draw(st.sampled_from([None, "row", "full"])), pos_weight=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 10.0, 1e4])), transposed=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                focusing=draw(st.sampled_from([None, (2.0, 2.0, 0.0), (0.0, 4.0, 0.05), (1.0, 3.0, 0.2)])),
                seed=draw(st.integers(0, 2**16)))


@given(problem=bce_problems())
def test_fuzz_weighted_bce(device, problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    shape = problem["shape"]
    x = torch.randn(shape, generator=gen) * problem["scale"]
    if problem["transposed"] and len(shape) == 2:
        x = x.t().contiguous().t()
    x = x.to(problem["dtype"]).to(device)
    positives = torch.rand(shape, generator=gen) < 0.1
    target = {"float": positives.float(), "bool": positives, "uint8": positives.to(torch.uint8)}[problem["target"]]
    target = target.to(device)
    weight = {None: None, "row": torch.rand(shape[-1:], generator=gen),
              "full": torch.rand(shape, generator=gen)}[problem["weight"]]
    weight = None if weight is None else weight.to(device)
    pos_weight = (torch.rand(shape[-1:], generator=gen) * 5).to(device) if problem["pos_weight"] else None
    focusing = dict(zip(("gamma_pos", "gamma_neg", "clip"), problem["focusing"] or (0.0, 0.0, 0.0)))
    kwargs = dict(weight=weight, pos_weight=pos_weight, reduction=problem["reduction"], **focusing)

    def expected(z):
        double = lambda v: None if v is None else v.double()  # noqa: E731
        if problem["focusing"] is None:
            return F.binary_cross_entropy_with_logits(z.double(), target.double(), double(weight),
                                                      reduction=problem["reduction"], pos_weight=double(pos_weight))
        return reference.weighted_bce_with_logits(z.double(), target.double(), double(weight), double(pos_weight),
                                                  problem["reduction"], **focusing)

    tolerance = dict(TOLERANCES[problem["dtype"]])
    if problem["scale"] >= 1e4 and problem["reduction"] != "none":
        tolerance["rtol"] = max(tolerance["rtol"], 1e-4)  # sums of terms of 1e4
    _assert_same_loss_and_grad(lambda z: fused_losses.weighted_bce_with_logits(z, target, **kwargs), expected, x,
                               **tolerance)


# ------------------------------------------------------------------------------ the 2-pass backward's cost


class _RecordLargeOutputs(TorchDispatchMode):
    """Records the ops, views aside, that produce a tensor of at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        large = any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in torch.utils._pytree.tree_leaves(out))
        if large and not func.is_view:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("loss_name", ["cost_sensitive_cross_entropy", "pearson_correlation_loss",
                                       "weighted_bce_with_logits"])
def test_unit_grad_output_backward_does_no_input_sized_work(device, loss_name):
    """With the 2-pass schedule and grad_output 1 the backward hands out the forward's gradient: no op in it
    may produce an input-sized tensor (as autograd's zero-filled grad_outputs of unused outputs once did)."""
    x = torch.randn(64, 50, device=device, requires_grad=True)
    losses = {
        "cost_sensitive_cross_entropy": lambda: fused_losses.cost_sensitive_cross_entropy(
            x, torch.randint(0, 50, (64,), device=device), torch.rand(50, 50, device=device), cost_mode="expected"),
        "pearson_correlation_loss": lambda: fused_losses.pearson_correlation_loss(
            x, torch.randn(64, 50, device=device), mask=torch.rand(64, 50, device=device) < 0.9),
        "weighted_bce_with_logits": lambda: fused_losses.weighted_bce_with_logits(
            x, torch.rand(64, 50, device=device) < 0.1, gamma_neg=2.0),
    }
    loss = losses[loss_name]()
    with _RecordLargeOutputs(x.numel()) as recorder:
        (grad,) = torch.autograd.grad(loss, x)
    assert recorder.ops == [] and grad.shape == x.shape


# ------------------------------------------------------------------------------ large CPU outputs on huge pages


def _vm_flags_at(address):
    """The VmFlags of the mapping holding `address` in /proc/self/smaps ("hg": huge pages advised)."""
    holds_address = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header: "start-end perms ..."
            start, end = (int(bound, 16) for bound in first.split("-"))
            holds_address = start <= address < end
        elif holds_address and first == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _second_backward(loss, x):
    """The gradient from a second backward of `loss`: the 3-pass backward operator's output (the first hands out
    the forward's gradient)."""
    torch.autograd.grad(loss, x, retain_graph=True)
    return torch.autograd.grad(loss, x)[0]


_HUGE_PAGE = 2 << 20
_LARGE_COLUMNS = 1024  # 8192 rows of float32: 32 MB, csrc/cpu/huge_pages.h's threshold

# Each op's CPU outputs of the shape of `x` (8192 x 1024 float32: 32 MB): the forward's gradient (2-pass), the
# 3-pass backward's, the unreduced loss.
_LARGE_OUTPUTS = {
    "cross_entropy_forward_gradient": lambda x: torch.autograd.grad(
        fused_losses.cost_sensitive_cross_entropy(x, torch.randint(0, _LARGE_COLUMNS, (len(x),))), x)[0],
    "cross_entropy_backward": lambda x: _second_backward(
        fused_losses.cost_sensitive_cross_entropy(x, torch.randint(0, _LARGE_COLUMNS, (len(x),))), x),
    "bce_forward_gradient": lambda x: torch.autograd.grad(
        fused_losses.weighted_bce_with_logits(x, torch.rand(x.shape) < 0.1), x)[0],
    "bce_backward": lambda x: _second_backward(fused_losses.weighted_bce_with_logits(x, torch.rand(x.shape) < 0.1), x),
    "bce_unreduced_loss": lambda x: fused_losses.weighted_bce_with_logits(
        x.detach(), torch.rand(x.shape) < 0.1, reduction="none"),
    "pearson_forward_gradient": lambda x: torch.autograd.grad(
        fused_losses.pearson_correlation_loss(x, torch.randn(x.shape)), x)[0],
    "pearson_backward": lambda x: _second_backward(fused_losses.pearson_correlation_loss(x, torch.randn(x.shape)), x),
    "pearson_per_timestep_loss": lambda x: fused_losses.pearson_correlation_loss(
        x.detach(), torch.randn(x.shape), per_timestep=True, reduction="none"),
}


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="needs Linux with transparent huge pages")
@pytest.mark.skipif(os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" or os.environ.get("FUSED_LOSSES_HUGE_PAGES") == "0",
                    reason="c10 advises huge pages itself / the advice is turned off")
@pytest.mark.parametrize("output_name", list(_LARGE_OUTPUTS))
def test_large_cpu_outputs_are_advised_huge_pages(output_name):
    """A CPU output of 32 MB or more is usually a fresh mapping at every call (glibc): each op advises huge pages on
    its whole 2 MB pages before writing it, sparing 4 KB page faults that cost more than the kernel
    (csrc/cpu/huge_pages.h). (Whether a smaller output's memory carries the flag depends on what glibc reuses.)"""
    x = torch.randn(8192, _LARGE_COLUMNS, requires_grad=True)
    output = _LARGE_OUTPUTS[output_name](x)
    first_huge_page = (output.data_ptr() + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    assert "hg" in _vm_flags_at(first_huge_page)


# Each op's call with `place(name, tensor)` around every tensor argument but the input.
_CALLS_WITH_PLACED_ARGUMENTS = {
    "cost_sensitive_cross_entropy": lambda x, place: fused_losses.cost_sensitive_cross_entropy(
        x, place("target", torch.tensor([0, 1, 2, 3, 4, 0])), place("cost_matrix", torch.ones(5, 5)),
        weight=place("weight", torch.ones(5))),
    "pearson_correlation_loss": lambda x, place: fused_losses.pearson_correlation_loss(
        x, place("target", torch.randn(6, 5)), mask=place("mask", torch.ones(6, 5, dtype=torch.bool))),
    "weighted_bce_with_logits": lambda x, place: fused_losses.weighted_bce_with_logits(
        x, place("target", torch.rand(6, 5)), weight=place("weight", torch.ones(5)),
        pos_weight=place("pos_weight", torch.ones(5))),
    "weighted_bce_with_logits_sparse": lambda x, place: fused_losses.weighted_bce_with_logits(
        x, positive_indices=place("positive_indices", torch.tensor([[0], [1], [2], [3], [4], [-1]]))),
}


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("loss_name, argument", [
    (loss_name, argument) for loss_name, arguments in [
        ("cost_sensitive_cross_entropy", ["target", "cost_matrix", "weight"]),
        ("pearson_correlation_loss", ["target", "mask"]),
        ("weighted_bce_with_logits", ["target", "weight", "pos_weight"]),
        ("weighted_bce_with_logits_sparse", ["positive_indices"])]
    for argument in arguments])
def test_argument_on_the_meta_device_is_refused(loss_name, argument, requires_grad):
    """A meta tensor beside a CPU input dispatches to the op's fake kernel, which used to return an
    uninitialised CPU tensor as the loss; it must raise the kernels' device error instead."""
    x = torch.randn(6, 5, requires_grad=requires_grad)

    def place(name, tensor):
        return tensor.to("meta") if name == argument else tensor

    with pytest.raises(ValueError, match=f"{argument} must be on the same device as input \\(cpu\\), got meta"):
        _CALLS_WITH_PLACED_ARGUMENTS[loss_name](x, place)
    _CALLS_WITH_PLACED_ARGUMENTS[loss_name](x, lambda name, tensor: tensor)  # the same call on one device runs


# ------------------------------------------------------------------------------------------ concurrency


def test_ops_from_several_python_threads():
    problems = []
    for i in range(16):
        x = torch.randn(500 + i, 20)
        y = torch.randint(0, 20, (500 + i,))
        problems.append((x, y, torch.rand(20, 20)))
    expected = [fused_losses.cost_sensitive_cross_entropy(*p, cost_mode="expected") for p in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: fused_losses.cost_sensitive_cross_entropy(*p, cost_mode="expected"),
                                problems * 4))
    for i, result in enumerate(results):
        assert torch.equal(result, expected[i % len(problems)])


# ------------------------------------------------------------------------------------------------- DDP


DDP_TIMEOUT_S = 120  # a collective that waits longer fails its worker; the test fails after this too


def _ddp_worker(rank, world_size, init_file, loss_name, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
    try:
        _ddp_step(rank, world_size, loss_name, result_file)
        # Destroy the process group while the interpreter is fully alive, with nothing else holding it: DDP's
        # reducer (kept by the parameters' autograd hooks, possibly in a reference cycle) holds it, and a gloo
        # group destroyed during interpreter teardown aborted the worker ("terminate called without an active
        # exception", SIGABRT) in about 1 run in 20.
        gc.collect()
    finally:
        dist.destroy_process_group()


def _ddp_step(rank, world_size, loss_name, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model, inputs, loss_fn = _ddp_problem(loss_name)
    ddp = DistributedDataParallel(model)
    shard = [t.chunk(world_size)[rank] for t in inputs]
    loss_fn(ddp(shard[0]), *shard[1:]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], result_file)
    dist.barrier()  # no rank tears gloo down while the other may still talk to it


def _ddp_problem(loss_name):
    """A linear model, a batch and a mean-reduced loss whose full-batch mean equals the mean of the shards'."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6)
    x = torch.randn(32, 8)
    if loss_name == "cost_sensitive_cross_entropy":
        y = torch.randint(0, 6, (32,))
        cost = torch.rand(6, 6) + 0.5
        return model, (x, y), lambda out, t: fused_losses.cost_sensitive_cross_entropy(out, t, cost,
                                                                                       cost_mode="expected")
    if loss_name == "pearson_correlation_loss":
        # 4 sequences of 8 steps with 6 channels: the model maps each step's features to the channels.
        x = torch.randn(4, 8, 8)
        y = torch.randn(4, 8, 6)
        mask = torch.rand(4, 8) < 0.9
        return model, (x, y, mask), lambda out, t, m: fused_losses.pearson_correlation_loss(out, t, mask=m)
    if loss_name == "weighted_bce_with_logits":
        y = torch.rand(32, 6) < 0.2
        pos_weight = torch.rand(6) * 3
        return model, (x, y), lambda out, t: fused_losses.weighted_bce_with_logits(
            out, t, pos_weight=pos_weight, gamma_neg=2.0, clip=0.05)
    raise KeyError(loss_name)


DDP_LOSSES = ["cost_sensitive_cross_entropy", "pearson_correlation_loss", "weighted_bce_with_logits"]


@pytest.mark.parametrize("loss_name", DDP_LOSSES)
def test_ddp_two_processes_match_single_process(loss_name):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        workers = mp.spawn(_ddp_worker, args=(2, init_file, loss_name, result_file), nprocs=2, join=False)
        deadline = time.monotonic() + DDP_TIMEOUT_S
        while not workers.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if a worker failed
            if time.monotonic() >= deadline:
                for process in workers.processes:
                    process.kill()
                pytest.fail(f"the DDP workers did not finish within {DDP_TIMEOUT_S} s")
        ddp_grads = torch.load(result_file)
    model, inputs, loss_fn = _ddp_problem(loss_name)
    loss_fn(model(inputs[0]), *inputs[1:]).backward()
    for ddp_grad, param in zip(ddp_grads, model.parameters()):
        torch.testing.assert_close(ddp_grad, param.grad)


# ------------------------------------------------------------------------------- AMP and CUDA graphs


def _three_losses(device, dtype=torch.float32):
    """(name, logits, loss_fn(logits)) for each op family, small shapes."""
    gen = torch.Generator().manual_seed(0)
    y_ce = torch.randint(0, 7, (64,), generator=gen).to(device)
    cost = (torch.rand(7, 7, generator=gen) + 0.5).to(device)
    target_seq = torch.randn(8, 50, generator=gen).to(device=device, dtype=dtype)
    labels = (torch.rand(64, 30, generator=gen) < 0.1).to(device)
    return [
        ("cost_sensitive_cross_entropy", (64, 7),
         lambda z: fused_losses.cost_sensitive_cross_entropy(z, y_ce, cost, cost_mode="expected")),
        ("pearson_correlation_loss", (8, 50), lambda z: fused_losses.pearson_correlation_loss(z, target_seq)),
        ("weighted_bce_with_logits", (64, 30),
         lambda z: fused_losses.weighted_bce_with_logits(z, labels, gamma_neg=2.0, clip=0.05)),
    ]


_DYNAMIC_SHAPE_LOSSES = {
    "cost_sensitive_cross_entropy": (
        lambda rows: (torch.randn(rows, 5), torch.randint(0, 5, (rows,))),
        lambda z, y: fused_losses.cost_sensitive_cross_entropy(z, y, torch.ones(5, 5) + torch.eye(5), ignore_index=1,
                                                               label_smoothing=0.1)),
    "pearson_correlation_loss": (
        lambda rows: (torch.randn(rows, 7), torch.randn(rows, 7), torch.randint(0, 8, (rows,))),
        lambda z, y, lengths: fused_losses.pearson_correlation_loss(z, y, lengths=lengths, eps=1e-6)),
    "concordance_correlation_loss": (
        lambda rows: (torch.randn(7, rows, 2), torch.randn(7, rows, 2)),
        lambda z, y: fused_losses.concordance_correlation_loss(z, y, dim=0, per_timestep=True)),
    "weighted_bce_with_logits": (
        lambda rows: (torch.randn(rows, 6), torch.randint(-1, 6, (rows, 3))),
        lambda z, indices: fused_losses.weighted_bce_with_logits(z, positive_indices=indices, gamma_neg=2.0,
                                                                 clip=0.05)),
}


@pytest.mark.parametrize("name", list(_DYNAMIC_SHAPE_LOSSES))
def test_compile_fullgraph_with_dynamic_shapes(name):
    """torch.compile(fullgraph=True, dynamic=True): one graph for every batch size, equal to eager (the argument
    checks must not call what Dynamo cannot trace with symbolic values, such as math.isfinite)."""
    make_arguments, loss_fn = _DYNAMIC_SHAPE_LOSSES[name]
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for rows in (4, 6, 9):
        z, *rest = make_arguments(rows)
        a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        compiled_loss, eager_loss = compiled(a, *rest), loss_fn(b, *rest)
        torch.testing.assert_close(compiled_loss, eager_loss)
        torch.testing.assert_close(torch.autograd.grad(compiled_loss, a)[0], torch.autograd.grad(eager_loss, b)[0])


def test_autocast_reads_the_logits_dtype_and_returns_float32(device):
    """Under autocast the logits are not re-cast: bf16 logits (a Linear's output under autocast) are read as
    they are, and the loss comes back in float32 as PyTorch's losses do under autocast, close to the float32
    result; outside autocast the same bf16 logits give a bf16 loss."""
    for name, shape, loss_fn in _three_losses(device):
        features = torch.randn(shape[0], 16, device=device)
        layer = torch.nn.Linear(16, shape[1]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = layer(features)
            loss = loss_fn(logits)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32, name
        torch.testing.assert_close(loss, loss_fn(logits.float()), **TOLERANCES[torch.bfloat16])
        expected_dtype = torch.float32 if name == "pearson_correlation_loss" else torch.bfloat16  # float32 target
        assert loss_fn(logits.detach()).dtype == expected_dtype, name
        loss.backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.toolchain
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks a Linux (libstdc++) build")
def test_extension_uses_the_process_libstdcxx():
    """A toolchain that links libstdc++ statically (setup.py, _libstdcxx_link_args) gave the extension a private
    copy of it: every C++ error message that formats a number lost the numbers or crashed the process."""
    library = Path(fused_losses._C.__file__).read_bytes()
    assert b"libstdc++.so.6" in library, "the extension does not link the shared libstdc++"
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target must have the input's shape \[3, 5\], got \[3, 4\]"):
        torch.ops.fused_losses.weighted_bce_with_logits(x, x[:, :4], None, None, None, "mean", 0.0, 0.0, 0.0, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_and_replay_with_new_inputs():
    for name, shape, loss_fn in _three_losses("cuda"):
        static_logits = torch.randn(shape, device="cuda", requires_grad=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
                (g,) = torch.autograd.grad(loss_fn(static_logits), static_logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = loss_fn(static_logits)
            (static_grad,) = torch.autograd.grad(static_loss, static_logits)
        for _ in range(3):
            fresh = torch.randn(shape, device="cuda")
            with torch.no_grad():
                static_logits.copy_(fresh)
            graph.replay()
            eager_logits = fresh.clone().requires_grad_(True)
            eager_loss = loss_fn(eager_logits)
            (eager_grad,) = torch.autograd.grad(eager_loss, eager_logits)
            assert torch.equal(static_loss, eager_loss), name
            assert torch.equal(static_grad, eager_grad), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_reduce_overhead_matches_eager():
    for name, shape, loss_fn in _three_losses("cuda"):
        compiled = torch.compile(loss_fn, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            z = torch.randn(shape, device="cuda")
            a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
            compiled_loss, eager_loss = compiled(a), loss_fn(b)
            torch.testing.assert_close(compiled_loss, eager_loss)
            torch.testing.assert_close(torch.autograd.grad(compiled_loss, a)[0], torch.autograd.grad(eager_loss, b)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA device with 40 GiB")
def test_more_than_2_pow_31_elements_cuda():
    """(16385, 131072) bf16 logits: 2^31 + 2^17 elements, so any 32-bit offset would wrap."""
    n, c = 16385, 131072
    torch.manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, c, (n,), device="cuda")
    loss = fused_losses.cost_sensitive_cross_entropy(x, y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    for first in range(0, n, 2048):  # chunked float32 reference
        rows = slice(first, min(n, first + 2048))
        xr = x[rows].detach().float().requires_grad_(True)
        expected = F.cross_entropy(xr, y[rows], reduction="none")
        (expected_grad,) = torch.autograd.grad(expected.sum(), xr)
        torch.testing.assert_close(loss[rows].float(), expected, **TOLERANCES[torch.bfloat16])
        torch.testing.assert_close(grad[rows].float(), expected_grad, **TOLERANCES[torch.bfloat16])
    # The last row lies past element 2^31: its gradient is p - onehot(y), negative only at its target.
    assert torch.isfinite(grad[-1]).all() and grad[-1].float().argmin() == y[-1]
