"""Every CUDA kernel and launch path at least once, at small sizes: the curated set that scripts/gpu_check.sh
runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck), where the whole test suite would take
far too long. Each case is one layout / lane split / template variant of one op, run through every schedule
(csrc/common.h): the 2-pass forward that writes the gradient with its in-place backward (grad_output 1, then
2.5), the 3-pass forward and backward, and reduction='none' with a random upstream gradient; values and
gradients are compared with the float64 reference (fused_losses.reference) on the CPU.

KERNELS says which kernels of csrc/cuda/*.cu each case launches, exactly (the scalar type left out: {T} and {A}
match float, double, c10::Half or c10::BFloat16), in the demangled form that torch.profiler reports, shortened by
short_kernel_name: 'forward_kernel<{T}, 4, true, false>', 'flat_kernel<(Pass)2, {T}, bool, true, true>' (enum
template arguments as the demangler writes them, '(Pass)N'; 'unsigned char', 'bool', 'true' as written).
On CUDA with FUSED_LOSSES_KERNEL_TRACE=1 (the GPU check's test stage, not under the sanitizer: both need CUPTI)
a case records the fused_losses kernels it launched and fails if one is missing or one is not listed.
test_every_kernel_has_a_case reads the kernels compiled into the built extension (its sm_90 cubins, through
scripts/sass_report.py: cuobjdump and c++filt, no GPU) and checks that the cases together name every one of
them, dtype aside, but those in UNREACHABLE, and that every name here is a compiled kernel. On the CPU the same
cases test the CPU kernels.

Layouts that a test must not lose: the checks clone the leaves (a clone of a padded or offset view is a fresh
contiguous, aligned tensor), so padded rows and misaligned bases are made inside the loss function, from the
leaf (differentiably).

Not launched here: the kernels in UNREACHABLE, and more than one grid-stride iteration of the cross-entropy and
correlation forwards (16384 blocks of 256 / G rows: over 2^18 rows at 16 lanes; the gradient kernels loop beyond
one wave of resident blocks, some 10^4 rows on an H100; test_weighted_bce.py::test_cuda_grid_stride_loops and the
emulation's small-limit build cover the loops)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_losses
from conftest import TOLERANCES, assert_gradient_schedules_agree
from fused_losses import reference

TRACE = os.environ.get("FUSED_LOSSES_KERNEL_TRACE") == "1"
REPOSITORY = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- expected kernels


def _cross_entropy(group, extra_terms, class_weights=True):
    """csrc/cuda/cost_sensitive_cross_entropy.cu. Every case runs 'mean' with the 2-pass forward (writes the
    gradient: the target_weight_kernel pre-pass and its StoreTotalEpilogue reduce, 'mean' only) and the 3-pass
    one, the backward, and 'none' (3-pass). group: the lanes per row of forward_kernel / backward_kernel,
    'tile' for short contiguous rows (rows_fit_tile: outer stride C and C * sizeof(T) <= 64 bytes), whose
    target-weight pre-pass counts rows as Group = 1, or 'block' for vectorizable rows of more than 512 packs
    (block_row_forward_kernel, a block per row; the backward a warp per row); without class weights the pre-pass
    is an exact count, one lane per row whatever the group (total_weight_is_exact_count). extra_terms:
    expected-cost mode or label smoothing (needs_extra_terms)."""
    e = "true" if extra_terms else "false"
    if group == "tile":
        passes = [f"tile_forward_kernel<{{T}}, true, {e}>", f"tile_forward_kernel<{{T}}, false, {e}>",
                  f"tile_backward_kernel<{{T}}, {e}>"]
        group = 1
    elif group == "block":
        passes = [f"block_row_forward_kernel<{{T}}, true, {e}>", f"block_row_forward_kernel<{{T}}, false, {e}>",
                  f"backward_kernel<{{T}}, 32, {e}>"]
        group = 256
    else:
        passes = [f"forward_kernel<{{T}}, {group}, true, {e}>", f"forward_kernel<{{T}}, {group}, false, {e}>",
                  f"backward_kernel<{{T}}, {group}, {e}>"]
    pre_pass = f"target_weight_kernel<{group if class_weights else 1}, {{A}}>"
    return passes + [pre_pass, "reduce_partials_kernel<{A}, 1, StoreTotalEpilogue<{A}>>",
                     "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"]


def _correlation(group, masked, chunked=False):
    """csrc/cuda/correlation_loss.cu, every operand lined up (one plan of `group` lanes for every sweep):
    the moments (reduce_items_kernel, + combine_chunks_kernel when cut into chunks) and the forward's
    CorrelationLossEpilogue; the gradient (map_items_kernel<GradientTask>: the backward, and the chunked
    forward that writes it; with a per-step upstream, its own variant); per time step the per-step loss and
    the backward's upstream sums. The 2-pass
    'mean' forward of a one-chunk plan needs the total weight before the moments: with a mask the
    SequenceWeightTask pre-pass and its ReducedLossEpilogue reduce, without one a fill (PyTorch's kernel)."""
    kernels = [f"reduce_items_kernel<{group}, MomentsTask<{{T}}>>",
               f"map_items_kernel<{group}, GradientTask<{{T}}, false>>",
               f"map_items_kernel<{group}, GradientTask<{{T}}, true>>",
               f"map_items_kernel<{group}, PerStepLossTask<{{T}}>>", f"reduce_items_kernel<{group}, UpstreamSumsTask<{{T}}>>",
               "reduce_partials_kernel<{A}, 2, CorrelationLossEpilogue<{T}>>"]
    if chunked:
        kernels += ["combine_chunks_kernel<MomentsTask<{T}>>", "combine_chunks_kernel<UpstreamSumsTask<{T}>>"]
    elif masked:
        kernels += [f"reduce_items_kernel<{group}, SequenceWeightTask<{{T}}>>",
                    "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"]
    return kernels


BCE_FOCUSING = ("plain", "focal", "asl")  # enum class Focusing { Plain, Focal, Asymmetric }


def _bce_flat(target, focusing, weighted):
    """csrc/cuda/weighted_bce_with_logits_kernels.cuh: flat_kernel<pass, T, target, focusing, weighted> (Pass:
    0 Forward, 1 Backward, 2 ForwardWithGradient; focusing: 'plain', 'focal' (no clip) or 'asl'). weighted: a
    weight, pos_weight or per-element grad_loss operand, so the backward of reduction='none' (a per-element
    upstream) is weighted even without weights."""
    f, w = f"(Focusing){BCE_FOCUSING.index(focusing)}", ("true" if weighted else "false")
    kernels = [f"flat_kernel<(Pass){p}, {{T}}, {target}, {f}, {w}>" for p in range(3)]
    if not weighted:
        kernels.append(f"flat_kernel<(Pass)1, {{T}}, {target}, {f}, true>")
    return kernels + ["reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]


def _bce_strided(target, focusing, weighted):
    """strided_kernel<pass, T, target, focusing, weighted>, as _bce_flat."""
    f, w = f"(Focusing){BCE_FOCUSING.index(focusing)}", ("true" if weighted else "false")
    kernels = [f"strided_kernel<(Pass){p}, {{T}}, {target}, {f}, {w}>" for p in range(3)]
    if not weighted:
        kernels.append(f"strided_kernel<(Pass)1, {{T}}, {target}, {f}, true>")
    return kernels + ["reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]


def _bce_sparse(focusing, weighted):
    """sparse_rows_kernel<pass, T, focusing, weighted>, as _bce_flat; weighted: a weight or per-element grad_loss
    operand (pos_weight is read by the patches of the positives only, in every variant)."""
    f, w = f"(Focusing){BCE_FOCUSING.index(focusing)}", ("true" if weighted else "false")
    kernels = [f"sparse_rows_kernel<(Pass){p}, {{T}}, {f}, {w}>" for p in range(3)]
    if not weighted:
        kernels.append(f"sparse_rows_kernel<(Pass)1, {{T}}, {f}, true>")
    return kernels + ["reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]


TARGETS = {"float": "{T}", "bool": "bool", "uint8": "unsigned char"}


# case id -> the fused_losses kernels it launches, with why the host code picks that path (csrc/cuda/*.cu).
KERNELS = {
    # Cross-entropy: rows of at most 64 bytes, back to back, go through the shared-memory tile kernels; other
    # rows take G lanes (lanes_per_row): 1 for strided rows or <= 4 loads, 4 up to 64 loads, 16 up to 256, a warp
    # beyond, and in the forward a block for rows of more than 512 packs; a load is a 16-byte pack when every row
    # is aligned and C is a multiple of the pack. Extra terms: each lane split once with and once without.
    "ce_G1_strided": _cross_entropy(1, True),  # (N, C, H, W): class stride H * W; expected cost, smoothing
    "ce_G1_vector": _cross_entropy(1, False),  # fp32 C = 8 in rows of 12 (not a tile): two packs; argmax
    "ce_G4_scalar": _cross_entropy(4, True),  # fp32 C = 30: not a multiple of 4, 120 bytes; expected
    "ce_G4_vector": _cross_entropy(4, False, class_weights=False),  # bf16 C = 64: 8 packs; argmax, no smoothing
    "ce_G16_vector": _cross_entropy(16, False),  # bf16 C = 1000: 125 packs; argmax
    "ce_G16_scalar": _cross_entropy(16, True),  # fp32 C = 201; expected cost
    "ce_G32_vector": _cross_entropy(32, True),  # fp32 C = 1100: 275 packs; smoothing
    "ce_G32_scalar": _cross_entropy(32, False),  # fp16 C = 1001; class weights only
    "ce_block_argmax": _cross_entropy("block", False),  # bf16 C = 4104: 513 packs; argmax, class weights
    "ce_block_expected": _cross_entropy("block", True, class_weights=False),  # fp32 C = 2052; expected, smoothing
    # bf16 C = 24576: a 48 KB row, which with the kernel's static shared memory needs the opt-in beyond 48 KB
    "ce_block_opt_in": _cross_entropy("block", False),
    # bf16 C = 128256: more than the shared memory holds (227 KB on an H100): the rest read again
    "ce_block_beyond_shared": _cross_entropy("block", False),
    "ce_tile": _cross_entropy("tile", True),  # fp32 C = 10 (40 bytes); expected cost, smoothing
    "ce_tile_misaligned": _cross_entropy("tile", False),  # bf16 C = 32 (64 bytes), base 2 bytes off 16; 300 rows
    # Correlation: items (sequence, chunk) of G lanes (make_chunk_plan): 1 for strided time or <= 4 loads, 4 up
    # to 64, a warp up to 512, the block beyond; long sequences of few items are cut into chunks. A mask only
    # matters for the one-chunk 2-pass 'mean' (the weight pre-pass); combine_chunks_kernel<SequenceWeightTask>
    # is unreachable (UNREACHABLE).
    "corr_G1_strided": _correlation(1, masked=True),  # (B, T, D = 2): time stride 2
    "corr_G1_strided_chunked": _correlation(1, masked=True, chunked=True),  # T = 1500 >= 2 chunks of 512
    "corr_G4": _correlation(4, masked=True),  # fp32 T = 100: 25 packs
    "corr_G32": _correlation(32, masked=False),  # fp32 T = 1000: 250 packs; no mask: the host's total weight
    # Rows one element past 16 bytes (stride T + 1), the mask's too: x, y and the mask line up with each other,
    # so the moments sweep (and the mask pre-pass on its plan) peels a head and stays in packs; the passes that
    # also touch an aligned output or upstream fall back to single steps, so 1000 loads: the block.
    "corr_G32_misaligned": ["reduce_items_kernel<32, MomentsTask<{T}>>", "reduce_items_kernel<32, SequenceWeightTask<{T}>>",
                            "map_items_kernel<256, GradientTask<{T}, false>>",
                            "map_items_kernel<256, GradientTask<{T}, true>>", "map_items_kernel<256, PerStepLossTask<{T}>>",
                            "reduce_items_kernel<256, UpstreamSumsTask<{T}>>",
                            "reduce_partials_kernel<{A}, 2, CorrelationLossEpilogue<{T}>>",
                            "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"],
    "corr_G256": _correlation(256, masked=True),  # T = 5000: 1250 packs, one chunk
    "corr_G256_chunked": _correlation(256, masked=False, chunked=True),  # T = 70000 >= 2 chunks of 32768
    # Weighted BCE: flat (contiguous logits and target whose bases are equally far from 16 bytes, a short head
    # peeled; weights in any (row, label) strides) in its six variants (plain / focal / ASL; weighted) for each
    # target type, strided (any other layout) or sparse rows (positive indices; packs when
    # rows are aligned, 4096-label chunks; its own focusing / weighted variants).
    **{f"bce_flat_{form}_{focusing}_{'weighted' if weighted else 'unweighted'}":
       _bce_flat(TARGETS[form], focusing, weighted)
       for form in TARGETS for focusing in BCE_FOCUSING for weighted in (True, False)},
    # logits, target 4 bytes off: 3-element head; outputs aligned (fresh tensors): stored element by element
    "bce_flat_misaligned": _bce_flat("{T}", "asl", True),
    # a padded-row target with contiguous logits: functional copies it (_copy_target_for_flat_kernels)
    "bce_flat_padded_target": _bce_flat("{T}", "asl", True),
    # Strided (transposed logits; a broadcast bool target): chunks of 8 elements of a row (4 with weights or for
    # ASL), in the six variants for each target type.
    **{f"bce_strided_{form}_{focusing}_{'weighted' if weighted else 'unweighted'}":
       _bce_strided(TARGETS[form], focusing, weighted)
       for form in TARGETS for focusing in BCE_FOCUSING for weighted in (True, False)},
    # Sparse rows: the six (focusing, weighted) variants across the layouts.
    "bce_sparse_vector": _bce_sparse("asl", True),  # L = 128; a weight
    "bce_sparse_scalar": _bce_sparse("plain", False),  # bf16 L = 101
    "bce_sparse_chunked": _bce_sparse("asl", False),  # L = 5000: two chunks per row; K = 40: two index batches
    "bce_sparse_grid_stride": _bce_sparse("plain", True),  # 140000 rows > 16384 blocks x 8 warps; a weight
    "bce_sparse_focal": _bce_sparse("focal", False),  # L = 128
    "bce_sparse_focal_weighted": _bce_sparse("focal", True),  # bf16 L = 101; a weight
}

# Compiled kernels that no input launches, with the reason (test_every_kernel_has_a_case).
UNREACHABLE = {
    "combine_chunks_kernel<SequenceWeightTask<{T}>>":
        "run_reduction<SequenceWeightTask> is compiled whole, but the mask pre-pass runs only when the moments "
        "kernel sweeps again (forward_cuda: task.sweeps_again needs plan.chunks == 1), never on a chunked plan",
}


# ------------------------------------------------------------------------------------------------ cases


def _close(actual, expected, dtype):
    """Against the float64 reference, atol relative to the largest magnitude (gradients have no unit)."""
    scale = expected.detach().abs().max().clamp_min(1e-30).item()
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().double(), equal_nan=True,
                               rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


def _check_against_reference(loss_fn, reference_fn, leaves, dtype, reduction):
    """The loss and its gradients for a random upstream against the float64 reference on the CPU."""
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    loss = loss_fn(*fresh, reduction=reduction)
    upstream = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, fresh, upstream)
    as64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = reference_fn(*as64, reduction=reduction)
    expected_grads = torch.autograd.grad(expected, as64, upstream.detach().cpu().double())
    _close(loss, expected, dtype)
    for grad, expected_grad in zip(grads, expected_grads):
        _close(grad, expected_grad, dtype)


def _check_schedules_and_reference(loss_fn, reference_fn, leaves, dtype, monkeypatch):
    """2-pass vs 3-pass gradients bitwise (conftest), then the reduced loss and reduction='none' against the
    float64 reference."""
    assert_gradient_schedules_agree(lambda *xs: loss_fn(*xs, reduction="mean"), leaves, monkeypatch)
    for reduction in ("mean", "none"):
        _check_against_reference(loss_fn, reference_fn, leaves, dtype, reduction)


def _offset_by_one(z):
    """z (contiguous) as a contiguous view one element into a new buffer: a base off 16-byte alignment."""
    return torch.cat([z.new_zeros(1), z.reshape(-1)])[1:].view(z.shape)


def _cross_entropy_case(device, shape, dtype, cost_mode=None, weight=True, smoothing=0.0, layout="contiguous"):
    """layout 'padded': (N, C) rows 4 elements apart more than C; 'misaligned': contiguous, one element off."""
    n, c = shape[0], shape[1]
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    target = torch.randint(0, c, (n, *shape[2:]), generator=gen)
    target.view(-1)[::7] = -100  # ignored rows
    target = target.to(device)
    kwargs = {"label_smoothing": smoothing}
    if cost_mode is not None:
        cost = torch.rand(c, c, generator=gen) + 0.5
        cost.fill_diagonal_(1.0)  # argmax mode needs a diagonal of 1
        kwargs.update(cost_matrix=cost.to(device), cost_mode=cost_mode)
    if weight:
        kwargs.update(weight=(torch.rand(c, generator=gen) + 0.5).to(device))
    arrange = {"contiguous": lambda z: z, "padded": lambda z: F.pad(z, (0, 4))[:, :c],
               "misaligned": _offset_by_one}[layout]

    def as64(value):  # the reference's float64 copy of a tensor argument
        return value.cpu().double() if torch.is_tensor(value) else value

    def loss_fn(z, reduction):
        return fused_losses.cost_sensitive_cross_entropy(arrange(z), target, reduction=reduction, **kwargs)

    def reference_fn(z, reduction):
        return reference.cost_sensitive_cross_entropy(
            z, target.cpu(), reduction=reduction, **{k: as64(v) for k, v in kwargs.items()})

    return loss_fn, reference_fn, [x]


def _correlation_case(device, shape, kind="pearson", offset=0, masked=True):
    """(B, T) or (B, T, D) float32 sequences, masked or not; `offset` (2-D only) starts every row `offset`
    elements into a row of T + offset (so rows are not 16-byte aligned, x, y and the mask alike)."""
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(shape, generator=gen)
    mask = torch.rand(shape[:2], generator=gen) > 0.2
    mask[:, :2] = True
    x, y = x.to(device), y.to(device)
    mask = mask.to(device) if masked else None
    if offset and masked:  # sliced on the device: a copy there would be contiguous again
        mask = torch.cat([mask[:, :offset], mask], dim=1)[:, offset:]
    fused = {"pearson": fused_losses.pearson_correlation_loss, "ccc": fused_losses.concordance_correlation_loss}[kind]
    ref = {"pearson": reference.pearson_correlation_loss, "ccc": reference.concordance_correlation_loss}[kind]
    per_timestep = {}

    def arrange(a):
        return F.pad(a, (offset, 0))[:, offset:] if offset else a

    def loss_fn(a, b, reduction):
        return fused(arrange(a), arrange(b), mask, reduction=reduction, **per_timestep)

    def reference_fn(a, b, reduction):
        return ref(a, b, None if mask is None else mask.cpu(), reduction=reduction, **per_timestep)

    return loss_fn, reference_fn, [x, y], per_timestep


def _bce_case(device, shape, dtype, form, layout="contiguous", max_positives=6, focusing="asl", weighted=True,
              weight=False):
    """focusing: 'asl' (gamma_neg 2, clip 0.05), 'focal' (gamma_pos 1, gamma_neg 2) or 'plain' BCE; weighted: a
    pos_weight; weight: a (L,) weight. layout 'misaligned': logits and target contiguous, both one element off 16
    bytes (the flat kernel peels a head); 'padded_target': the target a padded-row view; 'transposed': the
    logits a transposed view; 'broadcast': the target one row expanded (stride 0)."""
    rows, labels = shape
    gen = torch.Generator().manual_seed(labels)
    scores = torch.rand(rows, labels, generator=gen)
    indices = scores.topk(min(max_positives, labels), dim=1).indices
    counts = torch.randint(0, indices.shape[1] + 1, (rows, 1), generator=gen)
    indices = indices.where(torch.arange(indices.shape[1]) < counts, -1)  # padded with -1
    dense = reference.dense_target_from_indices(indices, labels, torch.float32)
    if layout == "transposed":
        x = torch.randn(labels, rows, generator=gen).t()
    else:
        x = torch.randn(rows, labels, generator=gen)
    x = (3 * x).to(device, dtype)
    pos_weight = (torch.rand(labels, generator=gen) + 0.5).to(device) if weighted else None
    label_weight = (torch.rand(labels, generator=gen) + 0.5).to(device) if weight else None
    options = {"asl": dict(gamma_neg=2.0, clip=0.05), "focal": dict(gamma_pos=1.0, gamma_neg=2.0), "plain": {}}[focusing]
    kwargs = dict(weight=label_weight, pos_weight=pos_weight, **options)
    if form == "sparse":
        kwargs["positive_indices"] = indices.to(device)
    else:
        target = {"float": dense.to(dtype), "bool": dense.bool(), "uint8": dense.to(torch.uint8)}[form].to(device)
        if layout == "broadcast":  # one target row for every sample: a stride-0 view (made on the device: a
            target = target[:1].expand(rows, labels)  # copy to another device would be contiguous)
            dense = dense[:1].expand(rows, labels)
        if layout == "misaligned":
            target = _offset_by_one(target)
        if layout == "padded_target":  # rows one element apart more than L: copied for the flat kernels on CUDA
            target = torch.cat([target, target[:, :1]], dim=1)[:, :labels]
        kwargs["target"] = target
    arrange = _offset_by_one if layout == "misaligned" else (lambda z: z)

    def loss_fn(z, reduction):
        return fused_losses.weighted_bce_with_logits(arrange(z), reduction=reduction, **kwargs)

    def reference_fn(z, reduction):
        return reference.weighted_bce_with_logits(
            z, dense.double(), weight=None if label_weight is None else label_weight.cpu().double(),
            pos_weight=None if pos_weight is None else pos_weight.cpu().double(), reduction=reduction, **options)

    return loss_fn, reference_fn, [x]


# Flat BCE: per target type, the six (focusing, weighted) variants, at sizes whose numel is not a multiple of
# the elements per step (the tail loop).
_FLAT_SHAPES = {"float": ((63, 101), torch.float32), "bool": ((63, 100), torch.bfloat16),
                "uint8": ((65, 33), torch.float32)}
CASES = {
    "ce_G1_strided": lambda d: _cross_entropy_case(d, (6, 5, 3, 4), torch.float32, "expected", smoothing=0.1),
    "ce_G1_vector": lambda d: _cross_entropy_case(d, (50, 8), torch.float32, "argmax", layout="padded"),
    "ce_G4_scalar": lambda d: _cross_entropy_case(d, (70, 30), torch.float32, "expected"),
    "ce_G4_vector": lambda d: _cross_entropy_case(d, (70, 64), torch.bfloat16, "argmax", weight=False),
    "ce_G16_vector": lambda d: _cross_entropy_case(d, (40, 1000), torch.bfloat16, "argmax"),
    "ce_G16_scalar": lambda d: _cross_entropy_case(d, (40, 201), torch.float32, "expected"),
    "ce_G32_vector": lambda d: _cross_entropy_case(d, (40, 1100), torch.float32, "argmax", smoothing=0.1),
    "ce_G32_scalar": lambda d: _cross_entropy_case(d, (40, 1001), torch.float16, None),
    "ce_block_argmax": lambda d: _cross_entropy_case(d, (40, 4104), torch.bfloat16, "argmax"),
    "ce_block_expected": lambda d: _cross_entropy_case(d, (40, 2052), torch.float32, "expected", weight=False,
                                                       smoothing=0.1),
    "ce_block_opt_in": lambda d: _cross_entropy_case(d, (9, 24576), torch.bfloat16),
    "ce_block_beyond_shared": lambda d: _cross_entropy_case(d, (9, 128256), torch.bfloat16),
    "ce_tile": lambda d: _cross_entropy_case(d, (70, 10), torch.float32, "expected", smoothing=0.1),
    "ce_tile_misaligned": lambda d: _cross_entropy_case(d, (300, 32), torch.bfloat16, "argmax", layout="misaligned"),
    **{f"bce_flat_{form}_{focusing}_{'weighted' if weighted else 'unweighted'}":
       (lambda d, form=form, focusing=focusing, weighted=weighted: _bce_case(
           d, *_FLAT_SHAPES[form], form, focusing=focusing, weighted=weighted))
       for form in TARGETS for focusing in BCE_FOCUSING for weighted in (True, False)},
    "bce_flat_misaligned": lambda d: _bce_case(d, (31, 33), torch.float32, "float", layout="misaligned"),
    "bce_flat_padded_target": lambda d: _bce_case(d, (40, 30), torch.float32, "float", layout="padded_target"),
    # L = 13 (a chunk of 8, a short one) for float, 30 for the others; bf16 logits with the uint8 target.
    **{f"bce_strided_{form}_{focusing}_{'weighted' if weighted else 'unweighted'}":
       (lambda d, form=form, focusing=focusing, weighted=weighted: _bce_case(
           d, (40, 13 if form == "float" else 30), torch.bfloat16 if form == "uint8" else torch.float32, form,
           layout="broadcast" if form == "bool" else "transposed", focusing=focusing, weighted=weighted))
       for form in TARGETS for focusing in BCE_FOCUSING for weighted in (True, False)},
    "bce_sparse_vector": lambda d: _bce_case(d, (40, 128), torch.float32, "sparse", weight=True),
    "bce_sparse_scalar": lambda d: _bce_case(d, (40, 101), torch.bfloat16, "sparse", focusing="plain"),
    "bce_sparse_chunked": lambda d: _bce_case(d, (8, 5000), torch.float32, "sparse", max_positives=40),
    "bce_sparse_grid_stride": lambda d: _bce_case(d, (140_000, 8), torch.float32, "sparse", max_positives=2,
                                                  focusing="plain", weight=True),
    "bce_sparse_focal": lambda d: _bce_case(d, (40, 128), torch.float32, "sparse", focusing="focal"),
    "bce_sparse_focal_weighted": lambda d: _bce_case(d, (40, 101), torch.bfloat16, "sparse", focusing="focal",
                                                     weight=True),
}
CORRELATION_CASES = {
    "corr_G1_strided": lambda d: _correlation_case(d, (3, 50, 2)),
    "corr_G1_strided_chunked": lambda d: _correlation_case(d, (2, 1500, 2), kind="ccc"),
    "corr_G4": lambda d: _correlation_case(d, (6, 100)),
    "corr_G32": lambda d: _correlation_case(d, (4, 1000), masked=False),
    "corr_G32_misaligned": lambda d: _correlation_case(d, (4, 1000), offset=1),
    "corr_G256": lambda d: _correlation_case(d, (2, 5000), kind="ccc"),
    "corr_G256_chunked": lambda d: _correlation_case(d, (2, 70000), masked=False),
}


# ------------------------------------------------------------------------------------------ kernel trace


def short_kernel_name(name: str) -> str:
    """'void fused_losses::cuda::(anonymous namespace)::forward_kernel<float, 4, true, false>(float const*, ...)'
    -> 'forward_kernel<float, 4, true, false>' (namespaces and parameters dropped, '> >' written '>>'). The
    demangler's own spelling stays: enum template arguments '(Pass)2', 'unsigned char', 'c10::BFloat16'
    (scripts/sass_report.py's names, by contrast, read 'ForwardWithGradient', 'uint8', 'bf16'). The same for
    torch.profiler's kernel names (demangled by the CUDA profiler) and for c++filt's demangling of the cubins'
    symbols (test_every_kernel_has_a_case); a mangled name is demangled with c++filt first."""
    if name.startswith("_Z") and shutil.which("c++filt"):
        name = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    name = name.removeprefix("void ").replace("fused_losses::cuda::", "").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(name):
        depth += char == "<"
        depth -= char == ">"
        if char == ">" and depth == 0:
            name = name[: i + 1]
            break
    return name.replace(" >", ">")


SCALAR = r"(?:float|double|c10::Half|c10::BFloat16)"


def _pattern(kernel: str) -> "re.Pattern[str]":
    return re.compile(re.escape(kernel).replace(r"\{T\}", SCALAR).replace(r"\{A\}", SCALAR) + "$")


class KernelTrace:
    """The fused_losses kernels launched inside the block (torch.profiler, CUDA activity), when tracing."""

    def __init__(self, device):
        self.enabled = TRACE and device == "cuda"
        self.names = set()

    def __enter__(self):
        if self.enabled:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.synchronize()
            self._profile.__exit__(*exc)
            events = [e for e in self._profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            self.recorded_any = bool(events)
            # Mangled or demangled, the extension's kernels carry its namespace; PyTorch's own (copies, fills,
            # the random upstream) do not.
            self.names = {short_kernel_name(e.name) for e in events if "fused_losses" in e.name}
        return False

    def assert_launched(self, kernels):
        """Exactly `kernels` (dtype aside): each launched at least once, and no other fused_losses kernel."""
        if not self.enabled:
            return
        if not self.recorded_any:  # CUPTI unavailable (e.g. a gVisor machine): nothing to check against
            pytest.skip("the CUDA profiler recorded no kernel at all: launched kernels not checked")
        patterns = [_pattern(k) for k in kernels]
        missing = [k for k, p in zip(kernels, patterns) if not any(p.match(name) for name in self.names)]
        unexpected = sorted(name for name in self.names if not any(p.match(name) for p in patterns))
        assert not missing and not unexpected, (
            f"not launched: {missing}; launched but not listed: {unexpected}; launched: {sorted(self.names)}")


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_kernel_path(device, case, monkeypatch):
    loss_fn, reference_fn, leaves = CASES[case](device)
    with KernelTrace(device) as trace:
        _check_schedules_and_reference(loss_fn, reference_fn, leaves, leaves[0].dtype, monkeypatch)
    trace.assert_launched(KERNELS[case])


@pytest.mark.parametrize("case", CORRELATION_CASES)
def test_correlation_kernel_path(device, case, monkeypatch):
    """Per sequence ('mean' and 'none'), then per time step ('none': the per-step loss and upstream sums)."""
    loss_fn, reference_fn, leaves, per_timestep = CORRELATION_CASES[case](device)
    with KernelTrace(device) as trace:
        _check_schedules_and_reference(loss_fn, reference_fn, leaves, torch.float32, monkeypatch)
        per_timestep["per_timestep"] = True
        _check_against_reference(loss_fn, reference_fn, leaves, torch.float32, "none")
    trace.assert_launched(KERNELS[case])


def compiled_kernels() -> set[str]:
    """The short names (short_kernel_name) of the kernels in the built extension's sm_90 cubins, read with
    scripts/sass_report.py (cuobjdump -res-usage, c++filt); skips without the tools or without device code."""
    sys.path.insert(0, str(REPOSITORY / "scripts"))
    try:
        import sass_report
    finally:
        sys.path.remove(str(REPOSITORY / "scripts"))
    from fused_losses import _C
    try:
        kernels = sass_report.read_resource_usage(Path(_C.__file__))
        demangled = sass_report.demangle([k.mangled for k in kernels])
    except sass_report.ToolMissing as error:
        pytest.skip(f"cannot read the cubins: {error}")
    except sass_report.NoCubins as error:
        pytest.skip(f"{error}: no CUDA kernels to cover")
    return {short_kernel_name(name) for name in demangled}


def _dtype_family(name: str) -> str:
    """'flat_kernel<(Pass)0, c10::BFloat16, float, true, true>' -> 'flat_kernel<(Pass)0, {S}, {S}, true, true>'."""
    return re.sub(r"\b" + SCALAR + r"(?![\w:])", "{S}", name)


def test_every_kernel_has_a_case():
    """The cases together launch every kernel template instance compiled into the extension, dtype aside (but
    those in UNREACHABLE), and every kernel they name is compiled: a new kernel, template argument or lane
    split fails here until a case launches it, a renamed one until KERNELS follows."""
    compiled = compiled_kernels()
    named = {kernel for kernels in KERNELS.values() for kernel in kernels}
    patterns = {kernel: _pattern(kernel) for kernel in named | set(UNREACHABLE)}
    uncovered = sorted({_dtype_family(name) for name in compiled
                        if not any(p.match(name) for p in patterns.values())})
    assert not uncovered, f"compiled kernels that no case names (add a case, or UNREACHABLE with why): {uncovered}"
    stale = sorted(kernel for kernel, p in patterns.items() if not any(p.match(name) for name in compiled))
    assert not stale, f"named kernels that the extension does not compile: {stale}"
    reached = {name for name in compiled if any(patterns[k].match(name) for k in named)}
    unreachable = {name for name in compiled if any(patterns[k].match(name) for k in UNREACHABLE)}
    assert not reached & unreachable, sorted(reached & unreachable)
    assert set(KERNELS) == set(CASES) | set(CORRELATION_CASES)


def test_short_kernel_name():
    assert short_kernel_name("void fused_losses::cuda::(anonymous namespace)::flat_kernel<(fused_losses::cuda::("
                             "anonymous namespace)::Pass)2, float, bool, true, false>(fused_losses::cuda::(anonymous "
                             "namespace)::PassArgs<float>, bool const*)") == "flat_kernel<(Pass)2, float, bool, true, false>"
    name = short_kernel_name("void fused_losses::cuda::reduce_partials_kernel<float, 2, fused_losses::cuda::"
                             "(anonymous namespace)::CorrelationLossEpilogue<c10::BFloat16> >(float const*, long, "
                             "fused_losses::cuda::(anonymous namespace)::CorrelationLossEpilogue<c10::BFloat16>)")
    assert _pattern("reduce_partials_kernel<{A}, 2, CorrelationLossEpilogue<{T}>>").match(name), name
    assert not _pattern("forward_kernel<{T}, 4, true, true>").match("forward_kernel<float, 32, true, true>")
    assert _dtype_family("flat_kernel<(Pass)0, c10::BFloat16, float, true, true>") == \
        "flat_kernel<(Pass)0, {S}, {S}, true, true>"
