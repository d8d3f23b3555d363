"""Benchmark cases of fused_losses.weighted_bce_with_logits (issue 4): the fused op with float, bool and
sparse-index targets against F.binary_cross_entropy_with_logits with pos_weight on the float target (what a
user runs otherwise; the harness also times it under torch.compile).

Bytes (logits U, target T, pos_weight P): forward U + T + P; forward + backward with the 2-pass schedule
that runs whenever the logits require grad (csrc/common.h): 2U + T + P — the forward reads logits and target
once and writes the gradient, the backward reads only grad_output. T is the logits' size for a target in the
input's dtype, numel bytes for bool, and N * K * 8 for the int64 index lists.
"""

from typing import Dict, List

import torch
import torch.nn.functional as F

import fused_losses
from fused_losses.reference import dense_target_from_indices

from .case import BenchCase

OP = "weighted_bce_with_logits"
TARGET_FORMS = ("float", "bool", "sparse")


def _positives_per_row(num_labels: int) -> int:
    """A few positives per sample, as in multi-label data sets (K of the sparse form)."""
    return max(4, num_labels // 256)


def _make_inputs(rows: int, num_labels: int, dtype: torch.dtype, device: str, form: str) -> Dict:
    max_positives = _positives_per_row(num_labels)
    indices = torch.randint(0, num_labels, (rows, max_positives), device=device)
    indices[:, max_positives // 2:] = indices[:, max_positives // 2:].where(
        torch.rand(rows, max_positives - max_positives // 2, device=device) < 0.5, -1)  # padded rows
    float_target = dense_target_from_indices(indices, num_labels, dtype)
    inputs = dict(input=torch.randn(rows, num_labels, device=device, dtype=dtype).requires_grad_(),
                  float_target=float_target,
                  pos_weight=torch.rand(num_labels, device=device, dtype=dtype) + 0.5)
    if form == "float":
        inputs["target"] = float_target
    elif form == "bool":
        inputs["target"] = float_target.bool()
    else:
        inputs["positive_indices"] = indices
    return inputs


def _fused(input, pos_weight, float_target, target=None, positive_indices=None):
    return fused_losses.weighted_bce_with_logits(input, target, pos_weight=pos_weight,
                                                 positive_indices=positive_indices)


def _reference(input, pos_weight, float_target, target=None, positive_indices=None):
    return F.binary_cross_entropy_with_logits(input, float_target, pos_weight=pos_weight)


def _case(rows: int, num_labels: int, dtype: torch.dtype, device: str, form: str, smoke: bool = False) -> BenchCase:
    logits_bytes = rows * num_labels * dtype.itemsize
    target_bytes = {"float": logits_bytes, "bool": rows * num_labels,
                    "sparse": rows * _positives_per_row(num_labels) * 8}[form]
    pos_weight_bytes = num_labels * dtype.itemsize
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    target_name = f"sparse K={_positives_per_row(num_labels)}" if form == "sparse" else f"{form} target"
    return BenchCase(
        op=OP,
        label=f"({rows}, {num_labels}) {dtype_name} {target_name}",
        make_inputs=lambda: _make_inputs(rows, num_labels, dtype, device, form),
        fused=_fused,
        reference=_reference,
        bytes_forward=logits_bytes + target_bytes + pos_weight_bytes,
        bytes_forward_backward=2 * logits_bytes + target_bytes + pos_weight_bytes,
        smoke=smoke,
        # The headline rows on CUDA: (65536, 4096) bf16 with each target form.
        headline=device != "cpu" and (rows, num_labels) == (65536, 4096) and dtype == torch.bfloat16,
    )


def cases(device: str, quick: bool) -> List[BenchCase]:
    result = [_case(1024, 100, torch.float32, device, "float", smoke=True)]
    if device == "cpu":
        shapes = [(8192, 1000)]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    else:
        shapes = [(65536, 4096)] if quick else [(65536, 4096), (1048576, 100)]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    for rows, num_labels in shapes:
        for dtype in dtypes:
            result += [_case(rows, num_labels, dtype, device, form) for form in TARGET_FORMS]
    return result
