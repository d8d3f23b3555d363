"""Shared test fixtures: every device test runs on the CPU and, when one is present, on CUDA."""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# A fresh torch.compile cache per test session: a cached graph would keep a fake kernel's old output shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fused_losses_inductor_"))

# Property tests (hypothesis). `make test` / CI use the "ci" profile: derandomised (each test draws the same
# examples on every run, no example database), so a run passes or fails for the code alone and never for a new
# random draw. `make fuzz` uses "fuzz": fresh random examples, many more of them, failures remembered in
# .hypothesis/ and replayed first; a counterexample it finds becomes an explicit @example of its test.
_HYPOTHESIS_COMMON = dict(deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=40, **_HYPOTHESIS_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUSED_LOSSES_FUZZ_EXAMPLES", "1000")),
                          **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("FUSED_LOSSES_HYPOTHESIS_PROFILE", "ci"))

CUDA_SKIP_REASON = "no CUDA device on this machine: the CUDA kernels are compiled here but run only on a GPU"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)]),
]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Tolerances against a float64 reference, by the dtype the kernel reads and writes.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def pytest_addoption(parser):
    parser.addoption("--fastest-first", action="store_true",
                     help="run the tests in increasing order of their mean duration in tests/durations.json")


def pytest_collection_modifyitems(config, items):
    """--fastest-first (scripts/gpu_check.sh): a run cut off at its time limit has then finished as many tests as
    it could. tests/durations.json holds each test function's mean seconds per case, measured on its CPU cases
    (a proxy for the GPU's, where Python overhead dominates); tests it lacks (new ones) come first."""
    if config.getoption("--fastest-first"):
        durations = json.loads(Path(__file__).with_name("durations.json").read_text())
        items.sort(key=lambda item: durations.get(item.nodeid.split("[")[0], 0.0))  # stable: file order in ties


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_gradient_schedules_agree(fn, inputs, monkeypatch):
    """The 2-pass schedule (the forward also writes the gradient, csrc/common.h) gives bitwise the gradients
    of the 3-pass schedule, for grad_output 1, for another grad_output (the in-place backward recomputes)
    and for a second backward through the same graph (retain_graph): repeated backwards agree exactly, as
    gradcheck's reentrancy test demands. `fn(*leaves)` returns a reduced loss; `inputs` are the tensors that
    require grad (fn may close over others that do not)."""
    import fused_losses.functional as functional

    def gradients(loss, leaves, grad_output, retain_graph=False):
        grad_output = torch.tensor(grad_output, dtype=loss.dtype, device=loss.device)
        return torch.autograd.grad(loss, leaves, grad_output, retain_graph=retain_graph)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in inputs]

    asked = []  # what the functional API decided for the tensors that require grad: the first half of the test
    decide = functional._writes_gradient  # must take the 2-pass schedule for each of them

    def decide_and_record(tensor, reduction):
        decision = decide(tensor, reduction)
        if tensor.requires_grad:
            asked.append(decision)
        return decision

    monkeypatch.setattr(functional, "_writes_gradient", decide_and_record)
    two_pass = leaves()
    loss = fn(*two_pass)
    unit = gradients(loss, two_pass, 1.0, retain_graph=True)
    again_scaled = gradients(loss, two_pass, 2.5)  # the forward's gradient is gone: recomputed
    fresh = leaves()
    scaled = gradients(fn(*fresh), fresh, 2.5)  # the in-place backward recomputes it for grad_output 2.5

    assert asked and all(asked), "the forward was not asked to write the gradient"

    monkeypatch.setattr(functional, "_writes_gradient", lambda *args: False)
    three_pass = leaves()
    expected_unit = gradients(fn(*three_pass), three_pass, 1.0)
    expected_scaled = gradients(fn(*three_pass), three_pass, 2.5)
    for actual, expected in [(unit, expected_unit), (again_scaled, expected_scaled), (scaled, expected_scaled)]:
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
