"""Every CUDA kernel and launch path at least once, at small sizes: the curated set that scripts/gpu_check.sh
runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck), where the whole test suite would take
far too long. Each case is one layout / lane split of one op, run through every schedule (csrc/common.h): the
2-pass forward that writes the gradient with its in-place backward (grad_output 1, then 2.5), the 3-pass
forward and backward, and reduction='none' with a random upstream gradient; values and gradients are compared
with the float64 reference (fused_losses.reference) on the CPU.

KERNELS says which kernels of csrc/cuda/*.cu each case must launch (the scalar type left out: {T} the input's,
{A} the accumulator's). On CUDA with FUSED_LOSSES_KERNEL_TRACE=1 (the GPU check's test stage, not under the
sanitizer: both need CUPTI) a case records the kernels it launched with torch.profiler and fails if one is
missing, and test_every_kernel_has_a_case checks that the cases together name every kernel the sources can
launch. On the CPU the same cases test the CPU kernels.

Not launched here: combine_chunks_kernel<SequenceWeightTask> (compiled, but the mask pre-pass runs only for
one-chunk plans) and more than one grid-stride iteration of the cross-entropy and correlation kernels (over
2^17 rows; test_weighted_bce.py::test_cuda_grid_stride_loops and the emulation's small-limit build cover the
loops)."""

import os
import re
import shutil
import subprocess

import pytest
import torch

import fused_losses
from conftest import TOLERANCES, assert_gradient_schedules_agree
from fused_losses import reference

TRACE = os.environ.get("FUSED_LOSSES_KERNEL_TRACE") == "1"

CE_PASSES = ["forward_kernel<{T}, {G}, true>", "forward_kernel<{T}, {G}, false>", "backward_kernel<{T}, {G}>",
             "target_weight_kernel<{G}, {A}>", "reduce_partials_kernel<{A}, 1, StoreTotalEpilogue<{A}>>",
             "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"]
CORRELATION_ONE_CHUNK = ["reduce_items_kernel<{G}, MomentsTask<{T}>>", "reduce_items_kernel<{G}, SequenceWeightTask<{T}>>",
                         "map_items_kernel<{G}, GradientTask<{T}>>", "map_items_kernel<{G}, PerStepLossTask<{T}>>",
                         "reduce_items_kernel<{G}, UpstreamSumsTask<{T}>>",
                         "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"]
CORRELATION_CHUNKED = ["reduce_items_kernel<{G}, MomentsTask<{T}>>", "combine_chunks_kernel<MomentsTask<{T}>>",
                       "map_items_kernel<{G}, GradientTask<{T}>>", "map_items_kernel<{G}, PerStepLossTask<{T}>>",
                       "reduce_items_kernel<{G}, UpstreamSumsTask<{T}>>", "combine_chunks_kernel<UpstreamSumsTask<{T}>>",
                       "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>"]
# Pass: 0 Forward ('none', or a reduced loss without the gradient), 1 Backward, 2 ForwardWithGradient.
BCE_DENSE = ["{K}<(Pass)0, {T}, {Y}>", "{K}<(Pass)1, {T}, {Y}>", "{K}<(Pass)2, {T}, {Y}>",
             "reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]
BCE_SPARSE = ["sparse_rows_kernel<(Pass)0, {T}>", "sparse_rows_kernel<(Pass)1, {T}>", "sparse_rows_kernel<(Pass)2, {T}>",
              "reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]


def _kernels(patterns, **names):
    return [p.replace("{G}", str(names.get("G", ""))).replace("{K}", names.get("K", "")).replace(
        "{Y}", names.get("Y", "")) for p in patterns]


# case id -> kernels it must launch, with why the host code picks that path (csrc/cuda/*.cu).
KERNELS = {
    # Cross-entropy: G lanes per row (lanes_per_row): 1 for strided rows or <= 4 loads, 4 up to 64 loads, a warp
    # beyond; a load is a 16-byte vector when every row is aligned and C is a multiple of the vector.
    "ce_G1_strided": _kernels(CE_PASSES, G=1),  # (N, C, H, W): class stride H * W
    "ce_G1_vector": _kernels(CE_PASSES, G=1),   # fp32 C = 8: two vectors per row
    "ce_G4_scalar": _kernels(CE_PASSES, G=4),   # fp32 C = 10: not a multiple of 4
    "ce_G4_vector": _kernels(CE_PASSES, G=4),   # bf16 C = 64: 8 vectors
    "ce_G32_vector": _kernels(CE_PASSES, G=32),  # fp32 C = 1000: 250 vectors
    "ce_G32_scalar": _kernels(CE_PASSES, G=32),  # fp16 C = 1001
    # Correlation: items (sequence, chunk) of G lanes (make_chunk_plan): 1 for strided time or <= 4 loads, 4 up to
    # 64, a warp up to 512, the block beyond; long sequences of few items are cut into chunks.
    "corr_G1_strided": _kernels(CORRELATION_ONE_CHUNK, G=1),  # (B, T, D = 2): time stride 2
    "corr_G1_strided_chunked": _kernels(CORRELATION_CHUNKED, G=1),  # T = 1500 >= 2 chunks of 512
    "corr_G4": _kernels(CORRELATION_ONE_CHUNK, G=4),     # fp32 T = 100: 25 vectors
    "corr_G32": _kernels(CORRELATION_ONE_CHUNK, G=32),   # fp32 T = 1000: 250 vectors
    # Rows one element past 16 bytes: the moments sweep peels a head and stays vectorised (x and y line up); the
    # passes that also touch an aligned output or upstream fall back to single steps, so 1000 loads: the block.
    "corr_G32_misaligned": ["reduce_items_kernel<32, MomentsTask<{T}>>", "reduce_items_kernel<32, SequenceWeightTask<{T}>>",
                            "map_items_kernel<256, GradientTask<{T}>>", "map_items_kernel<256, PerStepLossTask<{T}>>",
                            "reduce_items_kernel<256, UpstreamSumsTask<{T}>>"],
    "corr_G256": _kernels(CORRELATION_ONE_CHUNK, G=256),  # T = 5000: 1250 vectors, one chunk
    "corr_G256_chunked": _kernels(CORRELATION_CHUNKED, G=256),  # T = 70000 >= 2 chunks of 32768
    # Weighted BCE: flat (contiguous, aligned dense operands; pos_weight periodic along the labels), strided
    # (any other layout) or sparse rows (positive indices; vectors when rows are aligned, 4096-label chunks).
    "bce_flat_float": _kernels(BCE_DENSE, K="flat_kernel", Y="{T}"),  # odd numel: the tail loop too
    "bce_flat_bool": _kernels(BCE_DENSE, K="flat_kernel", Y="bool"),
    "bce_flat_uint8": _kernels(BCE_DENSE, K="flat_kernel", Y="unsigned char"),
    "bce_strided_float": _kernels(BCE_DENSE, K="strided_kernel", Y="{T}"),  # transposed logits
    "bce_strided_bool": _kernels(BCE_DENSE, K="strided_kernel", Y="bool"),  # broadcast (stride-0) target
    "bce_strided_uint8": _kernels(BCE_DENSE, K="strided_kernel", Y="unsigned char"),
    "bce_sparse_vector": _kernels(BCE_SPARSE),  # L = 128
    "bce_sparse_scalar": _kernels(BCE_SPARSE),  # bf16 L = 101
    "bce_sparse_chunked": _kernels(BCE_SPARSE),  # L = 5000: two bitmap chunks per row
    "bce_sparse_grid_stride": _kernels(BCE_SPARSE),  # 140000 rows > 16384 blocks x 8 warps: bitmaps reused
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


def _cross_entropy_case(device, shape, dtype, cost_mode=None, options=True):
    n, c = shape[0], shape[1]
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    target = torch.randint(0, c, (n, *shape[2:]), generator=gen)
    target.view(-1)[::7] = -100  # ignored rows
    target = target.to(device)
    kwargs = {}
    if cost_mode is not None:
        cost = torch.rand(c, c, generator=gen) + 0.5
        cost.fill_diagonal_(1.0)  # argmax mode needs a diagonal of 1
        kwargs.update(cost_matrix=cost.to(device), cost_mode=cost_mode)
    if options:
        kwargs.update(weight=(torch.rand(c, generator=gen) + 0.5).to(device), label_smoothing=0.1)

    def as64(value):  # the reference's float64 copy of a tensor argument
        return value.cpu().double() if torch.is_tensor(value) else value

    def loss_fn(z, reduction):
        return fused_losses.cost_sensitive_cross_entropy(z, target, reduction=reduction, **kwargs)

    def reference_fn(z, reduction):
        return reference.cost_sensitive_cross_entropy(
            z, target.cpu(), reduction=reduction, **{k: as64(v) for k, v in kwargs.items()})

    return loss_fn, reference_fn, [x]


def _correlation_case(device, shape, kind="pearson", offset=0):
    """(B, T) or (B, T, D) float32 sequences, masked; `offset` starts every row `offset` elements into a wider
    row (so rows are not 16-byte aligned)."""
    gen = torch.Generator().manual_seed(shape[1])
    wide = list(shape)
    wide[1] += offset
    x = torch.randn(wide, generator=gen)[:, offset:]
    y = 0.6 * x + 0.8 * torch.randn(shape, generator=gen)
    y_wide = torch.empty(wide)
    y_wide[:, offset:] = y
    y = y_wide[:, offset:]
    mask = torch.rand(shape[:2], generator=gen) > 0.2
    mask[:, :2] = True
    x, y, mask = x.to(device), y.to(device), mask.to(device)
    fused = {"pearson": fused_losses.pearson_correlation_loss, "ccc": fused_losses.concordance_correlation_loss}[kind]
    ref = {"pearson": reference.pearson_correlation_loss, "ccc": reference.concordance_correlation_loss}[kind]
    per_timestep = {}

    def loss_fn(a, b, reduction):
        return fused(a, b, mask, reduction=reduction, **per_timestep)

    def reference_fn(a, b, reduction):
        return ref(a, b, mask.cpu(), reduction=reduction, **per_timestep)

    return loss_fn, reference_fn, [x, y], per_timestep


def _bce_case(device, shape, dtype, form, layout="contiguous", max_positives=6):
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
    pos_weight = (torch.rand(labels, generator=gen) + 0.5).to(device)
    kwargs = dict(pos_weight=pos_weight, gamma_neg=2.0, clip=0.05)
    if form == "sparse":
        kwargs["positive_indices"] = indices.to(device)
    else:
        target = {"float": dense.to(dtype), "bool": dense.bool(), "uint8": dense.to(torch.uint8)}[form]
        if layout == "broadcast":  # one target row for every sample: a stride-0 view
            target = target[:1].expand(rows, labels)
            dense = dense[:1].expand(rows, labels)
        kwargs["target"] = target.to(device)

    def loss_fn(z, reduction):
        return fused_losses.weighted_bce_with_logits(z, reduction=reduction, **kwargs)

    def reference_fn(z, reduction):
        return reference.weighted_bce_with_logits(z, dense.double(), pos_weight=pos_weight.cpu().double(),
                                                  reduction=reduction, gamma_neg=2.0, clip=0.05)

    return loss_fn, reference_fn, [x]


CASES = {
    "ce_G1_strided": lambda d: _cross_entropy_case(d, (6, 5, 3, 4), torch.float32, "expected"),
    "ce_G1_vector": lambda d: _cross_entropy_case(d, (50, 8), torch.float32, "argmax"),
    "ce_G4_scalar": lambda d: _cross_entropy_case(d, (70, 10), torch.float32, "expected"),
    "ce_G4_vector": lambda d: _cross_entropy_case(d, (70, 64), torch.bfloat16, "expected", options=False),
    "ce_G32_vector": lambda d: _cross_entropy_case(d, (40, 1000), torch.float32, "argmax"),
    "ce_G32_scalar": lambda d: _cross_entropy_case(d, (40, 1001), torch.float16, None),
    "bce_flat_float": lambda d: _bce_case(d, (63, 101), torch.float32, "float"),
    "bce_flat_bool": lambda d: _bce_case(d, (64, 100), torch.bfloat16, "bool"),
    "bce_flat_uint8": lambda d: _bce_case(d, (65, 33), torch.float32, "uint8"),
    "bce_strided_float": lambda d: _bce_case(d, (40, 30), torch.float32, "float", layout="transposed"),
    "bce_strided_bool": lambda d: _bce_case(d, (40, 30), torch.float32, "bool", layout="broadcast"),
    "bce_strided_uint8": lambda d: _bce_case(d, (40, 30), torch.bfloat16, "uint8", layout="transposed"),
    "bce_sparse_vector": lambda d: _bce_case(d, (40, 128), torch.float32, "sparse"),
    "bce_sparse_scalar": lambda d: _bce_case(d, (40, 101), torch.bfloat16, "sparse"),
    "bce_sparse_chunked": lambda d: _bce_case(d, (8, 5000), torch.float32, "sparse", max_positives=40),
    "bce_sparse_grid_stride": lambda d: _bce_case(d, (140_000, 8), torch.float32, "sparse", max_positives=2),
}
CORRELATION_CASES = {
    "corr_G1_strided": lambda d: _correlation_case(d, (3, 50, 2)),
    "corr_G1_strided_chunked": lambda d: _correlation_case(d, (2, 1500, 2), kind="ccc"),
    "corr_G4": lambda d: _correlation_case(d, (6, 100)),
    "corr_G32": lambda d: _correlation_case(d, (4, 1000)),
    "corr_G32_misaligned": lambda d: _correlation_case(d, (4, 1000), offset=1),
    "corr_G256": lambda d: _correlation_case(d, (2, 5000), kind="ccc"),
    "corr_G256_chunked": lambda d: _correlation_case(d, (2, 70000)),
}


# ------------------------------------------------------------------------------------------ kernel trace


def short_kernel_name(name: str) -> str:
    """'void fused_losses::cuda::(anonymous namespace)::forward_kernel<float, 4, true>(float const*, ...)' ->
    'forward_kernel<float, 4, true>' (namespaces and parameters dropped, '> >' written '>>')."""
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


def _pattern(kernel: str) -> "re.Pattern[str]":
    scalar = r"(?:float|double|c10::Half|c10::BFloat16)"
    return re.compile(re.escape(kernel).replace(r"\{T\}", scalar).replace(r"\{A\}", scalar) + "$")


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
            self.names = {short_kernel_name(e.name) for e in events if "fused_losses" in e.name or "kernel<" in e.name}
        return False

    def assert_launched(self, kernels):
        if not self.enabled:
            return
        if not self.recorded_any:  # CUPTI unavailable (e.g. a gVisor machine): nothing to check against
            pytest.skip("the CUDA profiler recorded no kernel at all: launched kernels not checked")
        missing = [k for k in kernels if not any(_pattern(k).match(name) for name in self.names)]
        assert not missing, f"not launched: {missing}; launched: {sorted(self.names)}"


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


def test_every_kernel_has_a_case():
    """The cases together launch every kernel template instance the CUDA sources can launch, dtype aside (the
    list below is read off csrc/cuda/*.cu: a new kernel or lane split needs a case here and a line below)."""
    groups = [(1, 4, 32), (1, 4, 32, 256)]
    launchable = [f"forward_kernel<{{T}}, {g}, {w}>" for g in groups[0] for w in ("true", "false")]
    launchable += [f"target_weight_kernel<{g}, {{A}}>" for g in groups[0]]
    launchable += [f"backward_kernel<{{T}}, {g}>" for g in groups[0]]
    launchable += [f"{kernel}<{g}, {task}<{{T}}>>" for g in groups[1]
                   for kernel, task in (("reduce_items_kernel", "MomentsTask"),
                                        ("reduce_items_kernel", "SequenceWeightTask"),
                                        ("reduce_items_kernel", "UpstreamSumsTask"),
                                        ("map_items_kernel", "GradientTask"), ("map_items_kernel", "PerStepLossTask"))]
    launchable += ["combine_chunks_kernel<MomentsTask<{T}>>", "combine_chunks_kernel<UpstreamSumsTask<{T}>>"]
    launchable += [f"{kernel}<(Pass){p}, {{T}}, {y}>" for kernel in ("flat_kernel", "strided_kernel")
                   for p in range(3) for y in ("{T}", "bool", "unsigned char")]
    launchable += [f"sparse_rows_kernel<(Pass){p}, {{T}}>" for p in range(3)]
    launchable += ["reduce_partials_kernel<{A}, 1, StoreTotalEpilogue<{A}>>",
                   "reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>",
                   "reduce_partials_kernel<{A}, 1, FixedDivisorLossEpilogue<{T}>>"]
    named = {k for kernels in KERNELS.values() for k in kernels}
    assert set(launchable) <= named, sorted(set(launchable) - named)
    assert set(KERNELS) == set(CASES) | set(CORRELATION_CASES)


def test_short_kernel_name():
    assert short_kernel_name("void fused_losses::cuda::(anonymous namespace)::flat_kernel<(fused_losses::cuda::("
                             "anonymous namespace)::Pass)2, float, bool>(fused_losses::cuda::(anonymous namespace)::"
                             "PassArgs<float>, bool const*)") == "flat_kernel<(Pass)2, float, bool>"
    name = short_kernel_name("void fused_losses::cuda::reduce_partials_kernel<float, 2, fused_losses::cuda::"
                             "ReducedLossEpilogue<c10::BFloat16> >(float const*, long, fused_losses::cuda::"
                             "ReducedLossEpilogue<c10::BFloat16>)")
    assert _pattern("reduce_partials_kernel<{A}, 2, ReducedLossEpilogue<{T}>>").match(name), name
    assert not _pattern("forward_kernel<{T}, 4, true>").match("forward_kernel<float, 32, true>")
