#!/usr/bin/env python3
"""Static report of the CUDA kernels compiled into the fused_losses extension, read from its SASS.

For every kernel of the extension's cubins (sm_90 by default) it reports:

- registers, stack frame, local-memory traffic (spills) and static shared memory, from
  `cuobjdump -res-usage` and the STL / LDL instructions of `cuobjdump -sass`;
- resident blocks per SM at the kernel's launch size (LAUNCH_THREADS, read from the .cu launch configurations)
  under the H100 limits in H100;
- the instructions of its hot loop per element processed, per byte moved, and the fraction of the H100's copy
  bandwidth that the instruction issue rate allows (ISSUE_MODEL below).

Loop detection (a heuristic, see hot_loops): the SASS of a kernel is cut into basic blocks; a loop is a branch
back to a block that dominates it (a natural loop). The hot loop of a kernel that sweeps element tensors is its
innermost loop that touches global memory with 16-byte accesses (the vectorised sweep); sweep_model says, per
kernel family, how many elements one iteration handles and how many DRAM bytes each element costs. Two counts
bracket the instructions a warp issues per iteration:
- "static": every instruction of the loop body, each once. A warp issues all of them when every branch of the
  body diverges or is taken (optional operands present, NaN paths); calls to slow-path subroutines (IEEE
  division, expf) count as one instruction. Where the compiler made several versions of one loop (with and
  without a cost row, say), the largest.
- "warp path": what one warp issues per iteration in the costliest configuration of the call. A branch whose
  predicate is computed from uniform registers and constants alone (a gamma that is 0, an optional operand that
  is absent: the same in every lane) takes one side for the whole warp, so the loop's versions for the two sides
  are alternatives, not a sum; every other branch counts both sides, as in the static count. The largest over the
  outcomes of the uniform conditions (each condition read once however many branches test it); the static
  count when the body has none, or more than MAX_UNIFORM_CONDITIONS. Where unsure whether a value is the same
  in every lane, it is taken as per-lane (both sides counted). The instruction budget is judged on it.
- "min path": the shortest path from the loop's header back to it. It is a lower bound and can be a degenerate
  path (a pack whose steps are all masked, a row whose labels are invalid) that real data rarely takes.

Run from the repository root:
    python scripts/sass_report.py                   # Markdown table of every kernel
    python scripts/sass_report.py --match 'bf16'    # only kernels whose short name matches the regex
    python scripts/sass_report.py --json            # the same data as JSON
The tools: cuobjdump from the triton wheel that torch installs (triton/backends/nvidia/bin), else from PATH,
and c++filt (binutils).
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------- H100 model

# Resource limits of one H100 (sm_90) SM, as the CUDA occupancy calculator applies them.
H100 = {
    "registers_per_sm": 65536,
    "register_allocation_unit": 256,  # registers are allocated per warp in units of 256
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "shared_memory_per_sm": 228 * 1024,
    # The runtime reserves 1 KB of shared memory per resident block (sm_80 and later). cuobjdump's SHARED already
    # includes it for a kernel with shared variables (ptxas -v: 64 B for the cross-entropy forward, cuobjdump:
    # 1088 B), so a block takes max(SHARED, 1 KB).
    "shared_memory_reserved_per_block": 1024,
}

# Instruction issue against memory bandwidth. An SM has 4 schedulers, each issuing one warp instruction (32
# thread-instructions) per clock; H100 SXM: 132 SMs at 1.755 GHz; copy bandwidth ~3.0 TB/s (a device-to-device
# copy, bytes read + written).
ISSUE_MODEL = {
    "sms": 132,
    "schedulers_per_sm": 4,
    "threads_per_warp": 32,
    "clock_hz": 1.755e9,
    "copy_bandwidth_bytes_per_s": 3.0e12,
}
# Thread-instructions per second: 132 * 4 * 32 * 1.755e9 = 2.97e13.
ISSUE_RATE = (ISSUE_MODEL["sms"] * ISSUE_MODEL["schedulers_per_sm"] * ISSUE_MODEL["threads_per_warp"]
              * ISSUE_MODEL["clock_hz"])
# A kernel can move bytes at the copy bandwidth only while it spends at most this many thread-instructions per
# byte (9.9; ~20 per bf16 element, ~40 per fp32 element read). At c instructions per byte, issue alone caps it
# at ISSUE_RATE / c bytes per second: the fraction min(1, BUDGET / c) of the copy bandwidth.
INSTRUCTIONS_PER_BYTE_BUDGET = ISSUE_RATE / ISSUE_MODEL["copy_bandwidth_bytes_per_s"]

# Issue 15's occupancy target for the float32 / bfloat16 / float16 paths: at most 64 registers at 256 threads,
# i.e. at least 4 resident blocks per SM.
REGISTER_TARGET = 64
BLOCKS_PER_SM_TARGET = 4

# Threads per block of every kernel, by kernel name: each launch in csrc/cuda/*.cu uses kBlockThreads (256,
# cuda_utils.cuh): forward_kernel, block_row_forward_kernel, backward_kernel, tile_forward_kernel,
# tile_backward_kernel and target_weight_kernel in cost_sensitive_cross_entropy.cu;
# reduce_items_kernel, combine_chunks_kernel and map_items_kernel in correlation_loss.cu (run_reduction,
# run_map); flat_kernel, strided_kernel and sparse_rows_kernel in weighted_bce_with_logits_kernels.cuh
# (launch_pass);
# reduce_partials_kernel in cuda_utils.cuh (launch_reduce_partials). A kernel missing here is an error.
LAUNCH_THREADS = {
    "forward_kernel": 256,
    "block_row_forward_kernel": 256,
    "backward_kernel": 256,
    "target_weight_kernel": 256,
    "tile_forward_kernel": 256,
    "tile_backward_kernel": 256,
    "reduce_items_kernel": 256,
    "combine_chunks_kernel": 256,
    "map_items_kernel": 256,
    "flat_kernel": 256,
    "strided_kernel": 256,
    "sparse_rows_kernel": 256,
    "reduce_partials_kernel": 256,
}

# ------------------------------------------------------------------------------------------------- names

# Short op names, by the .cu file a cubin was compiled from.
OPS = {
    "cost_sensitive_cross_entropy": "cross_entropy",
    "correlation_loss": "correlation",
    "weighted_bce_with_logits": "bce",  # the op's file: the reduction of the per-block sums
    "weighted_bce_with_logits_forward": "bce",  # one file per pass: weighted_bce_with_logits_kernels.cuh
    "weighted_bce_with_logits_forward_with_gradient": "bce",
    "weighted_bce_with_logits_backward": "bce",
}
# enum class Pass { Forward, Backward, ForwardWithGradient } (weighted_bce_with_logits_kernels.cuh).
BCE_PASSES = ("Forward", "Backward", "ForwardWithGradient")
# enum class Focusing { Plain, Focal, Asymmetric } (weighted_bce_with_logits_kernels.cuh).
BCE_FOCUSING = ("plain", "focal", "asl")
TYPE_NAMES = [(r"\bBFloat16\b", "bf16"), (r"\bHalf\b", "fp16"), (r"\bfloat\b", "fp32"), (r"\bdouble\b", "fp64"),
              (r"\bunsigned char\b", "uint8"), (r"\blong\b", "int64")]
TYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "bool": 1, "uint8": 1, "int64": 8}


def short_kernel_name(demangled: str) -> str:
    """'void fused_losses::cuda::(anonymous namespace)::flat_kernel<(...::Pass)0, c10::BFloat16, bool>(...)'
    -> 'flat_kernel<Forward, bf16, bool>'."""
    name = demangled.removeprefix("void ")
    for prefix in ("(anonymous namespace)::", "fused_losses::cuda::", "fused_losses::", "c10::", "std::"):
        name = name.replace(prefix, "")
    depth = 0
    for position, char in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            name = name[:position]
            break
    name = re.sub(r"\(Pass\)(\d)", lambda m: BCE_PASSES[int(m.group(1))], name)
    name = re.sub(r"\(Focusing\)(\d)", lambda m: BCE_FOCUSING[int(m.group(1))], name)
    for pattern, short in TYPE_NAMES:
        name = re.sub(pattern, short, name)
    return name.replace("> >", ">>")


def split_template(name: str) -> tuple[str, list[str]]:
    """'reduce_items_kernel<256, MomentsTask<bf16>>' -> ('reduce_items_kernel', ['256', 'MomentsTask<bf16>'])."""
    base, _, rest = name.partition("<")
    arguments, depth, current = [], 0, ""
    for char in rest[:-1]:
        if char == "," and depth == 0:
            arguments.append(current.strip())
            current = ""
            continue
        depth += {"<": 1, ">": -1}.get(char, 0)
        current += char
    if current.strip():
        arguments.append(current.strip())
    return base, arguments


def demangle(names: list[str]) -> list[str]:
    output = subprocess.run([str(find_tool("c++filt"))], input="\n".join(names), capture_output=True, text=True,
                            check=True).stdout
    return output.splitlines()


# ------------------------------------------------------------------------------------------------- tools


class ToolMissing(RuntimeError):
    pass


class NoCubins(RuntimeError):
    pass


def find_tool(name: str) -> Path:
    """cuobjdump / nvdisasm from the triton wheel (the toolkit torch's own kernels are built with), else from
    PATH; c++filt from PATH."""
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        bundled = Path(list(triton.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return bundled
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} not found: neither in the triton wheel (triton/backends/nvidia/bin) nor on PATH")
    return Path(found)


def default_extension() -> Path:
    """The _C library of the fused_losses package that Python imports from the repository root (the checkout's
    own build with an editable install)."""
    sys.path.insert(0, str(REPOSITORY))
    try:
        spec = importlib.util.find_spec("fused_losses")
    finally:
        sys.path.remove(str(REPOSITORY))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fused_losses package is not importable: build it first (make build)")
    libraries = sorted(Path(list(spec.submodule_search_locations)[0]).glob("_C*.so"))
    if not libraries:
        raise FileNotFoundError(f"no built extension (_C*.so) in {spec.submodule_search_locations[0]}")
    return libraries[0]


def cuobjdump(extension: Path, *options: str) -> str:
    result = subprocess.run([str(find_tool("cuobjdump")), *options, str(extension)], capture_output=True, text=True)
    if result.returncode != 0:
        if "does not contain device code" in result.stderr:
            raise NoCubins(f"{extension} holds no CUDA device code (a CPU-only build)")
        raise RuntimeError(f"cuobjdump {' '.join(options)} failed: {result.stderr.strip()}")
    return result.stdout


def cuobjdump_version() -> str:
    output = subprocess.run([str(find_tool("cuobjdump")), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", output)
    return release.group(1) if release else "unknown"


# ------------------------------------------------------------------------------------------------- resources


@dataclass
class Kernel:
    source: str  # the .cu file's stem
    mangled: str
    name: str = ""  # 'op/short kernel name', unique in the extension
    registers: int = 0
    stack_bytes: int = 0  # stack frame: where spilled registers (and dynamically indexed local arrays) live
    local_bytes: int = 0  # local memory outside the stack frame
    shared_bytes: int = 0  # static shared memory per block, as cuobjdump reports it (see H100)

    @property
    def short(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def on_fp64_path(self) -> bool:
        return "fp64" in self.short

    def may_touch_local_memory(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def _cubin_sections(dump: str, arch: str):
    """Yields (source stem, lines) for each ELF cubin of `arch` in a cuobjdump listing."""
    for section in re.split(r"\n(?=Fatbin (?:elf|ptx) code:)", dump):
        if not section.startswith("Fatbin elf code:") or not re.search(rf"^arch = {arch}$", section, re.M):
            continue
        identifier = re.search(r"^identifier = (\S+)$", section, re.M)
        source = Path(identifier.group(1)).stem if identifier else "unknown"
        yield source, section.splitlines()


def read_resource_usage(extension: Path, arch: str = "sm_90") -> list[Kernel]:
    """Registers, stack, local and shared memory of every kernel (cuobjdump -res-usage: fast, no disassembly)."""
    kernels = []
    for source, lines in _cubin_sections(cuobjdump(extension, "-res-usage"), arch):
        for line in lines:
            function = re.match(r"\s*Function (\S+):$", line)
            if function:
                kernels.append(Kernel(source, function.group(1)))
                continue
            usage = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
            if usage and kernels:
                registers, stack, shared, local = map(int, usage.groups())
                kernels[-1] = Kernel(source, kernels[-1].mangled, registers=registers, stack_bytes=stack,
                                     local_bytes=local, shared_bytes=shared)
    if not kernels:
        raise NoCubins(f"{extension} holds no {arch} cubin")
    for kernel, demangled in zip(kernels, demangle([k.mangled for k in kernels])):
        kernel.name = f"{OPS.get(kernel.source, kernel.source)}/{short_kernel_name(demangled)}"
    return kernels


def threads_per_block(kernel: Kernel) -> int:
    base = split_template(kernel.short)[0]
    if base not in LAUNCH_THREADS:
        raise KeyError(f"no launch size for {kernel.name}: add {base} to LAUNCH_THREADS from its .cu launch")
    return LAUNCH_THREADS[base]


def resident_blocks(registers: int, shared_bytes: int, threads: int) -> tuple[int, str]:
    """Blocks of `threads` threads that fit on one H100 SM, and the limit that decides it."""
    warps = math.ceil(threads / 32)
    unit = H100["register_allocation_unit"]
    registers_per_warp = math.ceil(registers * 32 / unit) * unit
    limits = {
        "threads": H100["max_threads_per_sm"] // threads,
        "blocks": H100["max_blocks_per_sm"],
        "registers": H100["registers_per_sm"] // registers_per_warp // warps,
        "shared memory": H100["shared_memory_per_sm"] // max(shared_bytes, H100["shared_memory_reserved_per_block"]),
    }
    limit = min(limits, key=lambda name: limits[name])  # on a tie, the first named
    return limits[limit], limit


# ------------------------------------------------------------------------------------------------- SASS

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
GUARD = re.compile(r"^@!?U?P[T\d]+\s+")
MEMORY_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# LD / ST: generic addresses (global memory in these kernels); LDGSTS: cp.async, global to shared memory.
GLOBAL_ACCESSES = ("LDG", "STG", "LD", "ST", "LDGSTS")


@dataclass
class Instruction:
    address: int
    text: str

    @property
    def guarded(self) -> bool:
        return GUARD.match(self.text) is not None

    @property
    def opcode(self) -> str:
        return GUARD.sub("", self.text).split()[0]

    @property
    def operation(self) -> str:
        return self.opcode.split(".")[0]

    def access_bytes(self) -> int:
        """Bytes one thread moves with this load / store (4 without a width suffix)."""
        for suffix in self.opcode.split(".")[1:]:
            if suffix in MEMORY_WIDTHS:
                return MEMORY_WIDTHS[suffix]
        return 4

    def branch_target(self) -> int | None:
        if self.operation != "BRA":
            return None
        return int(re.findall(r"0x([0-9a-f]+)", self.text)[-1], 16)

    def ends_block(self) -> bool:
        return self.operation in ("BRA", "BRX", "JMX", "EXIT", "RET")

    def falls_through(self) -> bool:
        """Whether execution can continue with the next instruction."""
        if self.operation == "BRA":
            operands = GUARD.sub("", self.text).split(None, 1)[1]
            return self.guarded or "," in operands  # 'BRA P0, 0x..', 'BRA.DIV UR4, 0x..': conditional
        if self.operation in ("EXIT", "RET"):
            return self.guarded
        return self.operation not in ("BRX", "JMX")  # indirect jumps: successors unknown, the analysis stops


def read_sass(extension: Path, arch: str = "sm_90",
              kernels: list[Kernel] | None = None) -> dict[tuple[str, str], list[Instruction]]:
    """Instructions of every kernel (or of `kernels` only: faster), keyed by (source stem, mangled name)."""
    options = ["-sass"]
    if kernels is not None:
        options += ["-fun", ",".join(sorted({k.mangled for k in kernels}))]
    return parse_sass(cuobjdump(extension, *options), arch)


def parse_sass(listing: str, arch: str = "sm_90") -> dict[tuple[str, str], list[Instruction]]:
    """The instructions of each function of a `cuobjdump -sass` listing."""
    functions: dict[tuple[str, str], list[Instruction]] = {}
    for source, lines in _cubin_sections(listing, arch):
        current = None
        for line in lines:
            function = re.match(r"\s*Function : (\S+)", line)
            if function:
                current = functions.setdefault((source, function.group(1)), [])
                continue
            instruction = INSTRUCTION.match(line)
            if instruction and current is not None:
                current.append(Instruction(int(instruction.group(1), 16), instruction.group(2)))
    return functions


def local_memory_traffic(instructions: list[Instruction]) -> tuple[int, int]:
    """Bytes per thread stored to and loaded from local memory by STL / LDL instructions, each counted once
    (ptxas -v calls them spill stores / loads; a dynamically indexed local array would show here too)."""
    stores = sum(i.access_bytes() for i in instructions if i.operation == "STL")
    loads = sum(i.access_bytes() for i in instructions if i.operation == "LDL")
    return stores, loads


# ------------------------------------------------------------------------------------------------- loops


@dataclass
class Loop:
    header: int  # address of the loop's first instruction
    static: int  # instructions in the body
    min_path: int  # instructions on the shortest path from the header back to it
    warp_path: int  # instructions a warp issues per iteration in the costliest uniform configuration
    accesses: dict[str, int]  # global loads / stores by kind and width, e.g. {'LDG16': 1, 'STG2': 4}
    contains_memory_loop: bool = False
    shared_loads: dict[int, int] = field(default_factory=dict)  # LDS by width in bytes

    def _count(self, direction: str, width: int) -> int:
        """Accesses of `width` bytes whose operation starts with `direction` ('LD', 'ST', or '' for both)."""
        total = 0
        for key, count in self.accesses.items():
            operation, size = re.fullmatch(r"([A-Z]+)(\d+)", key).groups()
            if operation.startswith(direction) and int(size) == width:
                total += count
        return total

    def vector_accesses(self, direction: str = "") -> int:
        """16-byte global accesses: loads for direction 'LD', stores for 'ST', both for ''."""
        return self._count(direction, 16)

    def loads_of(self, width: int) -> int:
        return self._count("LD", width)

    def wide_loads(self) -> int:
        """Global loads of 8 or 16 bytes (a pack of logits narrower than 16 bytes counts too)."""
        return self._count("LD", 8) + self._count("LD", 16)


def _basic_blocks(instructions: list[Instruction]) -> tuple[list[int], list[list[int]]]:
    """Basic blocks of a function: their first instructions (indices) and each block's successors."""
    index_of = {instruction.address: i for i, instruction in enumerate(instructions)}
    leaders = {0}
    for i, instruction in enumerate(instructions):
        target = instruction.branch_target()
        if target is not None and target in index_of:
            leaders.add(index_of[target])
        if instruction.ends_block() and i + 1 < len(instructions):
            leaders.add(i + 1)
    starts = sorted(leaders)
    block_of = {start: b for b, start in enumerate(starts)}
    successors = []
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instructions)
        last = instructions[end - 1]
        target = last.branch_target()
        targets = []
        if target is not None and target in index_of:
            targets.append(block_of[index_of[target]])
        if last.falls_through() and end < len(instructions):
            targets.append(b + 1)
        successors.append(targets)
    return starts, successors


def _dominators(successors: list[list[int]]) -> tuple[list[int], dict[int, int], dict[int, list[int]]]:
    """Reverse post-order of the blocks reachable from block 0, their immediate dominators (Cooper, Harvey,
    Kennedy: 'A Simple, Fast Dominance Algorithm') and their predecessors."""
    order, seen, stack = [], {0}, [(0, iter(successors[0]))]
    while stack:
        block, children = stack[-1]
        child = next(children, None)
        if child is None:
            order.append(block)
            stack.pop()
        elif child not in seen:
            seen.add(child)
            stack.append((child, iter(successors[child])))
    order.reverse()
    position = {block: p for p, block in enumerate(order)}
    predecessors: dict[int, list[int]] = {block: [] for block in order}
    for block in order:
        for child in successors[block]:
            predecessors[child].append(block)
    idom = {0: 0}
    changed = True
    while changed:
        changed = False
        for block in order[1:]:
            processed = [p for p in predecessors[block] if p in idom]
            new = processed[0]
            for other in processed[1:]:
                a, b = new, other
                while a != b:
                    while position[a] > position[b]:
                        a = idom[a]
                    while position[b] > position[a]:
                        b = idom[b]
                new = a
            if idom.get(block) != new:
                idom[block] = new
                changed = True
    return order, idom, predecessors


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Natural loops: for each branch back to a block that dominates it, the blocks that reach the branch
    without passing through that header (branches back to one header make one loop). Subroutines (reached only
    by CALL) and code after the last EXIT that nothing branches to are not part of the kernel's CFG."""
    if not instructions:
        return []
    starts, successors = _basic_blocks(instructions)
    order, idom, predecessors = _dominators(successors)
    ends = starts[1:] + [len(instructions)]
    sizes = [end - start for start, end in zip(starts, ends)]

    def dominates(a: int, b: int) -> bool:
        while b != a and idom[b] != b:
            b = idom[b]
        return a == b

    sources_of: dict[int, set[int]] = {}
    for block in order:
        for child in successors[block]:
            if dominates(child, block):
                sources_of.setdefault(child, set()).add(block)
    bodies: dict[int, set[int]] = {}
    for header, sources in sources_of.items():
        body, work = {header} | sources, list(sources - {header})
        while work:
            for parent in predecessors[work.pop()]:
                if parent not in body:
                    body.add(parent)
                    work.append(parent)
        bodies[header] = body

    accesses: dict[int, dict[str, int]] = {}
    shared_loads: dict[int, dict[int, int]] = {}
    for header, body in bodies.items():
        counts: dict[str, int] = {}
        shared: dict[int, int] = {}
        for block in body:
            for instruction in instructions[starts[block]:ends[block]]:
                if instruction.operation in GLOBAL_ACCESSES:
                    key = f"{instruction.operation}{instruction.access_bytes()}"
                    counts[key] = counts.get(key, 0) + 1
                elif instruction.operation == "LDS":
                    shared[instruction.access_bytes()] = shared.get(instruction.access_bytes(), 0) + 1
        accesses[header] = counts
        shared_loads[header] = shared
    cfg = _ControlFlow(instructions, starts, ends, successors, predecessors, list(bodies.values()))
    loops = []
    for header, body in bodies.items():
        static = sum(sizes[b] for b in body)
        # The warp path of the loops that touch global memory, where the hot loops are; the others: static.
        warp_path = _costliest_warp_iteration(cfg, header, body, sizes) if accesses[header] else None
        loops.append(Loop(header=instructions[starts[header]].address, static=static,
                          min_path=_shortest_iteration(header, body, sources_of[header], successors, sizes),
                          warp_path=static if warp_path is None else warp_path,
                          accesses=accesses[header],
                          contains_memory_loop=any(other != header and other in body and accesses[other]
                                                   for other in bodies),
                          shared_loads=shared_loads[header]))
    return loops


# Uniform conditions a loop body may test for its warp path to be computed by enumerating their outcomes (2^n
# walks of the body); beyond it the warp path is the static count.
MAX_UNIFORM_CONDITIONS = 12
PREDICATE = re.compile(r"!?(U?P[T\d]+)")
# A register or predicate operand: its modifiers (-, |, ~, !, .reuse) and its name (R12, UR4, P0, UP1).
NAMED_OPERAND = re.compile(r"^([-!~]?\|?)(U?R\d+|U?P\d+)\|?(\.reuse)?\|?$")
# Source operands every lane holds alike that name no register: zero registers, true predicates, constant-bank
# operands, immediates (optionally negated or absolute).
CONSTANT_OPERAND = re.compile(r"^[-!~]?\|?(URZ|RZ|UPT|PT|c\[0x[0-9a-f]+\]\[0x[0-9a-f]+\]|"
                              r"[-+]?(0x[0-9a-f]+|\d[\d.e+-]*|INF|QNAN))\|?$", re.IGNORECASE)
# Instructions whose result may differ between lanes whatever their operands: loads other than of constants
# (any LD* but LDC / ULDC, checked apart), the thread's own registers, exchanges between lanes, atomics, votes
# into a register (a vote into a predicate is the same in every lane: uniform_value).
PER_LANE_OPERATIONS = ("S2R", "CS2R", "SHFL", "ATOM", "ATOMS", "ATOMG", "MATCH", "VOTE", "B2R", "BMOV")
# Instructions that write predicates, and how many of their leading predicate operands (after a register
# destination, if any) they write: ISETP P0, PT, ...; IADD3 R4, P0, P1, ...; VOTE.ANY P0, P0 (the second is its
# source); R2P writes them all; the uniform-datapath forms (UISETP UP0, UPT, ...) alike. SHFL and the predicate
# form of LOP3 write a register after their predicate (SHFL.BFLY PT, R0, ...; LOP3.LUT P0, R4, ...). The
# analysis assumes no other instruction writes a predicate.
PREDICATE_WRITERS = {"ISETP": 2, "FSETP": 2, "DSETP": 2, "HSETP2": 2, "PLOP3": 2, "IADD3": 2, "LEA": 2, "IMAD": 2,
                     "LOP3": 1, "SHFL": 1, "VOTE": 1, "VOTEU": 1, "FCHK": 1}
# Instructions whose first operand is not a destination (CALL: _operand_roles counts it as writing everything).
NO_DESTINATION = ("BRA", "BRX", "JMX", "EXIT", "RET", "BSSY", "BSYNC", "WARPSYNC", "BAR", "MEMBAR", "NOP",
                  "DEPBAR", "ERRBAR", "CCTL", "YIELD", "RED", "FENCE", "LDGDEPBAR", "ARRIVES")
# Double-precision arithmetic: register pairs in and out (D2F, D2I and DSETP write one register or predicates).
DOUBLE_OPERATIONS = ("DADD", "DMUL", "DFMA", "DMNMX", "DSETP", "D2F", "D2I")
# Copies of one operand (MOV R0, UR4; IMAD.MOV.U32 R0, RZ, RZ, c[0x0][0x210]): named by what they copy.
COPIES = ("MOV", "UMOV", "IMAD.MOV", "IMAD.MOV.U32", "UIMAD.MOV", "UIMAD.MOV.U32")


def _operands(instruction: Instruction) -> list[str]:
    parts = GUARD.sub("", instruction.text).split(None, 1)
    return [operand.strip() for operand in parts[1].split(",")] if len(parts) > 1 else []


def _result_width(instruction: Instruction) -> int:
    """Registers a register result spans: a pair for 64-bit results (any 64 in the suffixes: F2I.S64 writes a
    pair, SHF.R.U64 one register, so uniform_value does not trust the second of such a 'pair'), four for a
    16-byte load."""
    suffixes = instruction.opcode.split(".")[1:]
    if "128" in suffixes:
        return 4
    if any("64" in suffix for suffix in suffixes) or "WIDE" in suffixes or instruction.operation == "CS2R" or (
            instruction.operation in DOUBLE_OPERATIONS and instruction.operation not in ("D2F", "D2I")):
        return 2
    return 1


def _reads_pairs(instruction: Instruction) -> bool:
    """Whether register sources may be 64-bit pairs (double arithmetic, 64-bit conversions and IMAD.WIDE's
    addend): uniform_value then traces both registers of each."""
    suffixes = instruction.opcode.split(".")[1:]
    return instruction.operation in DOUBLE_OPERATIONS or any("64" in suffix for suffix in suffixes) or \
        "WIDE" in suffixes


def _operand_roles(instruction: Instruction) -> tuple[list[str], list[str], list[str]]:
    """The registers (R12, UR4) and predicates (P0, UP1; '*': all of them) an instruction writes, in operand
    order, and its source operands (those after its destinations). A CALL writes everything (its subroutine's
    results and clobbers)."""
    operands = _operands(instruction)
    operation = instruction.operation
    if operation in NO_DESTINATION or operation.startswith("ST"):
        return [], [], operands
    if operation == "CALL":
        return ["*"], ["*"], []
    if operation == "R2P":
        return [], ["*"], operands[1:]
    if operation in ("SHFL", "LOP3", "ULOP3") and operands and PREDICATE.fullmatch(operands[0]):
        register_at = 1  # SHFL.BFLY PT, R0, ...; LOP3.LUT P0, R4, ...: the predicate first
    else:
        register_at = 0
    registers = []
    if len(operands) > register_at and (named := re.fullmatch(r"(U?R)(\d+)", operands[register_at])):
        registers = [f"{named.group(1)}{int(named.group(2)) + k}" for k in range(_result_width(instruction))]
    if register_at:
        return registers, [PREDICATE.fullmatch(operands[0]).group(1)], operands[2:]
    rest = operands[1:] if registers or operands[:1] in (["RZ"], ["URZ"]) else operands
    count = PREDICATE_WRITERS.get(operation, PREDICATE_WRITERS.get(operation.removeprefix("U"), 0))
    predicates = []
    for operand in rest[:count]:
        named = PREDICATE.fullmatch(operand)
        if not named or operand.startswith("!"):
            break
        predicates.append(named.group(1))
    return registers, predicates, rest[len(predicates):]


class _ControlFlow:
    """A function's blocks, with the definitions of its registers and predicates looked up on demand (and
    remembered: a hot loop's branches test the same values many times)."""

    def __init__(self, instructions: list[Instruction], starts: list[int], ends: list[int],
                 successors: list[list[int]], predecessors: dict[int, list[int]], loop_bodies: list[set[int]]):
        self.instructions, self.starts, self.ends = instructions, starts, ends
        self.successors, self.predecessors = successors, predecessors
        self.loop_bodies = loop_bodies
        self._written: dict[int, frozenset[str]] = {}
        self._definitions: dict[tuple[int, str], int | None] = {}
        self._values: dict[tuple[int, str, int], tuple | None] = {}

    def block_of(self, index: int) -> int:
        return bisect.bisect_right(self.starts, index) - 1

    def writes(self, index: int, name: str) -> bool:
        if index not in self._written:
            registers, predicates, _ = _operand_roles(self.instructions[index])
            self._written[index] = frozenset(registers + predicates)
        written = self._written[index]
        return name in written or "*" in written

    def reaching_definition(self, index: int, name: str) -> int | None:
        """The instruction that sets register or predicate `name` for instruction `index`: the last one before
        it on every path that leads there (None when paths bring different ones, or one brings none)."""
        if (index, name) not in self._definitions:
            self._definitions[(index, name)] = self._find_definition(index, name)
        return self._definitions[(index, name)]

    def _find_definition(self, index: int, name: str) -> int | None:
        definitions: set[int] = set()
        visited: set[int] = set()
        # (block, the last instruction to look at): the rest of index's own block first.
        work = [(self.block_of(index), index - 1)]
        while work:
            block, position = work.pop()
            while position >= self.starts[block]:
                if self.writes(position, name):
                    definitions.add(position)
                    break
                position -= 1
            else:
                parents = self.predecessors.get(block, [])
                if not parents or len(visited) > 256:
                    return None
                for parent in parents:
                    if parent not in visited:
                        visited.add(parent)
                        work.append((parent, self.ends[parent] - 1))
        return definitions.pop() if len(definitions) == 1 else None

    def uniform_value(self, index: int, name: str, depth: int = 0) -> tuple | None:
        """A key naming the value register or predicate `name` holds at instruction `index` when every lane of
        a warp holds the same; None otherwise (or when unsure). A value set by an unguarded instruction from
        uniform operands alone is named by its opcode and their keys (equal tests of one value are one
        condition; copies and constant loads are named by what they hold); a uniform register or predicate
        (UR4, UP0) that cannot be named so, by its definition (or by this use when it has none). Lanes run in
        lockstep but for loops: a value a loop sets and its code after the loop reads is per-lane (lanes may
        leave the loop at different iterations)."""
        if (index, name, depth) not in self._values:
            self._values[(index, name, depth)] = self._find_value(index, name, depth)
        return self._values[(index, name, depth)]

    def _find_value(self, index: int, name: str, depth: int) -> tuple | None:
        definition = self.reaching_definition(index, name) if depth <= 8 else None
        unnamed = ("uniform", index if definition is None else definition, name) if name.startswith("U") else None
        if definition is None:
            return unnamed
        instruction = self.instructions[definition]
        registers, predicates, sources = _operand_roles(instruction)
        if instruction.guarded or "*" in registers or "*" in predicates:
            return unnamed
        if not name.startswith("U") and any(self.block_of(definition) in body and self.block_of(index) not in body
                                            for body in self.loop_bodies):
            return None  # set in a loop, read after it
        if instruction.opcode in ("VOTE.ANY", "VOTE.ALL") and predicates:
            return ("vote", definition)  # the same in every lane, whatever its source
        if instruction.operation in PER_LANE_OPERATIONS or (instruction.operation.startswith("LD")
                                                           and instruction.operation not in ("LDC", "ULDC")):
            return unnamed
        if name in registers and name != registers[0] and not (
                {"64", "WIDE"} & set(instruction.opcode.split(".")[1:]) or instruction.operation in ("DADD", "DMUL",
                                                                                                     "DFMA", "CS2R")):
            return unnamed  # a pair only by its type suffix: not sure that it writes this register
        if instruction.operation in ("LDC", "ULDC") and len(sources) == 1:
            return ("constant", sources[0], (registers + predicates).index(name))
        opcode = instruction.opcode.removeprefix("U") if instruction.operation.startswith("U") else instruction.opcode
        key: list = [opcode]
        for operand in sources:
            named = NAMED_OPERAND.fullmatch(operand)
            if named:
                number = int(re.sub(r"\D", "", named.group(2)))
                kind = re.sub(r"\d", "", named.group(2))
                halves = [number, number + 1] if _reads_pairs(instruction) and kind in ("R", "UR") else [number]
                inner = tuple(self.uniform_value(definition, f"{kind}{half}", depth + 1) for half in halves)
                if None in inner:
                    return unnamed
                key.append((named.group(1), inner if len(inner) > 1 else inner[0]))
            elif CONSTANT_OPERAND.fullmatch(operand):
                key.append({"URZ": "RZ", "UPT": "PT"}.get(operand, operand))
            else:
                return unnamed
        if instruction.opcode in COPIES and len(key) > 1 and key[1:-1] in ([], ["RZ", "RZ"]):
            copied = key[-1]  # the copied value itself: a constant as LDC loads it, or a traced value
            if isinstance(copied, str) and copied.startswith("c["):
                return ("constant", copied, 0)
            if isinstance(copied, tuple) and copied[0] == "":
                return copied[1]
        if opcode == "PLOP3.LUT" and key[1:4].count("PT") == 2 and key[4:] == ["0x80", "0x0"]:
            copied = [operand for operand in key[1:4] if operand != "PT"][0]
            if isinstance(copied, tuple) and copied[0] == "":
                return copied[1]  # P = Q & PT & PT: a copy of Q
        # Which of the definition's results this is (ISETP writes two predicates, IMAD.WIDE a register pair).
        return tuple(key) + ((registers + predicates).index(name),)


def _branch_condition(cfg: _ControlFlow, index: int) -> tuple[tuple, bool] | None:
    """(condition key, negated) of the conditional branch at `index` when its guard is the same in every lane;
    None for a branch that may split the warp (and for BRA.DIV, on the warp's own divergence, and a BRA with a
    predicate operand: left to the static count)."""
    instruction = cfg.instructions[index]
    guard = GUARD.match(instruction.text)
    if guard is None or instruction.opcode != "BRA" or len(_operands(instruction)) != 1:
        return None
    literal = guard.group(0).strip()[1:]
    key = cfg.uniform_value(index, PREDICATE.fullmatch(literal).group(1))
    return None if key is None else (key, literal.startswith("!"))


def _costliest_warp_iteration(cfg: _ControlFlow, header: int, body: set[int], sizes: list[int]) -> int | None:
    """The warp path of a loop (module docstring): the most instructions issued from the header to the branches
    back to it, over the outcomes of the uniform conditions its branches test; None (the static count) when
    they test none, or more than MAX_UNIFORM_CONDITIONS."""
    decided: dict[int, tuple[int, tuple, bool]] = {}  # block -> (its branch target, the condition, negated)
    for block in body:
        last = cfg.ends[block] - 1
        instruction = cfg.instructions[last]
        if instruction.operation != "BRA" or not instruction.falls_through() or len(set(cfg.successors[block])) != 2:
            continue
        condition = _branch_condition(cfg, last)
        if condition is not None:
            target = next(b for b in cfg.successors[block]
                          if cfg.instructions[cfg.starts[b]].address == instruction.branch_target())
            decided[block] = (target, *condition)
    conditions = sorted({key for _, key, _ in decided.values()}, key=repr)
    if not conditions or len(conditions) > MAX_UNIFORM_CONDITIONS:
        return None
    costliest = 0
    for outcome in range(1 << len(conditions)):
        holds = {key: bool(outcome >> bit & 1) for bit, key in enumerate(conditions)}
        seen, work = {header}, [header]
        while work:
            block = work.pop()
            children = cfg.successors[block]
            if block in decided:
                target, key, negated = decided[block]
                taken = holds[key] != negated
                children = [child for child in children if (child == target) == taken]
            for child in children:
                if child in body and child not in seen:
                    seen.add(child)
                    work.append(child)
        costliest = max(costliest, sum(sizes[b] for b in seen))
    return costliest


def _shortest_iteration(header: int, body: set[int], sources: set[int], successors: list[list[int]],
                        sizes: list[int]) -> int:
    """Instructions on the shortest path header -> ... -> a back-edge source (Dijkstra over the body; a nested
    loop is passed through once)."""
    distance = {header: sizes[header]}
    queue = [(sizes[header], header)]
    while queue:
        cost, block = heapq.heappop(queue)
        if cost > distance[block]:
            continue
        if block in sources:
            return cost
        for child in successors[block]:
            if child in body and child != header and cost + sizes[child] < distance.get(child, math.inf):
                distance[child] = cost + sizes[child]
                heapq.heappush(queue, (distance[child], child))
    raise AssertionError("a back-edge source is always reachable from its loop's header")


# ------------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepModel:
    """What one iteration of a kernel's hot loop does, from the kernel's source.

    loop_kinds: the innermost loops that together process an element: 'read' (16-byte global loads,
    no 16-byte stores), 'write' (16-byte stores), 'vector' (any 16-byte access), 'packed' (an 8- or 16-byte
    global load), 'async_copy' (16-byte copies from global to shared memory, LDGSTS), 'shared_vector' (16-byte
    loads from shared memory and no 16-byte global access or store; versions of one source loop are alternatives,
    the costliest taken) or 'scalar' (any access).
    elements: elements per iteration; 0 means: the number of `counted_load_bytes`-wide loads in the loop
    (a scalar loop the compiler unrolled); a 'shared' kind stands for every loop that loads
    `shared_load_bytes`-wide elements from shared memory without 16-byte or store accesses to global memory (the
    per-row loops of a tile kernel; unrolled versions and remainders of one source loop each count), all added,
    each handling as many elements as it has such loads ('shared_vector': times `elements_per_shared_load`).
    dram_bytes: bytes each element costs in DRAM traffic.
    vector_accesses: 16-byte accesses every selected loop must hold (checks `elements`)."""
    loop_kinds: tuple[str, ...]
    elements: int
    dram_bytes: int
    what: str
    vector_accesses: int = 0
    counted_load_bytes: int = 0
    shared_load_bytes: int = 0  # 'shared': the element width of the shared-memory loads that count elements
    elements_per_shared_load: int = 0  # 'shared_vector': elements one 16-byte shared-memory load brings
    elements_per_vector: int = 0  # when set, a global loop handles this many elements per 16-byte load ('read')
                                  # or store ('write'), not `elements`: the loops the compiler unrolled


def sweep_model(kernel: Kernel) -> SweepModel | None:
    """The hot-loop model of a kernel that sweeps element tensors; None for the O(rows) kernels (per-block
    partial sums, chunk merges, the target-weight pre-pass)."""
    op = kernel.name.split("/")[0]
    base, arguments = split_template(kernel.short)
    if op == "cross_entropy" and base == "forward_kernel":
        scalar, _, writes_gradient, _ = arguments
        size = TYPE_SIZES[scalar]
        if writes_gradient == "true":
            return SweepModel(("read", "write"), 16 // size, 2 * size, vector_accesses=1,
                              elements_per_vector=16 // size,
                              what="online-softmax scan + gradient sweep of one 16-byte pack of logits (the sweep "
                                   "re-reads it from L1/L2); DRAM: logits read, gradient written")
        return SweepModel(("read",), 16 // size, size, vector_accesses=1, elements_per_vector=16 // size,
                          what="online-softmax scan of one 16-byte pack of logits; DRAM: logits read")
    if op == "cross_entropy" and base == "block_row_forward_kernel":
        scalar, writes_gradient, _ = arguments
        size = TYPE_SIZES[scalar]
        pack = 16 // size
        if writes_gradient == "true":
            return SweepModel(("async_copy", "shared_vector", "write"), pack, 2 * size, vector_accesses=1,
                              elements_per_shared_load=pack, elements_per_vector=pack,
                              what="a 16-byte cp.async of logits into shared memory, the online-softmax scan "
                                   "there and the gradient sweep from there (the part of a row beyond the shared "
                                   "memory is re-read, the loop taken as the costlier); DRAM: logits read, "
                                   "gradient written. Resident blocks here count registers and static shared "
                                   "memory; the staged row (up to 227 KB) leaves fewer")
        return SweepModel(("read",), pack, size, vector_accesses=1, elements_per_vector=pack,
                          what="online-softmax scan of 16-byte packs of logits, 4 loads in flight (2 with extra "
                               "terms); DRAM: logits read")
    if op == "cross_entropy" and base == "backward_kernel":
        size = TYPE_SIZES[arguments[0]]
        return SweepModel(("write",), 16 // size, 2 * size, vector_accesses=2, elements_per_vector=16 // size,
                          what="gradient of one 16-byte pack of logits; DRAM: logits read, gradient written")
    if op == "cross_entropy" and base in ("tile_forward_kernel", "tile_backward_kernel"):
        size = TYPE_SIZES[arguments[0]]
        if base == "tile_forward_kernel" and arguments[1] == "false":
            return SweepModel(("read", "shared"), 16 // size, size, vector_accesses=1, shared_load_bytes=size,
                              elements_per_vector=16 // size,
                              what="a 16-byte copy of logits into the shared-memory tile + the row loops over "
                                   "shared memory (max and argmax, exponentials); DRAM: logits read")
        return SweepModel(("read", "shared", "write"), 16 // size, 2 * size, vector_accesses=1,
                          shared_load_bytes=size, elements_per_vector=16 // size,
                          what="16-byte copies of logits into the tile and of the gradient out + the row loops "
                               "over shared memory (" + ("max and argmax, exponentials, " if base == "tile_forward_kernel"
                                                         else "") + "gradient); DRAM: logits read, gradient written")
    if op == "correlation" and base in ("reduce_items_kernel", "map_items_kernel"):
        # Task<T> or GradientTask<T, kPerStepUpstream>
        task, scalar, per_step_upstream = re.match(r"(\w+)<(\w+)(?:, (\w+))?>", arguments[1]).groups()
        size = TYPE_SIZES[scalar]
        pack = 16 // size
        if task == "MomentsTask":
            return SweepModel(("read",), pack, 2 * size, vector_accesses=2,
                              what="moments of one 16-byte pack of x and of y (the 2-pass forward's second sweep "
                                   "is GradientTask's loop); DRAM: x, y read")
        if task == "UpstreamSumsTask":
            return SweepModel(("read",), pack, 3 * size, vector_accesses=3,
                              what="per-step upstream sums over one pack of x, y, grad_output; DRAM: all three read")
        if task == "SequenceWeightTask":
            return SweepModel(("scalar",), 0, 1, counted_load_bytes=1,
                              what="valid-step count, one mask byte per step (unrolled); DRAM: mask read")
        if task == "GradientTask" and per_step_upstream == "true":
            return SweepModel(("write",), pack, 4 * size, vector_accesses=4,
                              what="gradient of one pack of steps; DRAM: x, y, grad_output read, one gradient "
                                   "written")
        if task == "GradientTask":
            return SweepModel(("write",), pack, 3 * size, vector_accesses=3,
                              what="gradient of one pack of steps; DRAM: x, y read, one gradient written")
        if task == "PerStepLossTask":
            return SweepModel(("write",), pack, 3 * size, vector_accesses=3,
                              what="per-step losses of one pack; DRAM: x, y read, losses written")
    if op == "bce" and base == "flat_kernel":
        # flat_kernel<Pass, T, target_t, Focusing, kWeighted>: the weighted kernels' loop also holds the weight /
        # pos_weight / grad_loss sub-pack loads in every form (packs, broadcast, elements); their DRAM bytes are
        # counted as one element-shaped float weight (periodic (L,) or per-row weights come from L1 / L2).
        # ASL steps one sub-pack (kSubPackElements: a 16-byte pack of the accumulation type) with loads and
        # stores of that many elements; the other formulas kFlatAlignmentElements with 16-byte ones.
        bce_pass, scalar, target, focusing, weighted = arguments
        size, target_size = TYPE_SIZES[scalar], TYPE_SIZES[target]
        written = 0 if bce_pass == "Forward" else size
        accumulation_size = 8 if scalar == "fp64" else 4
        weight_bytes = accumulation_size if weighted == "true" else 0
        if focusing == "asl":
            elements = 16 // accumulation_size  # kFlatStepElements: kSubPackElements
            loop_kind, vector_accesses = "packed", 0
            accesses = "kSubPackElements elements: loads of that many logits and targets (8-16 bytes of logits)"
        else:
            elements = 16 // min(size, target_size)  # kFlatStepElements: kFlatAlignmentElements
            loop_kind, vector_accesses = "vector", elements * (size + target_size + written) // 16
            accesses = ("kFlatAlignmentElements elements: 16-byte loads of logits and target"
                        + (", 16-byte stores of the gradient" if written else ""))
        return SweepModel((loop_kind,), elements, size + target_size + written + weight_bytes,
                          vector_accesses=vector_accesses,
                          what=accesses
                               + {"plain": ", plain BCE formulas", "focal": ", focal formulas (no clip)",
                                  "asl": ", ASL formulas (clip)"}[focusing]
                               + (", weight / pos_weight / grad_loss sub-pack loads" if weighted == "true" else "")
                               + "; DRAM: logits, target read" + (", one float weight read" if weight_bytes else "")
                               + (", gradient written" if written else ""))
    if op == "bce" and base == "sparse_rows_kernel":
        # sparse_rows_kernel<Pass, T, Focusing, kWeighted>: the sweep of negatives (the patches of the K
        # positives per row are outside it); a pack per 16-byte logits load (the compiler unrolls some by 2).
        bce_pass, scalar, focusing, weighted = arguments
        size = TYPE_SIZES[scalar]
        written = 0 if bce_pass == "Forward" else size
        return SweepModel(("vector",), 16 // size, size + written, vector_accesses=1 + (written > 0),
                          elements_per_vector=16 // size,
                          what="one 16-byte pack of a row's logits, every element a negative"
                               + {"plain": ", plain BCE formulas", "focal": ", focal formulas (no clip)",
                                  "asl": ", ASL formulas (clip)"}[focusing]
                               + (", weight / grad_loss loads" if weighted == "true" else "")
                               + "; DRAM: logits read" + (", gradient written" if written else ""))
    if op == "bce" and base == "strided_kernel":
        # strided_kernel<Pass, T, target_t, Focusing, kWeighted>: a chunk of kStridedChunk elements of a row per
        # iteration (8; 4 with weights or for ASL), the offsets of its row by one multiply-high division per
        # dimension (up to kMaxLayoutDims, each counted once); element loads and stores, unrolled; weight bytes as
        # flat_kernel's.
        bce_pass, scalar, target, focusing, weighted = arguments
        size, target_size = TYPE_SIZES[scalar], TYPE_SIZES[target]
        written = 0 if bce_pass == "Forward" else size
        weight_bytes = (8 if scalar == "fp64" else 4) if weighted == "true" else 0
        elements = 4 if focusing == "asl" or weighted == "true" else 8
        return SweepModel(("scalar",), elements, size + target_size + written + weight_bytes,
                          what=f"a chunk of {elements} elements of a row; the offsets of its row by a multiply-high "
                               "division per dimension; DRAM: logits, target read"
                               + (", gradient written" if written else "")
                               + (", a weight in the accumulation type" if weight_bytes else ""))
    return None


def _loop_matches(loop: Loop, kind: str) -> bool:
    if kind == "read":
        return loop.vector_accesses("LD") > 0 and loop.vector_accesses("ST") == 0
    if kind == "write":
        return loop.vector_accesses("ST") > 0
    if kind == "vector":
        return loop.vector_accesses() > 0
    if kind == "packed":
        return loop.wide_loads() > 0
    if kind == "async_copy":
        return any(key.startswith("LDGSTS") for key in loop.accesses)
    if kind == "shared_vector":
        return (loop.shared_loads.get(16, 0) > 0 and loop.vector_accesses() == 0
                and not any(key.startswith("ST") for key in loop.accesses))
    if kind == "shared":  # no copy to or from global memory (scalar loads of cost or weight rows are fine)
        return (bool(loop.shared_loads) and loop.vector_accesses() == 0
                and not any(key.startswith("ST") for key in loop.accesses))
    return bool(loop.accesses)


@dataclass
class HotLoops:
    """The loops that make up one element's work (one per loop kind of the model), their cost per element and
    per DRAM byte, and the issue-bound fraction of the copy bandwidth, from the warp path (the budget's measure)
    and the min path; the static count per element and byte beside them."""
    headers: list[str]
    static: list[int]
    warp_path: list[int]
    min_path: list[int]
    elements: list[int]
    instructions_per_element: float
    min_path_instructions_per_element: float
    static_instructions_per_element: float
    dram_bytes_per_element: int
    instructions_per_byte: float
    min_path_instructions_per_byte: float
    static_instructions_per_byte: float
    bandwidth_fraction: float
    min_path_bandwidth_fraction: float
    what: str
    checks: list[str] = field(default_factory=list)  # where the loop found disagrees with the model


def hot_loops(loops: list[Loop], model: SweepModel) -> HotLoops | None:
    """For each loop kind of the model, the hot loop: among the innermost global-memory loops of that kind
    (several when the compiler made versions of one source loop, e.g. with and without a cost row), the one
    with the most instructions per element on its warp path. None when a kind has no loop (the model does not
    fit)."""
    innermost = [loop for loop in loops if loop.accesses and not loop.contains_memory_loop]

    def elements_of(loop: Loop, kind: str) -> int:
        if kind == "shared":
            return loop.shared_loads.get(model.shared_load_bytes, 0)
        if kind == "shared_vector":
            return loop.shared_loads.get(16, 0) * model.elements_per_shared_load
        if model.elements_per_vector:
            return loop.vector_accesses("ST" if kind == "write" else "LD") * model.elements_per_vector
        return model.elements or loop.loads_of(model.counted_load_bytes)

    chosen = []
    for kind in model.loop_kinds:
        pool = loops if kind in ("shared", "shared_vector") else innermost  # may read no global memory
        candidates = [(loop, elements_of(loop, kind)) for loop in pool if _loop_matches(loop, kind)]
        candidates = [(loop, elements) for loop, elements in candidates if elements > 0]
        if not candidates:
            return None
        if kind == "shared":  # every row loop of the tile, one after the other
            chosen += sorted(candidates, key=lambda candidate: candidate[0].header)
        else:
            chosen.append(max(candidates, key=lambda candidate: (candidate[0].warp_path / candidate[1],
                                                                 candidate[0].static / candidate[1],
                                                                 -candidate[0].header)))
    per_element = sum(loop.warp_path / elements for loop, elements in chosen)
    min_per_element = sum(loop.min_path / elements for loop, elements in chosen)
    static_per_element = sum(loop.static / elements for loop, elements in chosen)
    per_byte, min_per_byte = per_element / model.dram_bytes, min_per_element / model.dram_bytes
    checks = [f"loop {hex(loop.header)} has {loop.vector_accesses()} 16-byte accesses, the model expects at least "
              f"{model.vector_accesses}" for loop, _ in chosen
              if not _loop_matches(loop, "shared") and not _loop_matches(loop, "shared_vector")
              and loop.vector_accesses() < model.vector_accesses]
    return HotLoops([hex(loop.header) for loop, _ in chosen], [loop.static for loop, _ in chosen],
                    [loop.warp_path for loop, _ in chosen], [loop.min_path for loop, _ in chosen],
                    [elements for _, elements in chosen], per_element, min_per_element, static_per_element,
                    model.dram_bytes, per_byte, min_per_byte, static_per_element / model.dram_bytes,
                    min(1.0, INSTRUCTIONS_PER_BYTE_BUDGET / per_byte),
                    min(1.0, INSTRUCTIONS_PER_BYTE_BUDGET / min_per_byte), model.what, checks)


# ------------------------------------------------------------------------------------------------- report


@dataclass
class KernelReport:
    name: str
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    threads_per_block: int
    blocks_per_sm: int
    blocks_per_sm_limit: str
    on_fp64_path: bool
    hot_loops: HotLoops | None

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    @property
    def misses_register_target(self) -> bool:
        """Issue 15: float32 / bf16 / fp16 kernels use <= 64 registers at 256 threads (>= 4 blocks per SM)."""
        return not self.on_fp64_path and self.blocks_per_sm < BLOCKS_PER_SM_TARGET


def analyse(extension: Path, arch: str = "sm_90") -> list[KernelReport]:
    kernels = read_resource_usage(extension, arch)
    sass = read_sass(extension, arch)
    reports = []
    for kernel in kernels:
        instructions = sass[(kernel.source, kernel.mangled)]
        stores, loads = local_memory_traffic(instructions)
        threads = threads_per_block(kernel)
        blocks, limit = resident_blocks(kernel.registers, kernel.shared_bytes, threads)
        model = sweep_model(kernel)
        reports.append(KernelReport(kernel.name, kernel.registers, kernel.stack_bytes, kernel.local_bytes, stores,
                                    loads, kernel.shared_bytes, threads, blocks, limit, kernel.on_fp64_path,
                                    hot_loops(find_loops(instructions), model) if model else None))
    return sorted(reports, key=report_order)


def report_order(report: KernelReport) -> tuple:
    """Ops in OPS order, then kernel names with their numbers compared as numbers."""
    op, kernel = report.name.split("/", 1)
    op_rank = list(OPS.values()).index(op) if op in OPS.values() else len(OPS)
    return op_rank, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", kernel)]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPOSITORY)) if resolved.is_relative_to(REPOSITORY) else str(path)


def markdown(reports: list[KernelReport], extension: Path, arch: str) -> str:
    spilling = [r for r in reports if r.spills]
    register_misses = [r for r in reports if r.misses_register_target]
    lines = [
        f"SASS report: {_shown(extension)} ({arch}, cuobjdump {cuobjdump_version()}), {len(reports)} kernels.",
        f"Model: H100, {ISSUE_MODEL['sms']} SMs x {ISSUE_MODEL['schedulers_per_sm']} schedulers x 1 warp-instruction"
        f"/clock x {ISSUE_MODEL['clock_hz'] / 1e9:g} GHz = {ISSUE_RATE / 1e12:.1f}e12 thread-instructions/s against "
        f"{ISSUE_MODEL['copy_bandwidth_bytes_per_s'] / 1e12:g} TB/s copy bandwidth: memory-bound only under "
        f"{INSTRUCTIONS_PER_BYTE_BUDGET:.1f} instructions per byte; est. BW = min(1, "
        f"{INSTRUCTIONS_PER_BYTE_BUDGET:.1f} / instr per byte), on the warp path (min path in parentheses); "
        "'hot loop instr': static count, warp path (min path).",
        f"Blocks/SM at the launch size (256 threads) under {H100['registers_per_sm']} registers, "
        f"{H100['max_threads_per_sm']} threads, {H100['shared_memory_per_sm'] // 1024} KB shared memory and "
        f"{H100['max_blocks_per_sm']} blocks per SM; in parentheses the limit that decides it.",
        f"Of these kernels, {len(spilling)} spill (STL/LDL) and {len(register_misses)} on the float32/bf16/fp16 "
        f"paths use more than {REGISTER_TARGET} registers (< {BLOCKS_PER_SM_TARGET} blocks/SM).",
        "",
        "| kernel | regs | spill st/ld B | smem B | blocks/SM | hot loop instr | elem/iter | instr/elem | DRAM B/elem "
        "| instr/B | est. % copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        spill = f"{r.spill_store_bytes}/{r.spill_load_bytes}" if r.spills else "0"
        blocks = f"{r.blocks_per_sm} ({r.blocks_per_sm_limit})"
        loops = r.hot_loops
        if loops is None:
            loop_columns = ["-"] * 6
        else:
            loop_columns = [
                "+".join(map(str, loops.static)) + ", " + "+".join(map(str, loops.warp_path)) + " ("
                + "+".join(map(str, loops.min_path)) + ")",
                "/".join(sorted(set(map(str, loops.elements)))),
                f"{loops.instructions_per_element:.0f} ({loops.min_path_instructions_per_element:.0f})",
                str(loops.dram_bytes_per_element),
                f"{loops.instructions_per_byte:.1f} ({loops.min_path_instructions_per_byte:.1f})",
                f"{_percent(loops.bandwidth_fraction)} ({_percent(loops.min_path_bandwidth_fraction)})"
                + (" ?" if loops.checks else ""),
            ]
        lines.append(f"| `{r.name}` | {r.registers} | {spill} | {r.shared_bytes} | {blocks} | "
                     + " | ".join(loop_columns) + " |")
    checks = [(r.name, check) for r in reports if r.hot_loops for check in r.hot_loops.checks]
    if checks:
        lines += ["", "? the loops found disagree with the kernel's model:"]
        lines += [f"- {name}: {check}" for name, check in checks]
    return "\n".join(lines)


def as_json(reports: list[KernelReport], extension: Path, arch: str) -> str:
    document = {
        "extension": str(extension),
        "arch": arch,
        "cuobjdump": cuobjdump_version(),
        "sm_limits": H100,
        "issue_model": {**ISSUE_MODEL, "thread_instructions_per_s": ISSUE_RATE,
                        "instructions_per_byte_budget": INSTRUCTIONS_PER_BYTE_BUDGET},
        "kernels": [{**asdict(r), "spills": r.spills, "misses_register_target": r.misses_register_target}
                    for r in reports],
    }
    return json.dumps(document, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extension", type=Path, help="the built extension (default: fused_losses/_C*.so as "
                                                        "Python imports it from the repository root)")
    parser.add_argument("--arch", default="sm_90", help="cubin architecture to read (default sm_90)")
    parser.add_argument("--match", help="only kernels whose name ('op/kernel<args>') matches this regex")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    args = parser.parse_args(argv)
    extension = args.extension or default_extension()
    reports = analyse(extension, args.arch)
    if args.match:
        reports = [r for r in reports if re.search(args.match, r.name)]
    print(as_json(reports, extension, args.arch) if args.json else markdown(reports, extension, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
