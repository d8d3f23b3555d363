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
import re
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


def _labelled_listing(lines: list[str]) -> list[str]:
    """Instructions with labels ('name:' lines) resolved into the addresses of _listing ({name} in a branch)."""
    labels, instructions = {}, []
    for line in lines:
        if line.endswith(":"):
            labels[line[:-1]] = 16 * len(instructions)
        else:
            instructions.append(line)
    return [re.sub(r"\{(\w+)\}", lambda m: hex(labels[m.group(1)]), line) for line in instructions]


def _loop_testing(prelude: list[str], test: list[str], subroutine: list[str] = ()) -> list[str]:
    """A loop (0x10 without a prelude) that runs `test`, which sets P0, then takes a 3-instruction side when P0
    holds, else a 2-instruction one; its latch compares a per-lane value (R0, the thread index)."""
    return _labelled_listing(["S2R R0, SR_TID.X", *prelude,
                              "top:", "LDG.E.128 R8, desc[UR4][R6.64]", *test,
                              "@!P0 BRA {other}", "FADD R1, R1, R8", "FADD R1, R1, R9", "FADD R1, R1, R10",
                              "BRA {latch}",
                              "other:", "FMUL R1, R1, R8", "FMUL R1, R1, R9",
                              "latch:", "ISETP.GE.AND P1, PT, R0, UR5, PT", "@!P1 BRA {top}", "EXIT",
                              *subroutine, "end:", "BRA {end}"])


def _memory_loop(instructions: list[str]):
    """The loop with global accesses of a listing (the outer one where loops nest)."""
    (_, parsed), = sass_report.parse_sass(_listing(instructions)).items()
    return max((loop for loop in sass_report.find_loops(parsed) if loop.accesses), key=lambda loop: loop.static)


def _only_loop(instructions: list[str]):
    (_, parsed), = sass_report.parse_sass(_listing(instructions)).items()
    loop, = [loop for loop in sass_report.find_loops(parsed) if loop.header == 0x10]
    return loop


UNIFORM_R4 = "IMAD.MOV.U32 R4, RZ, RZ, c[0x0][0x210]"


@pytest.mark.parametrize("prelude, test, uniform", [
    ([], ["FSETP.NEU.AND P0, PT, RZ, UR13, PT"], True),  # a kernel argument against 0: the same in every lane
    ([], ["ISETP.GE.AND P0, PT, RZ, c[0x0][0x210], PT"], True),
    ([UNIFORM_R4], ["ISETP.GE.AND P0, PT, R4, 0x3, PT"], True),  # a constant through a register
    ([], ["FSETP.NEU.AND P0, PT, R8, UR13, PT"], False),  # a loaded value: per lane
    ([], ["@P2 FSETP.NEU.AND P0, PT, RZ, UR13, PT"], False),  # guarded: lanes without P2 keep their own P0
    ([], ["ISETP.GE.AND P0, PT, R0, 0x3, PT"], False),  # the thread index
])
def test_warp_path_takes_one_side_of_a_uniform_branch(prelude, test, uniform):
    """Blocks: header (the LDG, the test, the branch), then-side 4, else-side 2, latch 2. A warp issues one side
    of a branch every lane takes alike (the static count less the else-side's 2), both sides of any other."""
    loop = _memory_loop(_loop_testing(prelude, test))
    assert loop.static == len(test) + 10 and loop.min_path == loop.static - 4
    assert loop.warp_path == (loop.static - 2 if uniform else loop.static)


def test_warp_path_follows_uniform_values_through_registers_and_merges():
    """A register loaded from a constant and compared is uniform; so is a predicate tested after an if / else
    that does not set it (its one definition reaches the branch along both paths)."""
    loop = _only_loop(["S2R R0, SR_TID.X",
                       "LDG.E.128 R8, desc[UR4][R6.64]",
                       "IMAD.MOV.U32 R2, RZ, RZ, c[0x0][0x210]",
                       "ISETP.GE.AND P0, PT, R2, 0x3, PT",
                       "@!P0 BRA 0x60",  # 0x40
                       "FADD R1, R1, R8",  # 0x50
                       "FMUL R1, R1, R8",  # 0x60: join, then the same P0 tested again
                       "@P0 BRA 0xb0",  # 0x70
                       "FADD R1, R1, R9",
                       "FADD R1, R1, R10",
                       "FADD R1, R1, R11",
                       "ISETP.GE.AND P1, PT, R0, UR5, PT",  # 0xb0
                       "@!P1 BRA 0x10",
                       "EXIT",
                       "BRA 0xe0"])
    # Blocks: header 4, 1, 2 (join), 3, latch 2: static 12. P0 true: 4 + 1 + 2 + 2 = 9; false: 4 + 2 + 3 + 2 = 11.
    assert (loop.static, loop.warp_path, loop.min_path) == (12, 11, 8)


def test_warp_path_reads_one_condition_once():
    """Two branches on the same uniform value (a gamma tested per sub-pack) are one condition: the warp takes the
    costly side of the first and the cheap side of the second, or the reverse, never both costly ones."""
    loop = _only_loop(["ULDC UR13, c[0x0][0x214]",  # gamma, read once before the loop
                       "LDG.E.128 R8, desc[UR4][R6.64]",
                       "FSETP.NEU.AND P0, PT, RZ, UR13, PT",
                       "@!P0 BRA 0x70",
                       "FADD R1, R1, R8",  # 0x40: taken when P0 (2 + the jump over the other side)
                       "FADD R1, R1, R9",
                       "BRA 0x80",
                       "FMUL R1, R1, R8",  # 0x70: when !P0
                       "FSETP.NEU.AND P0, PT, RZ, UR13, PT",  # 0x80: the same test again
                       "@P0 BRA 0xd0",
                       "FADD R1, R1, R10",  # 0xa0: when !P0
                       "FADD R1, R1, R11",
                       "FADD R1, R1, R12",
                       "ISETP.GE.AND P1, PT, R8, UR5, PT",  # 0xd0: on a loaded value, per lane
                       "@!P1 BRA 0x10",
                       "EXIT",
                       "BRA 0x100"])
    # Blocks: 3, 3, 1, 2, 3, 2: static 14. P0: 3 + 3 + 2 + 2 = 10; !P0: 3 + 1 + 2 + 3 + 2 = 11 (as two
    # independent conditions the costly sides would add up to 13).
    assert (loop.static, loop.warp_path) == (14, 11)


@pytest.mark.parametrize("prelude, test, subroutine", [
    # R4 overwritten by a lane exchange (SHFL writes the register after its predicate) ...
    ([UNIFORM_R4], ["SHFL.BFLY PT, R4, R8, 0x10, 0x1f", "ISETP.GE.AND P0, PT, R4, 0x3, PT"], []),
    # ... by the predicate form of LOP3 (its register destination comes second) ...
    ([UNIFORM_R4], ["LOP3.LUT P2, R4, R0, 0x1f, RZ, 0xc0, !PT", "ISETP.GE.AND P0, PT, R4, 0x3, PT"], []),
    # ... by the high half of a register pair ...
    (["IMAD.MOV.U32 R5, RZ, RZ, c[0x0][0x210]"], ["CS2R R4, SR_CLOCKLO", "ISETP.GE.AND P0, PT, R5, 0x3, PT"], []),
    # ... by a subroutine.
    ([UNIFORM_R4], ["CALL.REL.NOINC {subroutine}", "ISETP.GE.AND P0, PT, R4, 0x3, PT"],
     ["subroutine:", "IMAD.MOV.U32 R4, RZ, RZ, R0", "RET.REL.NODEC R20 0x0"]),
    # A 64-bit addend whose high half is per-lane; a double compare likewise.
    ([UNIFORM_R4], ["IMAD.MOV.U32 R5, RZ, RZ, R0", "IMAD.WIDE.U32 R2, RZ, RZ, R4", "ISETP.GE.AND P0, PT, R3, 0x3, PT"],
     []),
    ([UNIFORM_R4], ["IMAD.MOV.U32 R5, RZ, RZ, R0", "DSETP.GT.AND P0, PT, R4, RZ, PT"], []),
    # A vote under a guard: lanes outside it keep their own predicate.
    ([], ["ISETP.GE.AND P2, PT, R0, 0x3, PT", "ISETP.GE.AND P3, PT, R0, 0x7, PT", "@P3 VOTE.ANY P2, P2",
          "PLOP3.LUT P0, PT, P2, PT, PT, 0x80, 0x0"], []),
    # A copy of a uniform counter made in an inner loop that lanes leave at different iterations.
    ([], ["UMOV UR4, URZ", "inner:", "UIADD3 UR4, UR4, 0x1, URZ", "MOV R2, UR4", "ISETP.GE.AND P2, PT, R0, UR4, PT",
          "@P2 BRA {inner}", "ISETP.GE.AND P0, PT, R2, 0x3, PT"], []),
])
def test_warp_path_counts_both_sides_of_values_that_may_differ_between_lanes(prelude, test, subroutine):
    """Each case would be one side (as the uniform R4 tested directly above) if the analysis missed the write or
    the source that makes the value per-lane."""
    loop = _memory_loop(_loop_testing(prelude, test, subroutine))
    assert loop.warp_path == loop.static


def test_warp_path_of_a_loop_versioned_on_the_gammas(extension, kernels):
    """In the real build: the focal BCE forward that sums without storing tests gamma_pos and gamma_neg against
    0 per sub-pack (uniform branches around each factor's exp); a warp issues one version of each."""
    focal = [k for k in kernels if k.name == "bce/flat_kernel<Forward, bf16, bool, focal, false>"]
    if not focal:
        pytest.skip("no BCE focal kernel in this build")
    loops = sass_report.find_loops(sass_report.read_sass(extension, kernels=focal)[(focal[0].source,
                                                                                   focal[0].mangled)])
    assert all(loop.warp_path <= loop.static for loop in loops)
    assert any(loop.warp_path < loop.static and loop.accesses for loop in loops)


# ----------------------------------------------------------------------------- instruction budget


# The kernels whose hot loops are under the budget (README, "SASS report"): every cross-entropy and correlation
# sweep, the BCE flat and sparse-index kernels of plain BCE without weight operands, and the flat ones with them.
WITHIN_BUDGET = {
    "cross-entropy": r"^cross_entropy/",
    "correlation": r"^correlation/",
    "plain BCE without weights": r"^bce/(flat_kernel|sparse_rows_kernel)<.*, plain, false>$",
    "plain BCE with weights, flat": r"^bce/flat_kernel<.*, plain, true>$",
}


@pytest.mark.parametrize("family", WITHIN_BUDGET)
def test_hot_loops_within_the_instruction_budget(extension, kernels, family):
    """Issue 15: these float32 / bf16 / fp16 kernels spend at most ~9.9 thread-instructions per DRAM byte in
    their hot loops (on the warp path: each uniform branch on one side, every other branch on both), and stay
    at 64 registers without spills (the fixtures above check those for all kernels)."""
    swept = [k for k in kernels if re.search(WITHIN_BUDGET[family], k.name) and not k.on_fp64_path
             and sass_report.sweep_model(k) is not None]
    assert swept, f"no {family} sweep kernels in the build"
    sass = sass_report.read_sass(extension, kernels=swept)
    over = {}
    for kernel in swept:
        hot = sass_report.hot_loops(sass_report.find_loops(sass[(kernel.source, kernel.mangled)]),
                                    sass_report.sweep_model(kernel))
        assert hot is not None and not hot.checks, f"{kernel.name}: the hot loops do not fit the model"
        if hot.instructions_per_byte > sass_report.INSTRUCTIONS_PER_BYTE_BUDGET:
            over[kernel.name] = round(hot.instructions_per_byte, 1)
    assert not over, f"{family} hot loops over {sass_report.INSTRUCTIONS_PER_BYTE_BUDGET:.1f} instr/B: {over}"
