"""The CUDA kernels' logic, without a GPU: csrc/cuda/*.cu compiled for the host with the shim in
tests/cuda_emulation (threads of a block as fibers; barriers, warp shuffles and votes emulated), run on CPU
tensors and compared with the CPU kernels. Two builds: the GPU's work-split limits, and tiny limits
(``_small``) under which these shapes take the grid-stride, multi-chunk and chunk-merge paths. Each case also
checks, within the emulation, that the 2-pass schedule (the forward writes the gradient) gives bitwise the
3-pass gradient, and the in-place backward. What this cannot check (memory model, timing, races between
blocks) is the GPU run's job (scripts/gpu_check.sh)."""

import itertools
import zlib

import pytest
import torch

import fused_losses  # noqa: F401  (the CPU kernels: torch.ops.fused_losses)

from conftest import FLOAT_DTYPES, TOLERANCES
from cuda_emulation import build

CPU_OPS = torch.ops.fused_losses
NAMESPACES = ["fused_losses_emulated", "fused_losses_emulated_small"]


@pytest.fixture(scope="module", params=NAMESPACES)
def emulated(request):
    return build.ops(request.param)


def _seed(shape, dtype):
    return zlib.crc32(repr((shape, dtype)).encode())


def assert_matches(got, expected, dtype, what):
    """Equal NaN positions and close values (the two devices sum in different orders)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    assert torch.equal(got.isnan(), expected.isnan()), f"{what}: NaN at different positions"
    # Accumulator outputs (statistics, total weights) are float32 for the half types: float32 tolerances.
    tolerance = TOLERANCES[dtype if got.dtype == dtype else got.dtype]
    torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tolerance)


def assert_bitwise(got, expected, what):
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num()), what


def at_offset(tensor, offset):
    """The same values at a storage offset of `offset` elements."""
    storage = torch.empty(tensor.numel() + offset, dtype=tensor.dtype)
    view = storage[offset:].view(tensor.shape)
    view.copy_(tensor)
    return view


def misaligned(tensor):
    """The same values at a storage offset of one element: the kernels take their element-wise paths."""
    return at_offset(tensor, 1)


def padded_rows(tensor, padding=8):
    """The same values in rows `padding` elements apart (a slice of a wider tensor)."""
    wide = torch.empty(*tensor.shape[:-1], tensor.shape[-1] + padding, dtype=tensor.dtype)
    wide[..., : tensor.shape[-1]] = tensor
    return wide[..., : tensor.shape[-1]]


LAYOUTS = {"contiguous": lambda t: t, "misaligned": misaligned, "padded_rows": padded_rows}


def layout_for(options, dtype):
    """Each dtype takes one layout per option, in turn, so all of them meet every shape."""
    return list(LAYOUTS)[(options + FLOAT_DTYPES.index(dtype)) % len(LAYOUTS)]


def check_in_place_backward(backward_inplace, unit_gradient, gradient, grad_loss, *args):
    """The in-place backward keeps the forward's gradient for grad_loss 1 and otherwise writes bitwise the
    3-pass `gradient` for grad_loss."""
    in_place = unit_gradient.clone()
    backward_inplace(torch.ones((), dtype=grad_loss.dtype), in_place, *args)
    assert_bitwise(in_place, unit_gradient, "in-place backward, grad_loss 1")
    backward_inplace(grad_loss, in_place, *args)
    assert_bitwise(in_place, gradient, "in-place backward, grad_loss 0.75")


def grad_loss_for(loss, dtype, scale=0.75):
    """A grad_loss other than 1: a tensor of the loss's shape for reduction='none', else a scalar."""
    if loss.dim() == 0:
        return torch.tensor(scale, dtype=dtype)
    return torch.rand(loss.shape, dtype=torch.float32).add(0.25).to(dtype)


# --------------------------------------------------------------------------------------------------- the shim


@pytest.mark.parametrize("lane_mask, source_lane, width", [(1, 0, 32), (16, 31, 32), (2, 3, 4), (4, 5, 4), (8, 1, 8)])
def test_shim_warp_collectives_follow_cuda(emulated, lane_mask, source_lane, width):
    """__shfl_xor_sync / __shfl_sync / __any_sync / __match_any_sync as the CUDA programming guide defines them:
    within segments of `width` lanes; an xor partner in a later segment leaves the lane its own value."""
    out = emulated.selftest_collectives(2, lane_mask, source_lane, width)
    thread = torch.arange(2 * 256)
    lane = thread % 32
    partner = lane ^ lane_mask
    keeps_own = partner >= (lane // width + 1) * width
    expected_xor = torch.where(keeps_own, thread, thread - lane + partner)
    expected_broadcast = thread - lane + (lane // width) * width + source_lane % width
    expected_any = ((thread // 32) == 8 + 2).long()  # only warp 2 of block 1 has a lane voting true
    assert torch.equal(out[:, 0], expected_xor)
    assert torch.equal(out[:, 1], expected_broadcast)
    assert torch.equal(out[:, 2], expected_any)
    warp_lanes = torch.arange(32)
    expected_match = [sum(1 << int(other) for other in warp_lanes if (t - lane[t] + other) % 5 == t % 5)
                      for t in range(len(thread))]
    assert out[:, 3].tolist() == expected_match


def test_shim_shared_memory_is_per_block_between_barriers(emulated):
    out = emulated.selftest_shared_memory(3)
    thread = torch.arange(256)
    expected = torch.cat([block * 1000 + (thread + 1) % 256 for block in range(3)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mistake, message", [
    (0, "threads wait at __syncthreads; 1 threads have returned"),
    (1, "255 threads wait at __syncthreads; 1 threads wait at __syncwarp;"),
    (2, "reaches (__syncwarp|a warp shuffle or vote) while others of its group wait at"),
])
def test_shim_reports_divergent_barriers(emulated, mistake, message):
    """A barrier that not every thread reaches is an error naming it, not a hang."""
    with pytest.raises(RuntimeError, match=message):
        emulated.selftest_divergent(mistake)


def test_fast_divider_is_exact_over_64_bits(emulated):
    """FastDivider (the strided BCE kernel's divisions) against exact integer division, for divisors and
    dividends at the edges of 31, 32 and 63 bits, powers of two and their neighbours."""
    edges = [1, 2, 3, 5, 7, 10, 641, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 15, 3**39, 2**62 - 1,
             2**62 + 1, 2**63 - 25, 2**63 - 1]
    generator = torch.Generator().manual_seed(63)
    divisors = torch.tensor(edges + torch.randint(1, 2**62, (20,), generator=generator).tolist())
    dividends = torch.tensor([0] + edges + [2**63 - 2] + torch.randint(0, 2**62, (40,), generator=generator).tolist())
    quotients = emulated.selftest_fast_divide(divisors, dividends)
    assert quotients.tolist() == [[n // d for n in dividends.tolist()] for d in divisors.tolist()]


# --------------------------------------------------------------------------------------------------- cross-entropy

# Rows of C classes; the row counts pass the small build's grid (3 blocks) more than once for every row split
# (the shared-memory tile of 256 rows for contiguous rows of at most 64 bytes, its last tile partial; else a
# thread per row at C <= 4 vectors, 4 lanes up to 64 vectors, 16 up to 256, a warp up to 512, counted in elements
# where rows are read element by element: in the aligned layouts C = 264 takes 16 lanes in float32 and 4 in
# bfloat16, C = 1000 16 lanes and a warp in float64; misaligned, C = 100 takes 16 lanes and C = 264 a warp; and
# a block per row beyond 512 vectors: C = 4200 in every dtype, aligned, its row staged in shared memory, which in
# the small build holds 64 vectors of it, the rest read again). Odd row counts at 16 lanes leave the last warp
# one row past the end.
CE_SHAPES = [(800, 1), (800, 3), (520, 10), (800, 16), (300, 40), (101, 100), (50, 264), (61, 1000), (9, 4200),
             (64, 5, 7)]
CE_OPTIONS = [
    dict(cost_mode="argmax", reduction="mean", cost=False, weight=False, label_smoothing=0.0, ignore=False),
    dict(cost_mode="argmax", reduction="mean", cost=True, weight=True, label_smoothing=0.0, ignore=True),
    dict(cost_mode="expected", reduction="sum", cost=True, weight=False, label_smoothing=0.0, ignore=False),
    dict(cost_mode="expected", reduction="none", cost=True, weight=True, label_smoothing=0.1, ignore=True),
    dict(cost_mode="argmax", reduction="sum", cost=True, weight=True, label_smoothing=0.2, ignore=True),
    # The extra-term loops without class weights: expected cost with smoothing (a cost row, weights 1), and
    # smoothing alone (neither operand read).
    dict(cost_mode="expected", reduction="mean", cost=True, weight=False, label_smoothing=0.1, ignore=True),
    dict(cost_mode="argmax", reduction="sum", cost=False, weight=False, label_smoothing=0.3, ignore=False),
]
IGNORE_INDEX = -100


def ce_case(shape, dtype, options, layout):
    generator = torch.Generator().manual_seed(_seed(shape, dtype))
    num_classes = shape[1]
    logits = torch.randn(shape, generator=generator).mul(3).to(dtype)
    if len(shape) == 2:
        logits = LAYOUTS[layout](logits)
    target_shape = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, num_classes, target_shape, generator=generator)
    if options["ignore"]:
        target[torch.rand(target_shape, generator=generator) < 0.2] = IGNORE_INDEX
    cost = torch.rand(num_classes, num_classes, generator=generator) * 2 if options["cost"] else None
    weight = torch.rand(num_classes, generator=generator) + 0.5 if options["weight"] else None
    return logits, target, cost, weight


def ce_args(options):
    return IGNORE_INDEX, options["reduction"], options["label_smoothing"], options["cost_mode"]


def check_cross_entropy(ops, logits, target, cost, weight, options):
    dtype = logits.dtype
    ignore_index, reduction, smoothing, mode = ce_args(options)
    forward_args = (cost, weight, ignore_index, reduction, smoothing, mode)
    got = ops.cost_sensitive_cross_entropy(logits, target, *forward_args, False)
    expected = CPU_OPS.cost_sensitive_cross_entropy(logits, target, *forward_args, False)
    for name, g, e in zip(("loss", "row_stats", "total_weight"), got[:3], expected[:3]):
        assert_matches(g, e, dtype, name)
    loss, row_stats, total_weight, _ = got
    grad_loss = grad_loss_for(loss, dtype)
    backward_args = (cost, weight, row_stats, total_weight, ignore_index, reduction, smoothing, mode)
    grad = ops.cost_sensitive_cross_entropy_backward(grad_loss, logits, target, *backward_args)
    assert_matches(grad, CPU_OPS.cost_sensitive_cross_entropy_backward(
        grad_loss, logits, target, cost, weight, *expected[1:3], ignore_index, reduction, smoothing, mode),
        dtype, "gradient")
    if reduction == "none":
        return
    # 2-pass: the forward's gradient is the 3-pass gradient for grad_loss 1, and the in-place backward keeps it
    # for grad_loss 1 and recomputes it for another grad_loss; the loss is the same either way.
    two_pass = ops.cost_sensitive_cross_entropy(logits, target, *forward_args, True)
    assert_bitwise(two_pass[0], loss, "2-pass loss")
    one = torch.ones((), dtype=dtype)
    assert_bitwise(two_pass[3], ops.cost_sensitive_cross_entropy_backward(one, logits, target, *backward_args),
                   "2-pass gradient")
    check_in_place_backward(ops.cost_sensitive_cross_entropy_backward_inplace, two_pass[3], grad, grad_loss, logits,
                            target, *backward_args)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("options", range(len(CE_OPTIONS)))
def test_cross_entropy(emulated, shape, dtype, options):
    layout = layout_for(options, dtype)
    check_cross_entropy(emulated, *ce_case(shape, dtype, CE_OPTIONS[options], layout), CE_OPTIONS[options])


@pytest.mark.parametrize("shape", [(520, 10), (300, 40), (40, 1000), (9, 4200)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
# Argmax mode: where an expected-cost gradient's terms cancel, the two devices' summation orders exceed the float
# tolerances.
@pytest.mark.parametrize("options", [1, 4])
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_cross_entropy_non_finite_logits(emulated, shape, dtype, options, layout):
    """Rows with a NaN, +inf or -inf logits (the fast scan gives up on NaN, +inf and all -inf rows and rescans
    exactly) match the CPU kernel, whose edge cases follow F.cross_entropy; the finite rows beside them are
    unaffected."""
    logits, target, cost, weight = ce_case(shape, dtype, CE_OPTIONS[options], "contiguous")
    last = shape[1] - 1
    logits[0, last // 2] = float("nan")
    logits[1, last] = float("inf")
    logits[2] = float("-inf")
    logits[3, [0, last]] = float("inf")
    logits[4, : shape[1] // 2] = float("-inf")
    logits[5, last] = float("-inf")
    logits[6, 1::3] = float("-inf")  # a masked vocabulary: -inf among finite logits in every lane's packs
    check_cross_entropy(emulated, LAYOUTS[layout](logits), target, cost, weight, CE_OPTIONS[options])


@pytest.mark.parametrize("shape", [(300, 40), (60, 100), (50, 264), (40, 1000), (9, 4200)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cross_entropy_argmax_ties_take_the_first_index(emulated, shape, dtype):
    """A row's max held by several lanes (at C = 264 in bf16 / fp16 twice by lane 0, in packs 16 and 32; at
    C = 4200, a block per row, in two warps, and in bf16 at index 4199 by thread 12, which also holds index 100):
    the argmax cost is that of the first index, as torch.argmax (the lanes' and the warps' merges prefer the
    smaller index on a tie, also where it sits in a higher lane)."""
    logits, target, cost, weight = ce_case(shape, dtype, CE_OPTIONS[1], "contiguous")
    num_classes = shape[1]
    ties = [i for i in (num_classes - 1, 9, 130, 500) if i < num_classes]
    logits[:, ties] = 20.0
    logits[1::2, 9] = 19.0  # odd rows: the first tie is at 130 (a single max at C = 40 and 100)
    check_cross_entropy(emulated, logits, target, cost, weight, CE_OPTIONS[1])


@pytest.mark.parametrize("shape", [(520, 10), (300, 40), (61, 1000), (9, 4200)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_cross_entropy_smoothing_with_a_large_logit_offset(emulated, shape, layout):
    """Float32 logits sharing an offset of 1e6 with label smoothing and class weights: every lane split's
    smoothing sum is taken relative to the target's logit (the tile row, a lane's packs or elements, a block's
    staged row), so the loss is that of the logits without the offset."""
    generator = torch.Generator().manual_seed(shape[1])
    offset = 1e6
    logits = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + offset).float()
    target = torch.randint(0, shape[1], shape[:1], generator=generator)
    weight = torch.rand(shape[1], generator=generator) + 0.5
    exact = torch.nn.functional.cross_entropy(logits.double() - offset, target, weight=weight.double(),
                                              label_smoothing=0.1, reduction="none")
    args = (None, weight, IGNORE_INDEX, "none", 0.1, "argmax", False)
    loss = emulated.cost_sensitive_cross_entropy(LAYOUTS[layout](logits), target, *args)[0]
    torch.testing.assert_close(loss.double(), exact, rtol=2e-5, atol=2e-5)


def test_cross_entropy_invalid_targets_give_nan_rows(emulated):
    """A label outside [0, C) (not the ignore index) makes its row's loss and gradient NaN, never a number."""
    logits, target, cost, weight = ce_case((40, 10), torch.float32, CE_OPTIONS[1], "contiguous")
    target[[3, 17]] = torch.tensor([10, -5])
    args = (cost, weight, IGNORE_INDEX, "none", 0.0, "argmax")
    loss, row_stats, total_weight, _ = emulated.cost_sensitive_cross_entropy(logits, target, *args, False)
    valid = (target >= 0) & (target < 10)
    assert loss[[3, 17]].isnan().all() and not loss[valid].isnan().any()
    grad = emulated.cost_sensitive_cross_entropy_backward(torch.ones(40), logits, target, cost, weight, row_stats,
                                                          total_weight, *args[2:])
    assert grad[[3, 17]].isnan().all() and not grad[valid].isnan().any()


# --------------------------------------------------------------------------------------------------- correlation

# (B, T, D): D = 1 sequences are contiguous in time (packs), D > 1 strided; T from a few packs (one lane per
# sequence) to thousands of steps (a block per sequence; several chunks in the small build).
CORRELATION_SHAPES = [(50, 7, 1), (20, 100, 1), (6, 900, 1), (2, 5000, 1), (9, 64, 3), (3, 1100, 2)]
CORRELATION_OPTIONS = [
    dict(kind="pearson", reduction="mean", per_timestep=False, mask=False, sides=(True, False)),
    dict(kind="concordance", reduction="sum", per_timestep=False, mask=True, sides=(True, True)),
    dict(kind="pearson", reduction="none", per_timestep=False, mask=True, sides=(True, True)),
    dict(kind="concordance", reduction="mean", per_timestep=True, mask=True, sides=(False, True)),
    dict(kind="pearson", reduction="none", per_timestep=True, mask=False, sides=(True, False)),
    # The per-step upstream's sweep computes both gradients and stores the requested one: here the target's.
    dict(kind="concordance", reduction="none", per_timestep=True, mask=True, sides=(False, True)),
]
EPS = 1e-6


def correlation_case(shape, dtype, options, layout):
    generator = torch.Generator().manual_seed(_seed(shape, dtype))
    batch, time, _ = shape
    target = torch.randn(shape, generator=generator)
    prediction = 0.6 * target + 0.8 * torch.randn(shape, generator=generator) + 3.0  # an offset: shifted sums
    prediction, target = prediction.to(dtype), target.to(dtype)
    if layout == "misaligned":
        prediction = misaligned(prediction)
    elif layout == "padded_rows":  # sequences further apart than their length
        prediction = padded_rows(prediction.transpose(1, 2)).transpose(1, 2)
    mask = None
    if options["mask"]:
        lengths = torch.randint(1, time + 1, (batch,), generator=generator)
        lengths[0] = time
        mask = torch.arange(time)[None, :] < lengths[:, None]
        mask &= torch.rand(batch, time, generator=generator) > 0.1  # holes too
    return prediction, target, mask


def moments(stats):
    """The saved (n, shift_x, shift_y, mean_x, mean_y, cxx, cyy, cxy) without the shifts each device picks."""
    n, shift_x, shift_y, mean_x, mean_y, cxx, cyy, cxy = stats.unbind(-1)
    return torch.stack([n, shift_x + mean_x, shift_y + mean_y, cxx, cyy, cxy], dim=-1)


def check_correlation(ops, prediction, target, mask, options):
    dtype = prediction.dtype
    kind, reduction, per_timestep = options["kind"], options["reduction"], options["per_timestep"]
    sides = options["sides"]
    args = (mask, kind, reduction, per_timestep, EPS)
    got = ops.correlation_loss(prediction, target, *args, False, False)
    expected = CPU_OPS.correlation_loss(prediction, target, *args, False, False)
    for name, g, e in zip(("loss", "moments", "total_weight"), (got[0], moments(got[1]), got[2]),
                          (expected[0], moments(expected[1]), expected[2])):
        assert_matches(g, e, dtype, name)
    loss, stats, total_weight = got[:3]
    grad_loss = grad_loss_for(loss, dtype)
    backward_args = (mask, stats, total_weight, kind, reduction, per_timestep, EPS, *sides)
    grads = ops.correlation_loss_backward(grad_loss, prediction, target, *backward_args)
    expected_grads = CPU_OPS.correlation_loss_backward(grad_loss, prediction, target, mask, *expected[1:3], kind,
                                                       reduction, per_timestep, EPS, *sides)
    for side, name in enumerate(("grad_input", "grad_target")):
        if sides[side]:
            assert_matches(grads[side], expected_grads[side], dtype, name)
    if reduction == "none":
        return
    two_pass = ops.correlation_loss(prediction, target, *args, *sides)
    assert_bitwise(two_pass[0], loss, "2-pass loss")
    one = torch.ones((), dtype=dtype)
    unit = ops.correlation_loss_backward(one, prediction, target, *backward_args)
    for side in (0, 1):
        if sides[side]:
            assert_bitwise(two_pass[3 + side], unit[side], f"2-pass gradient {side}")
    in_place = [g.clone() for g in two_pass[3:]]
    ops.correlation_loss_backward_inplace(one, *in_place, prediction, target, *backward_args)
    for side in (0, 1):
        if sides[side]:
            assert_bitwise(in_place[side], two_pass[3 + side], "in-place backward, grad_loss 1")
    ops.correlation_loss_backward_inplace(grad_loss, *in_place, prediction, target, *backward_args)
    for side in (0, 1):
        if sides[side]:
            assert_bitwise(in_place[side], grads[side], "in-place backward, grad_loss 0.75")


@pytest.mark.parametrize("shape", CORRELATION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("options", range(len(CORRELATION_OPTIONS)))
def test_correlation(emulated, shape, dtype, options):
    layout = layout_for(options, dtype)
    opts = CORRELATION_OPTIONS[options]
    check_correlation(emulated, *correlation_case(shape, dtype, opts, layout), opts)


def offset_rows(tensor, offset=1):
    """The same values with every sequence `offset` steps into a row of T + offset steps (dimension 1)."""
    wide = torch.zeros(tensor.shape[0], tensor.shape[1] + offset, *tensor.shape[2:], dtype=tensor.dtype)
    wide[:, offset:] = tensor
    return wide[:, offset:]


@pytest.mark.parametrize("shape", [(20, 100, 1), (6, 900, 1), (5, 61, 1)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("options", [
    CORRELATION_OPTIONS[1], CORRELATION_OPTIONS[3],
    dict(kind="pearson", reduction="none", per_timestep=True, mask=True, sides=(True, True)),
], ids=["sum", "mean_per_step", "none_per_step"])
def test_correlation_mask_lined_up_off_16_bytes(emulated, shape, dtype, options):
    """x, y and the mask start one step into rows of T + 1: they line up with each other, so every sweep peels
    a head and reads packs, the mask's as one word per pack (MaskRow::load)."""
    prediction, target, mask = correlation_case(shape, dtype, options, "contiguous")
    check_correlation(emulated, offset_rows(prediction), offset_rows(target), offset_rows(mask), options)


@pytest.mark.parametrize("transposed", [False, True], ids=["time_contiguous", "transposed"])
def test_correlation_mask_bytes_read_as_valid(emulated, transposed):
    """A bool mask viewed from uint8 bytes (0, 2, 255, 1, 7) gives bitwise the losses of the 0 / 1 mask in the
    same layout (tests/test_correlation.py's case, which the first GPU run compared across layouts: a mask
    that is not time-contiguous sweeps single steps, not packs, and rounds differently)."""
    generator = torch.Generator().manual_seed(_seed((4, 30), "mask bytes"))
    x, y = torch.randn(4, 30, 1, generator=generator), torch.randn(4, 30, 1, generator=generator)
    bytes_ = torch.tensor([0, 2, 255, 1, 7], dtype=torch.uint8).repeat(4, 6)
    raw, valid = bytes_.view(torch.bool), bytes_ != 0
    if transposed:
        raw, valid = bytes_.t().contiguous().view(torch.bool).t(), valid.t().contiguous().t()
    for reduction, per_timestep in (("mean", False), ("none", True)):
        args = (reduction, per_timestep, EPS, False, False)
        got = emulated.correlation_loss(x, y, raw, "pearson", *args)[0]
        assert torch.equal(got, emulated.correlation_loss(x, y, valid, "pearson", *args)[0]), reduction


@pytest.mark.parametrize("shape", [(4, 700, 2), (2, 5000, 1), (3, 900, 1)], ids=str)
@pytest.mark.parametrize("kind", ["pearson", "concordance"])
def test_correlation_float32_far_from_zero(emulated, shape, kind):
    """Data at 1e4 with unit spread (a naive float32 sum of squares loses every digit of the variance): the
    moments sweep's runs of shifted sums and their Chan merges match float64 on the same float32 values, for a
    lane sweeping hundreds of strided steps and for packs."""
    generator = torch.Generator().manual_seed(_seed(shape, "far"))
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = (1e4 + noise).float()
    y = (1e4 + 0.5 + 0.7 * noise + 0.7 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    args = (None, kind, "none", True, EPS)
    got = emulated.correlation_loss(x, y, *args, False, False)
    exact = CPU_OPS.correlation_loss(x.double(), y.double(), *args, False, False)
    torch.testing.assert_close(got[0].double(), exact[0], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(moments(got[1]).double(), moments(exact[1]), rtol=1e-5, atol=1e-4)
    one = torch.ones(shape)
    grads = emulated.correlation_loss_backward(one, x, y, *args[:1], got[1], got[2], *args[1:], True, True)
    exact_grads = CPU_OPS.correlation_loss_backward(one.double(), x.double(), y.double(), *args[:1], exact[1],
                                                    exact[2], *args[1:], True, True)
    for g, e in zip(grads, exact_grads):
        torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-5 * e.abs().max().item())


# --------------------------------------------------------------------------------------------------- weighted BCE

# (N, L): flat packs, strided (a padded row), sparse positive indices; L beyond the small build's 64-label
# sparse chunk, and not a multiple of any pack.
BCE_SHAPES = [(700, 8), (60, 200), (7, 1003)]
BCE_OPTIONS = [
    dict(target="float", reduction="mean", weight=None, pos_weight="labels", focusing=(0.0, 0.0, 0.0)),
    dict(target="bool", reduction="sum", weight="full", pos_weight=None, focusing=(1.0, 4.0, 0.05)),
    dict(target="uint8", reduction="none", weight="labels", pos_weight="labels", focusing=(0.0, 2.0, 0.0)),
    # No weight operand: the flat kernels without weight loads (plain and focusing); with shared_offset the
    # target is misaligned like the logits, so the flat kernel peels a head instead of going strided.
    dict(target="bool", reduction="mean", weight=None, pos_weight=None, focusing=(0.0, 0.0, 0.0), shared_offset=True),
    dict(target="float", reduction="sum", weight=None, pos_weight=None, focusing=(2.0, 2.0, 0.0)),
    dict(target="uint8", reduction="none", weight=None, pos_weight=None, focusing=(0.0, 0.0, 0.0), shared_offset=True),
    dict(target="float", reduction="mean", weight="full", pos_weight="labels", focusing=(0.0, 0.0, 0.0),
         shared_offset=True),
    # Per-row (N, 1) weights and a pos_weight with label stride 2 / per-row pos_weight, weights in padded rows:
    # the flat kernel's broadcast, element and packed operand forms, with and without a peeled head.
    dict(target="uint8", reduction="none", weight="rows", pos_weight="strided_labels", focusing=(0.0, 0.0, 0.0),
         shared_offset=True),
    dict(target="float", reduction="mean", weight="padded_full", pos_weight="rows", focusing=(2.0, 2.0, 0.0)),
    dict(target="bool", reduction="sum", weight="rows", pos_weight=None, focusing=(1.0, 4.0, 0.05), shared_offset=True),
    dict(target="sparse", reduction="mean", weight=None, pos_weight="labels", focusing=(0.0, 0.0, 0.0)),
    dict(target="sparse", reduction="none", weight="full", pos_weight=None, focusing=(1.0, 4.0, 0.05)),
    dict(target="sparse", reduction="sum", weight="labels", pos_weight="labels", focusing=(2.0, 2.0, 0.0)),
    # ASL without weight operands: the flat kernel that steps 4 elements at a time (loads of 8 bytes of bf16
    # logits, 4 of bool targets), with and without a peeled head.
    dict(target="float", reduction="mean", weight=None, pos_weight=None, focusing=(1.0, 4.0, 0.05)),
    dict(target="bool", reduction="sum", weight=None, pos_weight=None, focusing=(0.0, 2.0, 0.1), shared_offset=True),
]


def bce_case(shape, dtype, options, layout):
    generator = torch.Generator().manual_seed(_seed(shape, dtype))
    rows, labels = shape
    logits = LAYOUTS[layout]((torch.randn(shape, generator=generator) * 3).to(dtype))
    positive = torch.rand(shape, generator=generator) < 0.1
    target = positive_indices = None
    if options["target"] == "sparse":
        max_positives = 6
        positive_indices = torch.full((rows, max_positives), -1, dtype=torch.int64)
        for row in range(rows):
            labels_on = positive[row].nonzero().flatten()[:max_positives - 1]
            positive_indices[row, : len(labels_on)] = labels_on
            if len(labels_on):
                positive_indices[row, -1] = labels_on[0]  # a repeated label counts once
    else:
        target = positive.to({"float": dtype, "bool": torch.bool, "uint8": torch.uint8}[options["target"]])
        if options.get("shared_offset"):
            target = LAYOUTS[layout](target)

    def weight_of(kind):
        if kind is None:
            return None
        if kind == "full":
            weight = torch.rand(shape, generator=generator) + 0.5
            return LAYOUTS[layout](weight) if options.get("shared_offset") else weight
        if kind == "padded_full":
            return padded_rows(torch.rand(shape, generator=generator) + 0.5)
        if kind == "rows":
            return torch.rand((rows, 1), generator=generator) + 0.5
        if kind == "strided_labels":
            return (torch.rand((labels, 2), generator=generator) + 0.5)[:, 0]
        return torch.rand((labels,), generator=generator) + 0.5

    return logits, target, positive_indices, weight_of(options["weight"]), weight_of(options["pos_weight"])


def check_bce(ops, logits, target, positive_indices, weight, pos_weight, options):
    dtype = logits.dtype
    args = (target, positive_indices, weight, pos_weight, options["reduction"], *options["focusing"])
    got = ops.weighted_bce_with_logits(logits, *args, False)
    expected = CPU_OPS.weighted_bce_with_logits(logits, *args, False)
    assert_matches(got[0], expected[0], dtype, "loss")
    grad_loss = grad_loss_for(got[0], dtype)
    grad = ops.weighted_bce_with_logits_backward(grad_loss, logits, *args)
    assert_matches(grad, CPU_OPS.weighted_bce_with_logits_backward(grad_loss, logits, *args), dtype, "gradient")
    if options["reduction"] == "none":
        return
    two_pass = ops.weighted_bce_with_logits(logits, *args, True)
    assert_bitwise(two_pass[0], got[0], "2-pass loss")
    one = torch.ones((), dtype=dtype)
    assert_bitwise(two_pass[1], ops.weighted_bce_with_logits_backward(one, logits, *args), "2-pass gradient")
    check_in_place_backward(ops.weighted_bce_with_logits_backward_inplace, two_pass[1], grad, grad_loss, logits,
                            *args)


@pytest.mark.parametrize("shape", BCE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("options", range(len(BCE_OPTIONS)))
def test_weighted_bce(emulated, shape, dtype, options):
    layout = layout_for(options, dtype)
    check_bce(emulated, *bce_case(shape, dtype, BCE_OPTIONS[options], layout), BCE_OPTIONS[options])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_dtype, offsets", [("float", (1, 1)), ("bool", (1, 1)), ("bool", (4, 4))],
                         ids=["float_both_1", "bool_both_1", "bool_4_and_4"])
@pytest.mark.parametrize("pos_weight", [False, True], ids=["plain", "pos_weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_bce_misaligned_bases_keep_both_schedules_equal(emulated, dtype, target_dtype, offsets,
                                                                 pos_weight, reduction):
    """Logits and target at storage offsets (the flat kernel peels a head up to their common 16-byte alignment):
    the reduced forward without an output and the one that writes the gradient must split the elements alike,
    so that the 2-pass loss is bitwise the 3-pass one (check_bce). fp32 logits at offset 4 with bool targets at
    offset 4 peel 12 elements and still store packs; offset 1 stores element by element."""
    generator = torch.Generator().manual_seed(_seed((7, 1003), dtype))
    logits = (torch.randn(7, 1003, generator=generator) * 3).to(dtype)
    target = torch.rand(7, 1003, generator=generator)
    target = target.to(dtype) if target_dtype == "float" else target < 0.3
    weight = torch.rand(1003, generator=generator) + 0.5 if pos_weight else None
    check_bce(emulated, at_offset(logits, offsets[0]), at_offset(target, offsets[1]), None, None, weight,
              dict(reduction=reduction, focusing=(0.0, 0.0, 0.0)))


@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (2.0, 2.0, 0.0)], ids=["plain", "focal"])
@pytest.mark.parametrize("pos_weight", [False, True], ids=["unweighted", "pos_weight"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_weighted_bce_dense_non_finite_logits(emulated, focusing, pos_weight, layout):
    """+-inf and NaN logits against targets 0, 1 and 0.3: the losses and gradients of the CPU kernel (the general
    formula's inf, and NaN where a term whose weight is 0 is infinite), with and without pos_weight (the kernels
    without one sum the plain loss in another form), through the flat and the strided kernels."""
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    target = torch.full((4, 16), 0.3)
    target[:, 0::3], target[:, 1::3] = 0.0, 1.0
    logits[:, 0:3], logits[:, 3:6], logits[0, 6] = float("inf"), float("-inf"), float("nan")
    if layout == "transposed":
        logits = logits.t().contiguous().t()
    for reduction in ("none", "sum"):
        args = (target, None, None, torch.ones(16) if pos_weight else None, reduction, *focusing)
        got = emulated.weighted_bce_with_logits(logits, *args, False)[0]
        torch.testing.assert_close(got, CPU_OPS.weighted_bce_with_logits(logits, *args, False)[0], equal_nan=True)
        grad_loss = grad_loss_for(got, torch.float32)
        torch.testing.assert_close(emulated.weighted_bce_with_logits_backward(grad_loss, logits, *args),
                                   CPU_OPS.weighted_bce_with_logits_backward(grad_loss, logits, *args), equal_nan=True)


@pytest.mark.parametrize("target", ["dense", "sparse"])
def test_weighted_bce_subnormal_clip_is_zero(emulated, target):
    """A clip below float32's normal range is 0 (bce_math.h): where 1 - p is 0 (z > 88) the GPU's log, which flushes
    a subnormal operand, would otherwise take the log of (1 - p) + clip = clip as -inf (an infinite loss)."""
    logits = torch.tensor([[-3.0, 0.5, 95.0, 120.0], [100.0, -1.0, 2.0, 89.0]])
    dense = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    indices = torch.tensor([[1, -1], [2, -1]])
    forms = (dense, None) if target == "dense" else (None, indices)
    for reduction in ("none", "sum"):
        losses = [emulated.weighted_bce_with_logits(logits, *forms, None, None, reduction, 1.0, 4.0, clip, False)[0]
                  for clip in (1e-40, 0.0)]
        assert torch.isfinite(losses[0]).all() and torch.equal(losses[0], losses[1])


def sparse_index_case(case, dtype, layout):
    """Index lists that stress the sparse kernel's patch step (a sweep of negatives, then the listed positives
    patched once each), with (L,) pos_weight, per-element weight and focusing where the case says."""
    generator = torch.Generator().manual_seed(_seed(case, dtype))
    rows, labels, max_positives = {"duplicates": (40, 200, 12), "padding": (40, 130, 9), "no_positives": (30, 90, 0),
                                   "several_batches": (12, 300, 100), "all_positive": (9, 70, 75),
                                   "large_logits": (40, 200, 12)}[case]
    scale = 60.0 if case == "large_logits" else 3.0
    logits = LAYOUTS[layout]((torch.randn(rows, labels, generator=generator) * scale).to(dtype))
    indices = torch.randint(0, labels, (rows, max_positives), generator=generator)
    if case in ("duplicates", "large_logits"):
        indices[:, 1::3] = indices[:, 0:1]  # one label repeated at several positions of the row
        indices[::2, -1] = indices[::2, -2]
    elif case == "padding":
        indices[torch.rand(rows, max_positives, generator=generator) < 0.4] = -1  # anywhere in the list
        indices[0] = -1
        logits = logits.t().contiguous().t()  # and labels strided: the element-wise sweep and gathers
    elif case == "several_batches":  # beyond one batch of 32 positions and the small build's 64-label chunk
        indices[:, 40:80] = indices[:, :40]  # duplicates in later batches of the list
        indices[:, 90:] = -1
    elif case == "all_positive":  # every label listed, in a random order, with a few listed twice
        indices = torch.stack([torch.randperm(labels, generator=generator) for _ in range(rows)])
        indices = torch.cat([indices, indices[:, :max_positives - labels]], dim=1)
    weight = torch.rand(rows, labels, generator=generator) + 0.5 if case != "padding" else None
    pos_weight = torch.rand(labels, generator=generator) + 0.5
    return logits, indices, weight, pos_weight


SPARSE_CASES = ["duplicates", "padding", "no_positives", "several_batches", "all_positive", "large_logits"]


@pytest.mark.parametrize("case", SPARSE_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction, focusing", [("mean", (0.0, 0.0, 0.0)), ("sum", (1.0, 4.0, 0.05)),
                                                 ("none", (2.0, 2.0, 0.0))])
def test_sparse_bce_index_lists(emulated, case, dtype, reduction, focusing):
    """Rows are sets: repeated labels count once, -1 is ignored anywhere, K = 0 is all negatives, lists longer
    than a batch of positions and rows with every label positive; also |logits| up to ~250, where a positive's
    loss_pos - loss_neg correction of the sum cancels (docs/design.md, "Sparse targets")."""
    options = dict(reduction=reduction, focusing=focusing)
    layout = layout_for(SPARSE_CASES.index(case), dtype)
    logits, indices, weight, pos_weight = sparse_index_case(case, dtype, layout)
    check_bce(emulated, logits, None, indices, weight, pos_weight, options)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weight, focusing", [(None, (0.0, 0.0, 0.0)), ("full", (0.0, 0.0, 0.0)),
                                              ("full", (2.0, 2.0, 0.0)), ("full", (1.0, 4.0, 0.05))],
                         ids=["plain", "plain_weighted", "focal_weighted", "asl_weighted"])
def test_sparse_bce_long_aligned_rows(emulated, dtype, reduction, weight, focusing):
    """Aligned rows of 1000 labels (4096-label chunks in the normal build: several packs per lane, an odd count
    for some lanes): the plain unweighted sweep's 2-pack steps and the pack after them; weights stepped along the
    row with the logits; with 'none', a per-element grad_output (the weighted backward's null tests per pack,
    with and without a weight)."""
    generator = torch.Generator().manual_seed(_seed((9, 1000), dtype))
    logits = (torch.randn(9, 1000, generator=generator) * 3).to(dtype)
    indices = torch.randint(-1, 1000, (9, 5), generator=generator)
    weights = torch.rand(9, 1000, generator=generator) + 0.5 if weight else None
    pos_weight = torch.rand(1000, generator=generator) + 0.5
    check_bce(emulated, logits, None, indices, weights, pos_weight, dict(reduction=reduction, focusing=focusing))
    if reduction == "none":  # a per-element grad_output without a weight
        check_bce(emulated, logits, None, indices, None, pos_weight, dict(reduction=reduction, focusing=focusing))


@pytest.mark.parametrize("row, label, value, sum_differs", [
    (1, 5, float("-inf"), True), (2, 4, float("-inf"), False), (1, 5, float("inf"), False),
    (2, 4, float("inf"), False), (3, 0, float("nan"), False)])
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (2.0, 2.0, 0.0), (0.0, 3.0, 0.0), (1.0, 4.0, 0.05)],
                         ids=["plain", "focal", "focal_negative_only", "asl"])
def test_sparse_bce_non_finite_logits(emulated, row, label, value, sum_differs, focusing):
    """Infinite and NaN logits at a positive (row 1 label 5, row 3 label 0) or a negative: per-element losses and
    gradients as the CPU kernel's, for each focusing (the sweep's negative-only formulas keep the general
    formula's NaN at -inf: the loss's always, the gradient's when gamma_pos != 0); so is the sum, but for a
    positive at -inf, whose sweep term (a negative's formula at -inf is NaN on both devices) makes the sum NaN
    where the CPU's is inf (docs/design.md, "Sparse targets")."""
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    logits[row, label] = value
    indices = torch.tensor([[3, -1], [5, 6], [-1, -1], [0, 0]])
    for reduction in ("none", "sum"):
        args = (None, indices, None, None, reduction, *focusing)
        got = emulated.weighted_bce_with_logits(logits, *args, False)[0]
        expected = CPU_OPS.weighted_bce_with_logits(logits, *args, False)[0]
        if reduction == "sum" and sum_differs:
            assert got.isnan() and expected.isinf()
        else:
            torch.testing.assert_close(got, expected, equal_nan=True)
        grad_loss = grad_loss_for(got, torch.float32)
        torch.testing.assert_close(emulated.weighted_bce_with_logits_backward(grad_loss, logits, *args),
                                   CPU_OPS.weighted_bce_with_logits_backward(grad_loss, logits, *args), equal_nan=True)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_sparse_bce_invalid_index_gives_nan_row(emulated, reduction):
    """An index outside [-1, L) makes its row NaN on CUDA (the CPU raises): never a silent number. Here in the
    first position, after a duplicate, and in the second batch of 32 positions."""
    logits, indices, weight, pos_weight = sparse_index_case("several_batches", torch.float32, "contiguous")
    rows, labels = logits.shape
    invalid_rows = torch.tensor([0, 5, 11])
    indices[0, 0] = labels
    indices[5, 41] = -2
    indices[11, 70] = labels + 7
    args = (None, indices, weight, pos_weight, reduction, 0.0, 0.0, 0.0)
    valid = torch.ones(rows, dtype=torch.bool)
    valid[invalid_rows] = False
    loss, _ = emulated.weighted_bce_with_logits(logits, *args, False)
    if reduction == "none":
        assert loss[invalid_rows].isnan().all() and not loss[valid].isnan().any()
    else:
        assert loss.isnan()
        _, gradient = emulated.weighted_bce_with_logits(logits, *args, True)
        assert gradient[invalid_rows].isnan().all() and not gradient[valid].isnan().any()
    grad_loss = grad_loss_for(loss, torch.float32)
    grad = emulated.weighted_bce_with_logits_backward(grad_loss, logits, *args)
    assert grad[invalid_rows].isnan().all() and not grad[valid].isnan().any()


# Weights of 3-dimensional inputs: per (sample, position) weights that merge with the logits to one row stride
# (flat kernel), and one broadcast along the first dimension too (no single row stride: the strided kernel,
# whose chunks find their rows through the divisions of StridedBceLayout).
BCE_WEIGHT_LAYOUTS = {
    "per_row_3d": dict(weight=(4, 5, 1), pos_weight=(12,)),
    "middle_broadcast_3d": dict(weight=(1, 5, 1), pos_weight=(5, 1)),
    "per_row_label_broadcast": dict(weight=(4, 5, 1), pos_weight=(1, 1, 12)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(BCE_WEIGHT_LAYOUTS))
def test_weighted_bce_weight_layouts(emulated, dtype, reduction, case):
    generator = torch.Generator().manual_seed(_seed(case, dtype))
    logits = (torch.randn((4, 5, 12), generator=generator) * 3).to(dtype)
    target = torch.rand((4, 5, 12), generator=generator) < 0.3
    weight, pos_weight = (torch.rand(shape, generator=generator) + 0.5 for shape in BCE_WEIGHT_LAYOUTS[case].values())
    options = dict(reduction=reduction, focusing=(0.0, 0.0, 0.0))
    check_bce(emulated, logits, target, None, weight, pos_weight, options)


# Permuted (non-mergeable) layouts, (shape, storage order): the strided kernel's divisions through 2 to 5
# dimensions, rows of 9-29 elements (whole chunks of 8 or 4 and short ones; 960 chunks, more than the small build's
# threads, for three dimensions) and of 3 (every chunk short); 9 dimensions are more than a layout keeps
# (kMaxLayoutDims): every operand is made contiguous first (the flat kernel). Without and with a weight broadcast
# along the middle dimensions, for each focusing.
PERMUTED_LAYOUTS = {"two_dims": ((9, 17), (1, 0)), "three_dims": ((8, 30, 29), (1, 2, 0)),
                    "short_rows": ((50, 7, 3), (1, 2, 0)), "four_dims": ((3, 4, 5, 9), (3, 1, 0, 2)),
                    "five_dims": ((3, 2, 4, 5, 7), (4, 2, 0, 3, 1)),
                    "nine_dims": ((2,) * 9, (8, 6, 4, 2, 0, 7, 5, 3, 1))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("focusing", [(0.0, 0.0, 0.0), (1.0, 2.0, 0.0), (1.0, 4.0, 0.05)],
                         ids=["plain", "focal", "asl"])
@pytest.mark.parametrize("case", list(PERMUTED_LAYOUTS))
def test_weighted_bce_permuted_layouts(emulated, dtype, weighted, focusing, case):
    shape, order = PERMUTED_LAYOUTS[case]
    generator = torch.Generator().manual_seed(_seed(case, dtype))
    # Storage in `order`, viewed in `shape`; the target transposed: no two neighbouring dimensions merge.
    inverse = [order.index(d) for d in range(len(order))]
    logits = (torch.randn([shape[d] for d in order], generator=generator) * 3).to(dtype).permute(inverse)
    target = (torch.rand(shape, generator=generator) < 0.3).transpose(0, -1).contiguous().transpose(0, -1)
    assert logits.shape == shape and not logits.is_contiguous()
    weight = (torch.rand((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],), generator=generator) + 0.5
              if weighted else None)
    for reduction in ("mean", "none"):
        check_bce(emulated, logits, target, None, weight, None, dict(reduction=reduction, focusing=focusing))


# The float32 formulas of the CUDA kernels with __expf, __logf and __fdividef each off by its documented worst
# error in either direction (fast_math_accuracy.cpp), against the float64 CPU kernel, for hard targets (a soft
# target mixes the two values linearly). The bound, in float32 ulps (2^-23 relative), as docs/design.md ("Fast
# float32 math") states it: 16 + 4 gamma + 1.2 (1 + (1 + gamma) |z|) (the __expf error grows with its argument:
# -|z|, and gamma times a log-probability, at most about -|z|), plus, for the ASL negative term,
# (1 + gamma) kappa (8 + 1.2 |z|) with kappa = p / (p - clip): the clip's subtraction amplifies the rounding
# of p, as it does in float32 with exact functions (thousands of ulps where p is just above the clip).
FAST_MATH_CONFIGS = [(0.0, 0.0, 0.0), (2.0, 2.0, 0.0), (1.0, 4.0, 0.05), (0.5, 0.25, 0.2)]


def fast_math_bound(z, label, focusing):
    gamma_pos, gamma_neg, clip = focusing
    gamma = max(gamma_pos, gamma_neg)
    magnitude = z.abs()
    ulps = 16 + 4 * gamma + 1.2 * (1 + (1 + gamma) * magnitude)
    if clip and label == 0:
        p = torch.sigmoid(z)
        shifted = p - clip
        kappa = torch.where(shifted > 0, p / shifted, torch.zeros_like(p))
        ulps = ulps + (1 + gamma) * kappa * (8 + 1.2 * magnitude)
    return ulps * 2.0**-23


@pytest.mark.parametrize("focusing", FAST_MATH_CONFIGS, ids=str)
def test_fast_float_math_accuracy(emulated, focusing):
    dense = torch.linspace(-40, 40, 160001)
    tiny = torch.logspace(-8, 0, 2001)
    z = torch.cat([dense, tiny, -tiny, torch.tensor([0.0, 60.0, -60.0, 87.0, -87.0])]).float()
    exact_args = (None, None, None, "none", *focusing)
    for label in (0.0, 1.0):
        y = torch.full_like(z, label)
        exact_loss = CPU_OPS.weighted_bce_with_logits(z.double(), y.double(), *exact_args, False)[0]
        exact_grad = CPU_OPS.weighted_bce_with_logits_backward(torch.ones_like(z, dtype=torch.float64), z.double(),
                                                               y.double(), *exact_args)
        bound = fast_math_bound(z.double(), label, focusing)
        for directions, unit_pos_weight in itertools.product(
                [(0, 0, 0)] + [(e, l, d) for e in (-1, 1) for l in (-1, 1) for d in (-1, 1)], (False, True)):
            loss, grad = emulated.fast_bce_math_worst_case(z, y, *focusing, *directions, unit_pos_weight)
            for name, got, exact in (("loss", loss, exact_loss), ("grad", grad, exact_grad)):
                representable = exact.abs() > 1e-30  # below, float32 underflows (and rounds to 0 on both)
                excess = ((got.double() - exact).abs() / exact.abs() - bound)[representable]
                assert excess.max() <= 0, (name, label, directions, z[representable][excess.argmax()].item())
