"""Nsight Compute profile of the benchmark's headline CUDA cases (scripts/gpu_check.sh, stage 'profile'): what
limits each fused kernel (achieved DRAM bandwidth, issue-slot use, occupancy, instructions per byte), read from
the hardware counters rather than guessed.

Two modes:
  run        (default) the program ncu profiles: for each headline case, fused forward + backward warmed up
             outside the profiled range, then once inside cudaProfilerStart/Stop (ncu --profile-from-start off),
             after a marker launch (torch.cuda._sleep: PyTorch's spin_kernel) that tells the cases apart in
             ncu's output. Stops starting cases once --budget-s is spent.
  --summarize CSV   reads ncu's `--csv --page details --print-units base` output and prints one Markdown row
             per kernel and one total per case (the case's schedule bytes over its kernels' summed duration).

Usage (what gpu_check.sh runs):
  ncu --profile-from-start off --clock-control none --csv --page details --print-units base \
      --section SpeedOfLight ... --log-file profile.csv python3 scripts/gpu_profile.py --budget-s 60
  python3 scripts/gpu_profile.py --summarize profile.csv
"""

import argparse
import csv
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import sass_report  # scripts/, this file's folder

MARKER_KERNEL = "spin_kernel"
# (section, metric name as ncu's details page writes it) -> column of the summary
METRICS = OrderedDict([
    (("GPU Speed Of Light Throughput", "Duration"), "time_us"),
    (("GPU Speed Of Light Throughput", "DRAM Throughput"), "dram_pct"),
    (("GPU Speed Of Light Throughput", "Compute (SM) Throughput"), "sm_pct"),
    (("Memory Workload Analysis", "Memory Throughput"), "mem_bytes_per_s"),
    (("Compute Workload Analysis", "Issue Slots Busy"), "issue_pct"),
    (("Occupancy", "Achieved Occupancy"), "occupancy_pct"),
    (("Occupancy", "Theoretical Occupancy"), "theoretical_pct"),
    (("Launch Statistics", "Registers Per Thread"), "registers"),
    (("Warp State Statistics", "Warp Cycles Per Issued Instruction"), "cycles_per_issue"),
    (("Instruction Statistics", "Executed Instructions"), "warp_instructions"),
])
TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}


def profiled_cases():
    from benchmarks.__main__ import all_cases
    return [case for case in all_cases("cuda", quick=False) if case.headline]


def run(budget_s: float) -> int:
    import torch
    began = time.perf_counter()
    for index, case in enumerate(profiled_cases()):
        if time.perf_counter() - began > budget_s:
            print(f"profile: time budget spent, case {index} ({case.op} {case.label}) and later not profiled")
            break
        inputs = case.make_inputs()

        def forward_backward():
            loss = case.fused(**inputs)
            torch.autograd.grad(loss, inputs[case.grad_input])

        for _ in range(2):  # module load, first-call allocations: outside the profiled range
            forward_backward()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        torch.cuda._sleep(1000)
        forward_backward()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profile: case {index}: {case.op} {case.label}, {time.perf_counter() - began:.0f} s", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def short_kernel_name(name: str) -> str:
    """sass_report's short names ('flat_kernel<Forward, bf16, bool, ...>'), from ncu's demangling, which writes
    anonymous namespaces '<unnamed>' and enum template arguments as plain numbers."""
    return sass_report.short_kernel_name(name.replace("<unnamed>::", ""))


def read_kernels(path: Path):
    """[{'id', 'name', 'grid', 'block', <METRICS columns>}] in launch order, from ncu's details CSV."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels = OrderedDict()
    for row in csv.DictReader(line for line in lines[start:] if line.startswith('"')):
        kernel = kernels.setdefault(row["ID"], {"id": row["ID"], "name": row["Kernel Name"],
                                                "grid": row.get("Grid Size", ""), "block": row.get("Block Size", "")})
        column = METRICS.get((row.get("Section Name"), row.get("Metric Name")))
        if column is None:
            continue
        value = _number(row.get("Metric Value", ""))
        if column == "time_us":
            value *= TIME_UNITS.get(row.get("Metric Unit", "").strip(), float("nan"))
        kernel[column] = value
    return list(kernels.values())


def summarize(path: Path) -> int:
    cases = profiled_cases()
    kernels = read_kernels(path)
    if not kernels:
        print(f"no kernel results in {path}")
        return 1
    header = ("| case | kernel | grid x block | regs | time us | DRAM % peak | GB/s | SM % | issue % | occupancy "
              "(theor.) % | cycles/issue | thread instr/B |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    totals = OrderedDict()
    case_index = -1
    for kernel in kernels:
        if MARKER_KERNEL in kernel["name"]:
            case_index += 1
            continue
        case = cases[case_index] if 0 <= case_index < len(cases) else None
        label = f"{case.op} {case.label}" if case else "?"
        metric = {column: kernel.get(column, float("nan")) for column in METRICS.values()}
        time_us = metric["time_us"]
        bytes_moved = metric["mem_bytes_per_s"] * time_us * 1e-6
        instructions = metric["warp_instructions"] * 32
        totals.setdefault(label, [case, 0.0])[1] += time_us
        print(f"| {label} | `{short_kernel_name(kernel['name'])[:90]}` | {kernel['grid']} x {kernel['block']} | "
              f"{metric['registers']:.0f} | {time_us:.1f} | {metric['dram_pct']:.0f} | "
              f"{metric['mem_bytes_per_s'] / 1e9:.0f} | {metric['sm_pct']:.0f} | {metric['issue_pct']:.0f} | "
              f"{metric['occupancy_pct']:.0f} ({metric['theoretical_pct']:.0f}) | {metric['cycles_per_issue']:.1f} | "
              f"{instructions / bytes_moved if bytes_moved > 0 else float('nan'):.1f} |")
    print("\nPer case: the schedule's bytes (benchmarks' count, forward + backward) over the summed kernel time "
          "under the profiler (its cache flush before each kernel included).\n")
    print("| case | kernels' time us | schedule GB | GB/s |")
    print("|---|---|---|---|")
    for label, (case, time_us) in totals.items():
        gigabytes = case.bytes_forward_backward / 1e9 if case else float("nan")
        print(f"| {label} | {time_us:.1f} | {gigabytes:.3f} | {gigabytes / (time_us * 1e-6):.0f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=60.0, help="start no case after this many seconds")
    parser.add_argument("--summarize", type=Path, metavar="CSV", help="summarise ncu's details CSV instead")
    parser.add_argument("--list", action="store_true", help="print the cases profiled; run none")
    args = parser.parse_args(argv)
    if args.list:
        for case in profiled_cases():
            print(f"{case.op} {case.label}")
        return 0
    if args.summarize:
        return summarize(args.summarize)
    return run(args.budget_s)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks
    sys.exit(main())
