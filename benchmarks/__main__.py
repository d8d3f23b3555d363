"""`python -m benchmarks` (`make bench`): times every fused op against the eager reference, the compiled
reference and, where installed, Liger, on the default device (CUDA when present), relative to the measured
copy bandwidth; prints a table and writes JSON, Markdown and a PNG plot under benchmarks/results/.

On the CPU every case is measured under two allocator regimes: c10's default (glibc malloc: a fresh output
above glibc's mmap threshold is new 4 KB pages, faulted in on first write at every call, but for the fused ops'
outputs of 32 MB and more, which they ask huge pages for) and THP_MEM_ALLOC_ENABLE=1 (2 MB transparent huge
pages for every block of 2 MB and more, ~500x fewer faults). c10 reads that variable once, so the regime other
than this process's own runs in a child process; the implementations are measured in turn, CPU_ROUNDS times."""

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .case import BenchCase
from .harness import copy_bandwidth_gbps, device_name, measure_case

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("fused", "eager", "compiled", "liger")
CUDA_BANDWIDTH_TARGET = 0.85
CPU_BANDWIDTH_TARGET = 0.80  # on the CPU a case meets its target at this share of copy bandwidth or its x compiled
LIGER_TARGET = 1.5
THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
# CPU allocator regimes: the environment each runs under, and how a table header names it.
ALLOCATOR_REGIMES = {
    "default": ({THP_VARIABLE: None}, "default CPU allocator (4 KB pages)"),
    "thp": ({THP_VARIABLE: "1"}, "THP_MEM_ALLOC_ENABLE=1 (2 MB pages)"),
}


def all_cases(device: str, quick: bool) -> List[BenchCase]:
    package = Path(__file__).resolve().parent
    cases: List[BenchCase] = []
    for module in sorted(m.name for m in pkgutil.iter_modules([str(package)]) if m.name.startswith("cases_")):
        cases += importlib.import_module(f"{__package__}.{module}").cases(device, quick)
    return cases


def summarise(case: BenchCase, results: Dict, device: str, copy_gbps: float) -> Dict:
    row = {"op": case.op, "case": case.label, "bytes_forward": case.bytes_forward,
           "bytes_forward_backward": case.bytes_forward_backward, "results": results}
    fused = results.get("fused", {})
    if "fwd_bwd_ms" not in fused:
        row["status"] = f"FAILED: {fused.get('error', 'no result')}"
        return row
    row["gbps"] = case.bytes_forward_backward / (fused["fwd_bwd_ms"] * 1e-3) / 1e9
    row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    if "graph_fwd_bwd_ms" in fused:  # the device's time alone (CUDA graph replay)
        graph_gbps = case.bytes_forward_backward / (fused["graph_fwd_bwd_ms"] * 1e-3) / 1e9
        row["graph_pct_copy"] = 100 * graph_gbps / copy_gbps
    row["fwd_gbps"] = case.bytes_forward / (fused["fwd_ms"] * 1e-3) / 1e9
    for name in IMPLEMENTATIONS[1:]:
        if "fwd_bwd_ms" in results.get(name, {}):
            row[f"speedup_vs_{name}"] = results[name]["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
    target = case.target_vs_compiled or (2.0 if device == "cuda" else 1.5)
    missed = []
    if device == "cuda":
        if row.get("speedup_vs_compiled", float("inf")) < target:
            missed.append(f"{target:g}x compiled")
        if row["pct_copy"] < 100 * CUDA_BANDWIDTH_TARGET:
            missed.append(f"{100 * CUDA_BANDWIDTH_TARGET:.0f}% copy")
    elif (row.get("speedup_vs_compiled", float("inf")) < target
          and row["pct_copy"] < 100 * CPU_BANDWIDTH_TARGET):
        missed.append(f"{target:g}x compiled or {100 * CPU_BANDWIDTH_TARGET:.0f}% copy")
    liger_target = case.target_vs_liger or LIGER_TARGET
    if row.get("speedup_vs_liger", float("inf")) < liger_target:
        missed.append(f"{liger_target:g}x Liger")
    peak = fused.get("peak_extra_bytes")
    if case.max_peak_extra_bytes is not None and peak is not None and peak > case.max_peak_extra_bytes:
        missed.append(f"peak extra memory {peak / 2**20:.0f} MB > {case.max_peak_extra_bytes / 2**20:.0f} MB")
    row["status"] = "met" if not missed else "MISSED " + ", ".join(missed)
    return row


def _ms(results: Dict, name: str) -> str:
    value = results.get(name, {}).get("fwd_bwd_ms")
    return f"{value:.3f}" if value is not None else ("err" if "error" in results.get(name, {}) else "-")


def _graph(row: Dict) -> str:
    """The fused forward + backward replayed from a CUDA graph: ms (% copy), 'err' or '-' (CPU)."""
    fused = row["results"].get("fused", {})
    if "graph_fwd_bwd_ms" in fused:
        return f"{fused['graph_fwd_bwd_ms']:.3f} ({row['graph_pct_copy']:.0f}%)"
    return "err" if "graph_error" in fused else "-"


def markdown_table(rows: List[Dict]) -> str:
    header = ("| op | case | fused fwd+bwd ms | fused fwd ms | GB/s | % copy | graph ms (% copy) | eager ms "
              "| compiled ms | liger ms | x eager | x compiled | peak extra MB | target |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        res = row["results"]
        fused = res.get("fused", {})
        peak = fused.get("peak_extra_bytes")
        lines.append(
            f"| {row['op']} | {row['case']} | {_ms(res, 'fused')} | "
            f"{fused.get('fwd_ms', float('nan')):.3f} | {row.get('gbps', float('nan')):.1f} | "
            f"{row.get('pct_copy', float('nan')):.0f}% | {_graph(row)} | {_ms(res, 'eager')} | "
            f"{_ms(res, 'compiled')} | {_ms(res, 'liger')} | {row.get('speedup_vs_eager', float('nan')):.2f} | "
            f"{row.get('speedup_vs_compiled', float('nan')):.2f} | "
            f"{peak / 2**20 if peak is not None else float('nan'):.1f} | {row['status']} |")
    return "\n".join(lines)


def plot(rows: List[Dict], copy_gbps: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op'].replace('cost_sensitive_', 'cs_')}\n{r['case']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 5))
    width = 0.8 / len(IMPLEMENTATIONS)
    for k, name in enumerate(IMPLEMENTATIONS):
        values = []
        for row in rows:
            ms = row["results"].get(name, {}).get("fwd_bwd_ms")
            values.append(row["bytes_forward_backward"] / (ms * 1e-3) / 1e9 if ms else 0.0)
        ax.bar([i + (k - 1.5) * width for i in range(len(rows))], values, width, label=name)
    ax.axhline(copy_gbps, color="black", linestyle="--", label=f"copy {copy_gbps:.0f} GB/s")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("GB/s on the fused schedule's bytes (fwd+bwd)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def process_regime() -> str:
    """The allocator regime this process runs under."""
    return "thp" if os.environ.get(THP_VARIABLE) == "1" else "default"


def measure_regime(args, cases: List[BenchCase], name: str, on_row: Callable[[Dict], None]) -> Dict:
    """Copy bandwidth and the cases in this process: {"regime", "copy_gbps", "rows", "complete"}, handed to
    `on_row` after every case. Under --time-budget-s, cases skip the torch.compile reference once the ones left
    may not fit with it (compilation dominates), and none starts once even that may not fit."""
    print(f"allocator regime: {name}", file=sys.stderr)
    copy_gbps = copy_bandwidth_gbps(args.device, args.quick or args.smoke)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)
    regime = {"regime": name, "copy_gbps": copy_gbps, "rows": [], "complete": not cases}
    rows = regime["rows"]
    start = time.monotonic()
    seconds = {}  # the last case's wall time with and without the compiled reference: the estimates
    for i, case in enumerate(cases, 1):
        compile_reference = not args.no_compile
        if args.time_budget_s is not None and seconds:
            left, after = args.time_budget_s - (time.monotonic() - start), len(cases) - i
            # A row's time without compiling: a guess (a third) until one has run; compilation dominates.
            plain = seconds.get(False, seconds.get(True, 0) / 3)
            # Compile this case only if the cases after it still fit without compiling; stop when none fits.
            if compile_reference and left < seconds.get(True, 2 * plain) + after * plain:
                compile_reference = False
            if left < plain:
                print(f"time budget: {left:.0f} s left, stopping before case {i}", file=sys.stderr, flush=True)
                break
        print(f"[{i}/{len(cases)}] {case.op} {case.label} ...", file=sys.stderr, flush=True)
        # Each case compiles afresh: dynamo's recompile limit (8 graphs per function, counted over every
        # torch.compile of it) would otherwise run later cases' "compiled" reference eagerly, silently.
        torch._dynamo.reset()
        case_start = time.monotonic()
        results = measure_case(case, args.device, args.quick or args.smoke, compile_reference=compile_reference)
        rows.append(summarise(case, results, args.device, copy_gbps))
        rows[-1]["seconds"] = seconds[compile_reference] = time.monotonic() - case_start  # compilation included
        if compile_reference != (not args.no_compile):
            rows[-1]["status"] += " (torch.compile skipped: time budget)"
        regime["complete"] = len(rows) == len(cases)
        on_row(regime)
        print(f"    fused {_ms(results, 'fused')} ms, eager {_ms(results, 'eager')} ms, "
              f"compiled {_ms(results, 'compiled')} ms, liger {_ms(results, 'liger')} ms -> {rows[-1]['status']} "
              f"({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return regime


def measure_regime_in_child(args, name: str) -> Dict:
    """measure_regime under the environment of regime `name`, in a fresh Python process."""
    environment = dict(os.environ)
    for variable, value in ALLOCATOR_REGIMES[name][0].items():
        if value is None:
            environment.pop(variable, None)
        else:
            environment[variable] = value
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "regime.json"
        subprocess.run(child_command(args, out), env=environment, check=True,
                       cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


def child_command(args, out: Path) -> List[str]:
    """The command that measures the same cases in a child process and writes its regime to `out`."""
    command = [sys.executable, "-m", __package__, "--device", args.device, "--regime-json", str(out)]
    command += ["--quick"] * args.quick + ["--smoke"] * args.smoke + ["--no-compile"] * args.no_compile
    command += ["--time-budget-s", str(args.time_budget_s)] if args.time_budget_s is not None else []
    return command + ["--headline"] * args.headline + (["--ops", *args.ops] if args.ops else [])


def print_case_list(cases: List[BenchCase], device: str) -> None:
    for case in cases:
        targets = [f"{case.target_vs_compiled or (2.0 if device == 'cuda' else 1.5):g}x compiled"]
        if device == "cuda":
            targets.append(f"{100 * CUDA_BANDWIDTH_TARGET:.0f}% copy")
        else:
            targets[0] += f" or {100 * CPU_BANDWIDTH_TARGET:.0f}% copy"
        if "liger" in case.extra:
            targets.append(f"{case.target_vs_liger or LIGER_TARGET:g}x Liger")
        if case.max_peak_extra_bytes is not None:
            targets.append(f"peak extra <= {case.max_peak_extra_bytes / 2**20:.0f} MiB")
        print(f"{case.op} {case.label}: {', '.join(targets)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", help="substrings of op names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--smoke", action="store_true",
                        help="one small case per op (CI), this process's allocator regime only; writes no files "
                             "unless asked")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--headline", action="store_true",
                        help="only the issue's headline rows (CUDA: what scripts/gpu_check.sh runs)")
    parser.add_argument("--time-budget-s", type=float,
                        help="wall-time budget: once the cases left may not fit, they skip the torch.compile "
                             "reference (compilation dominates), and none starts once even that may not fit")
    parser.add_argument("--regimes", nargs="+", choices=sorted(ALLOCATOR_REGIMES),
                        help="CPU allocator regimes to measure (default: both, or this process's own with --smoke)")
    parser.add_argument("--json", type=Path, help="JSON output (default benchmarks/results/<device>.json)")
    parser.add_argument("--plot", type=Path, help="PNG output (default benchmarks/results/<device>.png)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and their targets; run none")
    parser.add_argument("--regime-json", type=Path, help=argparse.SUPPRESS)  # child process: one regime's rows
    args = parser.parse_args(argv)
    # --smoke keeps only the small smoke rows; --quick drops them (a minute for the real shapes).
    cases = [c for c in all_cases(args.device, args.quick or args.smoke)
             if (not args.ops or any(o in c.op for o in args.ops))
             and (c.smoke if args.smoke else not (args.quick and c.smoke))
             and (c.headline or not args.headline)]
    if args.list:  # needs no device: scripts/gpu_check.sh's dry run checks the GPU selection with it
        print_case_list(cases, args.device)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.regime_json:
        regime = measure_regime(args, cases, process_regime(), on_row=lambda regime: None)
        args.regime_json.write_text(json.dumps(regime))
        return 0

    name = device_name(args.device)
    own = process_regime()
    if args.device == "cuda":
        regimes = [own]  # the CPU allocator does not hold the tensors a CUDA benchmark measures
    else:
        regimes = args.regimes or ([own] if args.smoke else list(ALLOCATOR_REGIMES))
    print(f"fused_losses benchmark on {name}; torch {torch.__version__}; {len(cases)} cases; allocator regimes: "
          f"{', '.join(regimes)}", file=sys.stderr)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    json_path = args.json or (None if args.smoke else RESULTS_DIR / f"{slug}.json")
    plot_path = args.plot or (None if args.smoke else RESULTS_DIR / f"{slug}.png")
    measured: List[Dict] = []

    def title(regime: Dict) -> str:
        allocator = f"; {ALLOCATOR_REGIMES[regime['regime']][1]}" if args.device == "cpu" else ""
        return f"{name}, torch {torch.__version__}, {date}{allocator}; copy bandwidth {regime['copy_gbps']:.1f} GB/s"

    def write_report(in_progress: Optional[Dict] = None) -> str:
        """Markdown (returned) and JSON of the regimes so far, rewritten after every case, so that a run cut off
        still leaves what it measured. Top-level copy_gbps and rows are the first regime's."""
        regimes_so_far = measured + ([in_progress] if in_progress is not None else [])
        sections = []
        for regime in regimes_so_far:
            partial = "" if regime["complete"] else f" (partial: {len(regime['rows'])} of {len(cases)} cases)"
            sections.append(f"{title(regime)}{partial}\n\n{markdown_table(regime['rows'])}")
        if args.device == "cpu" and len(regimes) == 1:
            sections.append(f"Allocator regime measured: {regimes[0]} only (the other one: --regimes).")
        text = "\n\n".join(sections)
        if json_path:
            first = regimes_so_far[0]
            report = {"device": name, "device_type": args.device, "date": date, "torch": torch.__version__,
                      "cuda": torch.version.cuda if args.device == "cuda" else None,
                      "copy_gbps": first["copy_gbps"], "quick": args.quick, "allocator_regime": first["regime"],
                      "complete": len(measured) == len(regimes) and all(r["complete"] for r in measured),
                      "rows": first["rows"], "regimes": regimes_so_far}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            # Replaced whole, so that a run stopped mid-write (a stage timeout) leaves the previous report.
            for path, content in ((json_path, json.dumps(report, indent=1)), (json_path.with_suffix(".md"), f"{text}\n")):
                partial_path = path.with_name(path.name + ".part")
                partial_path.write_text(content)
                os.replace(partial_path, path)
        return text

    for regime in regimes:
        measured.append(measure_regime(args, cases, regime, on_row=write_report) if regime == own
                        else measure_regime_in_child(args, regime))
    text = write_report()
    print(f"\n{text}")
    if json_path:
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}", file=sys.stderr)
    first = measured[0]
    if plot_path and first["rows"]:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(first["rows"], first["copy_gbps"], title(first), plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    # A run the time budget cut short is not a failure: its report says "partial" (scripts/gpu_check.sh).
    failed = any(r["status"].startswith("FAILED") for regime in measured for r in regime["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
