"""Shared test fixtures: every device test runs on the CPU and, when one is present, on CUDA."""

import os
import tempfile

import pytest
import torch

# A fresh torch.compile cache per test session: a cached graph would keep a fake kernel's old output shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fused_losses_inductor_"))

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


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
