"""Benchmark cases of the cost-sensitive cross-entropy: fused op vs the seed formula
(`fused_losses.reference`, eager and compiled) and, without a cost matrix, Liger's cross-entropy."""

import sys

import torch

import fused_losses
from fused_losses import reference

from .case import BenchCase

LIGER_TARGET = 1.2  # speed-up over Liger's cross-entropy (forward + backward) at vocabulary size
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _liger_cross_entropy():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    except Exception as error:  # installed but unusable here (e.g. its Triton): a row without Liger, said so
        print(f"liger_kernel does not import: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return lambda input, target, cost_matrix=None: liger_cross_entropy(input, target)


def _bytes(n: int, c: int, dtype: torch.dtype, has_cost: bool):
    """Bytes moved. Forward alone: it reads logits + targets and writes per-row statistics. Forward + backward
    with the 2-pass schedule that runs whenever the logits require grad (csrc/common.h): a pre-pass reads the
    targets (the total weight of 'mean'), the forward reads logits + targets and writes the statistics and
    the gradient; the backward reads only grad_output."""
    logits = n * c * dtype.itemsize
    targets = n * 8
    stats = n * (3 if has_cost else 2) * (8 if dtype == torch.float64 else 4)  # max, log-sum(, cost factor)
    forward = logits + targets + stats
    return forward, targets + forward + logits


def _case(n, c, dtype, device, with_cost, smoke=False, target_vs_compiled=None, headline=False):
    def make_inputs():
        x = torch.randn(n, c, device=device, dtype=dtype).requires_grad_(True)
        y = torch.randint(0, c, (n,), device=device)
        inputs = dict(input=x, target=y)
        if with_cost:
            inputs["cost_matrix"] = torch.rand(c, c, device=device) + 0.5
        return inputs

    forward_bytes, total_bytes = _bytes(n, c, dtype, with_cost)
    extra = {} if with_cost else {"liger": _liger_cross_entropy() if device == "cuda" else None}
    # Without a cost matrix (vocabulary sizes) the fused op must beat Liger by 1.2x and allocate no more than the
    # gradient it returns (plus its O(N) row statistics and partial sums: 1 MiB of slack).
    liger_target = None if with_cost else LIGER_TARGET
    peak_bound = None if with_cost else n * c * dtype.itemsize + 2**20
    return BenchCase(
        op="cost_sensitive_cross_entropy",
        label=f"({n}, {c}) {DTYPE_NAMES[dtype]}{' cost' if with_cost else ''}",
        make_inputs=make_inputs,
        fused=fused_losses.cost_sensitive_cross_entropy,
        reference=reference.cost_sensitive_cross_entropy,
        bytes_forward=forward_bytes,
        bytes_forward_backward=total_bytes,
        extra=extra,
        smoke=smoke,
        target_vs_compiled=target_vs_compiled,
        headline=headline,
        target_vs_liger=liger_target,
        max_peak_extra_bytes=peak_bound,
    )


def cases(device: str, quick: bool):
    if device == "cuda":
        # (N, C, cost matrix, target speed-up over torch.compile): no cost matrix at vocabulary size, where a
        # dense C x C matrix would take 61 GiB.
        shapes = [(4194304, 10, True, 5.0), (262144, 1000, True, 2.0), (8192, 128256, False, 2.0)]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
        # The headline rows: bf16 at every shape.
        result = [_case(n, c, dt, device, cost, target_vs_compiled=target, headline=dt == torch.bfloat16)
                  for dt in dtypes for n, c, cost, target in shapes]
        result.append(_case(4096, 10, torch.float32, device, True, smoke=True))
        return result
    shapes = [(262144, 10), (16384, 1000)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    result = [_case(n, c, dt, device, True) for dt in dtypes for n, c in shapes]
    result.append(_case(4096, 10, torch.float32, device, True, smoke=True))
    return result
