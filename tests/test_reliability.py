"""Reliability across ops: PyTorch's own OpInfo samples, differential fuzzing against the references,
concurrency, and a 2-process DDP step matching the single-process gradient."""

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_losses
from fused_losses import reference
from conftest import TOLERANCES

FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("FUSED_LOSSES_FUZZ_EXAMPLES", "40")), deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _opinfo_samples(name, device, dtype):
    common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
    (op,) = [op for op in common_methods_invocations.op_db if op.name == name and op.variant_test_name == ""]
    return list(op.sample_inputs(device, dtype, requires_grad=True))


def _assert_same_loss_and_grad(fused_fn, torch_fn, input, dtype=torch.float32, **tolerance):
    tolerance = tolerance or TOLERANCES[dtype]
    a = input.detach().clone().requires_grad_(True)
    b = input.detach().clone().requires_grad_(True)
    fused, expected = fused_fn(a), torch_fn(b)
    assert fused.dtype == input.dtype and fused.shape == expected.shape
    # The reference may run in float64: compare with its value rounded to the output dtype (an fp16 sum past
    # 65504 is inf in both).
    torch.testing.assert_close(fused, expected.to(fused.dtype), equal_nan=True, **tolerance)
    if expected.requires_grad and expected.numel() > 0:
        upstream = torch.rand_like(expected)
        (ga,) = torch.autograd.grad(fused, a, upstream.to(fused.dtype))
        (gb,) = torch.autograd.grad(expected, b, upstream)
        assert ga.dtype == input.dtype
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


@FUZZ_SETTINGS
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
    _assert_same_loss_and_grad(fused, expected, x, **tolerance)


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


def _ddp_worker(rank, world_size, init_file, loss_name, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, inputs, loss_fn = _ddp_problem(loss_name)
        ddp = DistributedDataParallel(model)
        shard = [t.chunk(world_size)[rank] for t in inputs]
        loss_fn(ddp(shard[0]), *shard[1:]).backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], result_file)
    finally:
        dist.destroy_process_group()


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
    raise KeyError(loss_name)


DDP_LOSSES = ["cost_sensitive_cross_entropy"]


@pytest.mark.parametrize("loss_name", DDP_LOSSES)
def test_ddp_two_processes_match_single_process(loss_name):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        mp.spawn(_ddp_worker, args=(2, init_file, loss_name, result_file), nprocs=2, join=True)
        ddp_grads = torch.load(result_file)
    model, inputs, loss_fn = _ddp_problem(loss_name)
    loss_fn(model(inputs[0]), *inputs[1:]).backward()
    for ddp_grad, param in zip(ddp_grads, model.parameters()):
        torch.testing.assert_close(ddp_grad, param.grad)
