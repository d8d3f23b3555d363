"""`python -m benchmarks` (`make bench`): times every fused op against the eager reference, the compiled
reference and, where installed, Liger, on the default device (CUDA when present), relative to the measured
copy bandwidth; prints a table and writes JSON, Markdown and a PNG plot under benchmarks/results/."""

import argparse
import datetime
import importlib
import json
import pkgutil
import re
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from .case import BenchCase
from .harness import copy_bandwidth_gbps, device_name, measure_case

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("fused", "eager", "compiled", "liger")
CUDA_BANDWIDTH_TARGET = 0.85
LIGER_TARGET = 1.5


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
    row["fwd_gbps"] = case.bytes_forward / (fused["fwd_ms"] * 1e-3) / 1e9
    for name in IMPLEMENTATIONS[1:]:
        if "fwd_bwd_ms" in results.get(name, {}):
            row[f"speedup_vs_{name}"] = results[name]["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
    target = case.target_vs_compiled or (2.0 if device == "cuda" else 1.5)
    missed = []
    if row.get("speedup_vs_compiled", float("inf")) < target:
        missed.append(f"{target:g}x compiled")
    if device == "cuda" and row["pct_copy"] < 100 * CUDA_BANDWIDTH_TARGET:
        missed.append(f"{100 * CUDA_BANDWIDTH_TARGET:.0f}% copy")
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


def markdown_table(rows: List[Dict]) -> str:
    header = ("| op | case | fused fwd+bwd ms | fused fwd ms | GB/s | % copy | eager ms | compiled ms | liger ms "
              "| x eager | x compiled | peak extra MB | target |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        res = row["results"]
        fused = res.get("fused", {})
        peak = fused.get("peak_extra_bytes")
        lines.append(
            f"| {row['op']} | {row['case']} | {_ms(res, 'fused')} | "
            f"{fused.get('fwd_ms', float('nan')):.3f} | {row.get('gbps', float('nan')):.1f} | "
            f"{row.get('pct_copy', float('nan')):.0f}% | {_ms(res, 'eager')} | {_ms(res, 'compiled')} | "
            f"{_ms(res, 'liger')} | {row.get('speedup_vs_eager', float('nan')):.2f} | "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", help="substrings of op names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--smoke", action="store_true", help="one small case per op (CI); writes no files unless asked")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--headline", action="store_true",
                        help="only the issue's headline rows (CUDA: what scripts/gpu_check.sh runs)")
    parser.add_argument("--time-budget-s", type=float,
                        help="wall-time budget: once the cases left may not fit, they skip the torch.compile "
                             "reference (compilation dominates), and none starts once even that may not fit")
    parser.add_argument("--json", type=Path, help="JSON output (default benchmarks/results/<device>.json)")
    parser.add_argument("--plot", type=Path, help="PNG output (default benchmarks/results/<device>.png)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and their targets; run none")
    args = parser.parse_args(argv)
    # --smoke keeps only the small smoke rows; --quick drops them (a minute for the real shapes).
    cases = [c for c in all_cases(args.device, args.quick or args.smoke)
             if (not args.ops or any(o in c.op for o in args.ops))
             and (c.smoke if args.smoke else not (args.quick and c.smoke))
             and (c.headline or not args.headline)]
    if args.list:  # needs no device: scripts/gpu_check.sh's dry run checks the GPU selection with it
        for case in cases:
            targets = [f"{case.target_vs_compiled or (2.0 if args.device == 'cuda' else 1.5):g}x compiled"]
            if args.device == "cuda":
                targets.append(f"{100 * CUDA_BANDWIDTH_TARGET:.0f}% copy")
            if "liger" in case.extra:
                targets.append(f"{case.target_vs_liger or LIGER_TARGET:g}x Liger")
            if case.max_peak_extra_bytes is not None:
                targets.append(f"peak extra <= {case.max_peak_extra_bytes / 2**20:.0f} MiB")
            print(f"{case.op} {case.label}: {', '.join(targets)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    name = device_name(args.device)
    print(f"fused_losses benchmark on {name}; torch {torch.__version__}; {len(cases)} cases", file=sys.stderr)
    copy_gbps = copy_bandwidth_gbps(args.device, args.quick or args.smoke)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)
    date = datetime.date.today().isoformat()
    title = f"{name}, torch {torch.__version__}, {date}; copy bandwidth {copy_gbps:.1f} GB/s"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    json_path = args.json or (None if args.smoke else RESULTS_DIR / f"{slug}.json")
    plot_path = args.plot or (None if args.smoke else RESULTS_DIR / f"{slug}.png")

    def write_report(rows: List[Dict], complete: bool) -> str:
        """JSON + Markdown of the rows so far: rewritten after every case, so a run cut off still leaves them."""
        table = markdown_table(rows)
        if json_path:
            report = {"device": name, "device_type": args.device, "date": date, "torch": torch.__version__,
                      "copy_gbps": copy_gbps, "quick": args.quick, "complete": complete, "rows": rows}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=1))
            json_path.with_suffix(".md").write_text(
                f"{title}{'' if complete else f' (partial: {len(rows)} of {len(cases)} cases)'}\n\n{table}\n")
        return table

    start = time.monotonic()
    rows = []
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
        write_report(rows, complete=False)
        print(f"    fused {_ms(results, 'fused')} ms, eager {_ms(results, 'eager')} ms, "
              f"compiled {_ms(results, 'compiled')} ms, liger {_ms(results, 'liger')} ms -> {rows[-1]['status']} "
              f"({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    table = write_report(rows, complete=len(rows) == len(cases))
    print(f"\n{title}\n{table}")
    if json_path:
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}", file=sys.stderr)
    if plot_path and rows:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, copy_gbps, title, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    return 0 if len(rows) == len(cases) and all(not r["status"].startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
