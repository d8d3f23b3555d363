"""The CUDA kernels' SASS against issue 15's targets, read from the built extension without a GPU.

scripts/sass_report.py reads the sm_90 cubins with cuobjdump (shipped in the triton wheel): the registers and
stack frame of every kernel (-res-usage), and the SASS of the kernels with a stack frame, whose STL / LDL
instructions are local-memory spills (ptxas -v reports the same bytes as "spill stores / loads"). Targets:
- no kernel spills;
- the kernels of the float32 / bfloat16 / float16 paths use at most 64 registers at their launch size of 256
  threads (>= 4 resident blocks per SM).
Both hold (hard tests; the last spills went on 2026-11-28: the ASL flat kernels step 4 elements at a time, the
sparse kernels' row and chunk loops carry no induction variables of the compiler's own across the sweep, see
docs/design.md). They depend on the compiler (nvcc 13.0 here): another nvcc may move them.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

import fused_losses

REPOSITORY = Path(__file__).resolve().parents[1]


def _load_sass_report():
    spec = importlib.util.spec_from_file_location("sass_report", REPOSITORY / "scripts" / "sass_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


sass_report = _load_sass_report()


@pytest.fixture(scope="module")
def extension() -> Path:
    return Path(fused_losses._C.__file__)


@pytest.fixture(scope="module")
def kernels(extension):
    try:
        return sass_report.read_resource_usage(extension)
    except sass_report.ToolMissing as error:
        pytest.skip(f"cannot read the cubins: {error}")
    except sass_report.NoCubins as error:
        pytest.skip(f"{error}: no CUDA kernels to check")


@pytest.fixture(scope="module")
def spilling(extension, kernels):
    """Names of the kernels with local-memory stores or loads (only kernels with a stack frame can have any)."""
    candidates = [k for k in kernels if k.may_touch_local_memory()]
    if not candidates:
        return set()
    sass = sass_report.read_sass(extension, kernels=candidates)
    return {k.name for k in candidates if any(sass_report.local_memory_traffic(sass[(k.source, k.mangled)]))}


@pytest.fixture(scope="module")
def register_misses(kernels):
    misses = set()
    for kernel in kernels:
        blocks, _ = sass_report.resident_blocks(kernel.registers, kernel.shared_bytes,
                                                sass_report.threads_per_block(kernel))
        if not kernel.on_fp64_path and blocks < sass_report.BLOCKS_PER_SM_TARGET:
            misses.add(kernel.name)
    return misses


def test_every_kernel_has_a_unique_name_and_a_launch_size(kernels):
    names = [kernel.name for kernel in kernels]
    assert len(names) == len(set(names))
    for kernel in kernels:
        assert sass_report.threads_per_block(kernel) == 256, kernel.name


def test_no_kernel_spills(spilling):
    assert not spilling, f"kernels that spill to local memory (issue 15: no spills anywhere): {sorted(spilling)}"


def test_float_paths_keep_four_blocks_per_sm(register_misses):
    assert not register_misses, f"float32/bf16/fp16 kernels above 64 registers at 256 threads: {register_misses}"


# ----------------------------------------------------------------------------- the report's own logic


def test_resident_blocks_on_an_h100():
    assert sass_report.resident_blocks(64, 1088, 256) == (4, "registers")  # 64 x 256 x 4 = 65536
    assert sass_report.resident_blocks(65, 0, 256) == (3, "registers")  # 72 per thread after rounding
    assert sass_report.resident_blocks(32, 0, 256) == (8, "threads")
    assert sass_report.resident_blocks(32, 100 * 1024, 256) == (2, "shared memory")


def test_short_kernel_names():
    demangled = ("void fused_losses::cuda::(anonymous namespace)::flat_kernel<(fused_losses::cuda::(anonymous "
                 "namespace)::Pass)2, c10::BFloat16, unsigned char>(fused_losses::cuda::(anonymous namespace)::"
                 "PassArgs<c10::BFloat16>, unsigned char const*, long)")
    assert sass_report.short_kernel_name(demangled) == "flat_kernel<ForwardWithGradient, bf16, uint8>"
    demangled = ("void fused_losses::cuda::reduce_partials_kernel<float, 2, fused_losses::cuda::ReducedLossEpilogue"
                 "<c10::Half> >(float const*, long, fused_losses::cuda::ReducedLossEpilogue<c10::Half>)")
    assert sass_report.short_kernel_name(demangled) == "reduce_partials_kernel<fp32, 2, ReducedLossEpilogue<fp16>>"


def _listing(instructions: list[str]) -> str:
    """A cuobjdump -sass listing of one sm_90 function whose i-th instruction is at address 16 i."""
    lines = ["Fatbin elf code:", "================", "arch = sm_90", "identifier = /repo/csrc/cuda/example.cu", "",
             "\tcode for sm_90", "\t\tFunction : example_kernel"]
    lines += [f"        /*{16 * i:04x}*/                   {text} ;    /* 0x0000000000000000 */"
              for i, text in enumerate(instructions)]
    return "\n".join(lines)


# An outer loop (0x10) around an inner one (0x20) whose body has an if (0x40, skipped by the branch at 0x30),
# then EXIT and the unreachable self-branch cuobjdump prints after the last EXIT.
NESTED_LOOPS = [
    "S2R R0, SR_TID.X",
    "LDG.E R2, desc[UR4][R4.64]",
    "LDG.E.128 R8, desc[UR4][R6.64]",
    "@P0 BRA 0x50",
    "FADD R1, R1, R8",
    "FADD R1, R1, R9",
    "@P1 BRA 0x20",
    "STG.E desc[UR4][R4.64], R1",
    "@P2 BRA 0x10",
    "EXIT",
    "BRA 0xa0",
]


def test_loops_found_in_sass():
    (key, instructions), = sass_report.parse_sass(_listing(NESTED_LOOPS)).items()
    assert key == ("example", "example_kernel")
    loops = {loop.header: loop for loop in sass_report.find_loops(instructions)}
    assert sorted(loops) == [0x10, 0x20]
    inner, outer = loops[0x20], loops[0x10]
    assert (inner.static, inner.min_path, inner.accesses, inner.contains_memory_loop) == (5, 4, {"LDG16": 1}, False)
    assert (outer.static, outer.min_path, outer.contains_memory_loop) == (8, 7, True)
    assert outer.accesses == {"LDG4": 1, "LDG16": 1, "STG4": 1}


def test_hot_loop_instructions_per_byte_and_bandwidth_bound():
    (_, instructions), = sass_report.parse_sass(_listing(NESTED_LOOPS)).items()
    pack = sass_report.SweepModel(("read",), elements=8, dram_bytes=2, what="8 bf16 elements per 16-byte load")
    hot = sass_report.hot_loops(sass_report.find_loops(instructions), pack)
    assert (hot.headers, hot.static, hot.min_path) == (["0x20"], [5], [4])  # the inner loop, not the outer one
    assert hot.instructions_per_byte == pytest.approx(5 / 8 / 2)
    assert hot.bandwidth_fraction == 1.0
    assert sass_report.hot_loops(sass_report.find_loops(instructions),
                                 sass_report.SweepModel(("write",), 8, 2, what="no 16-byte store here")) is None
    # 32 instructions for one 2-byte element: 16 per byte, beyond the ~9.9 the issue rate allows.
    (_, instructions), = sass_report.parse_sass(_listing(
        ["LDG.E.128 R8, desc[UR4][R6.64]", *["FADD R1, R1, R8"] * 30, "@P0 BRA 0x0", "EXIT"])).items()
    element = sass_report.SweepModel(("read",), elements=1, dram_bytes=2, what="one bf16 element")
    hot = sass_report.hot_loops(sass_report.find_loops(instructions), element)
    assert hot.instructions_per_byte == 16
    assert hot.bandwidth_fraction == pytest.approx(sass_report.INSTRUCTIONS_PER_BYTE_BUDGET / 16)


# ----------------------------------------------------------------------------- instruction budget


def test_cross_entropy_hot_loops_within_the_instruction_budget(extension, kernels):
    """Issue 15: every float32 / bf16 / fp16 cross-entropy kernel that sweeps rows spends at most ~9.9
    thread-instructions per DRAM byte in its hot loops (static count: every branch of the body once), and stays
    at 64 registers without spills (the fixtures above check those for all kernels)."""
    swept = [k for k in kernels if k.name.startswith("cross_entropy/") and not k.on_fp64_path
             and sass_report.sweep_model(k) is not None]
    assert swept, "no cross-entropy sweep kernels in the build"
    sass = sass_report.read_sass(extension, kernels=swept)
    over = {}
    for kernel in swept:
        hot = sass_report.hot_loops(sass_report.find_loops(sass[(kernel.source, kernel.mangled)]),
                                    sass_report.sweep_model(kernel))
        assert hot is not None and not hot.checks, f"{kernel.name}: the hot loops do not fit the model"
        if hot.instructions_per_byte > sass_report.INSTRUCTIONS_PER_BYTE_BUDGET:
            over[kernel.name] = round(hot.instructions_per_byte, 1)
    assert not over, f"cross-entropy hot loops over {sass_report.INSTRUCTIONS_PER_BYTE_BUDGET:.1f} instr/B: {over}"
