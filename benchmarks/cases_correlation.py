"""Benchmark rows of the correlation losses: fused Pearson against the pure-PyTorch reference
(fused_losses.reference, timed eagerly and under torch.compile by the harness), at the issue's shapes.

Bytes moved, with U the bytes of one (B, T) input. Forward alone: it reads x and y (2U) and writes the
per-sequence statistics. Forward + backward with the 2-pass schedule that runs whenever the input requires
grad (csrc/common.h): the forward also writes the input's gradient and the backward reads only grad_output
(3U plus the statistics). On CUDA, sequences long enough to be split over several blocks (T = 262144) need the
cross-block merge of their moments before any gradient: the forward then re-reads x and y (5U)."""

from typing import List, Tuple

import torch

import fused_losses
from fused_losses import reference

from .case import BenchCase

CPU_SHAPES = [(4096, 1000)]
CUDA_SHAPES = [(65536, 100), (16384, 4096), (256, 262144)]
DTYPES = [torch.float32, torch.bfloat16]
SMOKE_SHAPE = (64, 256)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _inputs(shape: Tuple[int, int], dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(shape, device=device, dtype=torch.float32)
        y = 0.5 * x + torch.randn_like(x)  # correlated, as predictions and labels are
        return {"input": x.to(dtype).requires_grad_(), "target": y.to(dtype)}

    return make


STATS_PER_SEQUENCE = 8  # count, shifts, means and centred sums (float32)


SPLIT_SEQUENCE_STEPS = 65536  # CUDA_SHAPES' sequences this long are split over several blocks


def _bytes(shape: Tuple[int, int], dtype: torch.dtype, device: str) -> Tuple[int, int]:
    one_input = shape[0] * shape[1] * dtype.itemsize
    stats = shape[0] * STATS_PER_SEQUENCE * 4
    forward = 2 * one_input + stats
    rereads = 2 * one_input if device.startswith("cuda") and shape[1] >= SPLIT_SEQUENCE_STEPS else 0
    return forward, forward + rereads + one_input


# The headline rows on CUDA (float32): 2x torch.compile and 85% of the copy bandwidth.
HEADLINE_SHAPES = [(16384, 4096), (256, 262144)]


def _case(shape: Tuple[int, int], dtype: torch.dtype, device: str, smoke: bool = False) -> BenchCase:
    bytes_forward, bytes_forward_backward = _bytes(shape, dtype, device)
    return BenchCase(
        op="pearson_correlation_loss",
        label=f"({shape[0]}, {shape[1]}) {_DTYPE_NAMES[dtype]}",
        make_inputs=_inputs(shape, dtype, device),
        fused=fused_losses.pearson_correlation_loss,
        reference=reference.pearson_correlation_loss,
        grad_input="input",
        bytes_forward=bytes_forward,
        bytes_forward_backward=bytes_forward_backward,
        smoke=smoke,
        headline=device.startswith("cuda") and shape in HEADLINE_SHAPES and dtype == torch.float32,
    )


def cases(device: str, quick: bool) -> List[BenchCase]:
    """The rows for `device` ("cpu" or "cuda"); `quick` keeps float32 only."""
    shapes = CUDA_SHAPES if device.startswith("cuda") else CPU_SHAPES
    dtypes = DTYPES[:1] if quick else DTYPES
    rows = [_case(SMOKE_SHAPE, torch.float32, device, smoke=True)]
    rows += [_case(shape, dtype, device) for shape in shapes for dtype in dtypes]
    return rows
