"""`python -m benchmarks` (`make bench`): times every fused op against the eager reference, the compiled
reference and, where installed, Liger, on the default device (CUDA when present), relative to the measured
copy bandwidth; prints a table and writes JSON, Markdown and a PNG plot under benchmarks/results/.

On the CPU every case is measured under two allocator regimes: c10's default (glibc malloc: a fresh output
above glibc's mmap threshold is new 4 KB pages, faulted in on first write at every call) and
THP_MEM_ALLOC_ENABLE=1 (2 MB transparent huge pages, ~500x fewer faults). c10 reads that variable once, so the
regime other than this process's own runs in a child process."""

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
from pathlib import Path
from typing import Dict, List

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
    if row.get("speedup_vs_liger", float("inf")) < LIGER_TARGET:
        missed.append(f"{LIGER_TARGET:g}x Liger")
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


def process_regime() -> str:
    """The allocator regime this process runs under."""
    return "thp" if os.environ.get(THP_VARIABLE) == "1" else "default"


def measure_regime(args, cases: List[BenchCase], name: str) -> Dict:
    """Copy bandwidth and every case in this process: {"regime", "copy_gbps", "rows"}."""
    print(f"allocator regime: {name}", file=sys.stderr)
    copy_gbps = copy_bandwidth_gbps(args.device, args.quick or args.smoke)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.op} {case.label} ...", file=sys.stderr, flush=True)
        results = measure_case(case, args.device, args.quick or args.smoke, compile_reference=not args.no_compile)
        rows.append(summarise(case, results, args.device, copy_gbps))
        print(f"    fused {_ms(results, 'fused')} ms, eager {_ms(results, 'eager')} ms, "
              f"compiled {_ms(results, 'compiled')} ms -> {rows[-1]['status']}", file=sys.stderr, flush=True)
    return {"regime": name, "copy_gbps": copy_gbps, "rows": rows}


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
        command = [sys.executable, "-m", __package__, "--device", args.device, "--regime-json", str(out)]
        command += ["--quick"] * args.quick + ["--smoke"] * args.smoke + ["--no-compile"] * args.no_compile
        command += ["--ops", *args.ops] if args.ops else []
        subprocess.run(command, env=environment, check=True, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


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
    parser.add_argument("--regimes", nargs="+", choices=sorted(ALLOCATOR_REGIMES),
                        help="CPU allocator regimes to measure (default: both, or this process's own with --smoke)")
    parser.add_argument("--json", type=Path, help="JSON output (default benchmarks/results/<device>.json)")
    parser.add_argument("--plot", type=Path, help="PNG output (default benchmarks/results/<device>.png)")
    parser.add_argument("--regime-json", type=Path, help=argparse.SUPPRESS)  # child process: one regime's rows
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    name = device_name(args.device)
    # --smoke keeps only the small smoke rows; --quick drops them (a minute for the real shapes).
    cases = [c for c in all_cases(args.device, args.quick or args.smoke)
             if (not args.ops or any(o in c.op for o in args.ops))
             and (c.smoke if args.smoke else not (args.quick and c.smoke))]
    if args.regime_json:
        args.regime_json.write_text(json.dumps(measure_regime(args, cases, process_regime())))
        return 0
    own = process_regime()
    if args.device == "cuda":
        regimes = [own]  # the CPU allocator does not hold the tensors a CUDA benchmark measures
    else:
        regimes = args.regimes or ([own] if args.smoke else list(ALLOCATOR_REGIMES))
    print(f"fused_losses benchmark on {name}; torch {torch.__version__}; {len(cases)} cases; allocator regimes: "
          f"{', '.join(regimes)}", file=sys.stderr)
    measured = [measure_regime(args, cases, r) if r == own else measure_regime_in_child(args, r) for r in regimes]

    date = datetime.date.today().isoformat()
    sections, titles = [], []
    for regime in measured:
        allocator = f"; {ALLOCATOR_REGIMES[regime['regime']][1]}" if args.device == "cpu" else ""
        title = f"{name}, torch {torch.__version__}, {date}{allocator}; copy bandwidth {regime['copy_gbps']:.1f} GB/s"
        titles.append(title)
        sections.append(f"{title}\n\n{markdown_table(regime['rows'])}")
    if args.device == "cpu" and len(measured) == 1:
        sections.append(f"Allocator regime measured: {measured[0]['regime']} only (the other one: --regimes).")
    text = "\n\n".join(sections)
    print(f"\n{text}")
    first = measured[0]
    # Top-level copy_gbps and rows are the first regime's; "regimes" holds every regime measured.
    report = {"device": name, "device_type": args.device, "date": date, "torch": torch.__version__,
              "copy_gbps": first["copy_gbps"], "quick": args.quick, "allocator_regime": first["regime"],
              "rows": first["rows"], "regimes": measured}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    json_path = args.json or (None if args.smoke else RESULTS_DIR / f"{slug}.json")
    plot_path = args.plot or (None if args.smoke else RESULTS_DIR / f"{slug}.png")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        json_path.with_suffix(".md").write_text(f"{text}\n")
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}", file=sys.stderr)
    if plot_path and first["rows"]:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(first["rows"], first["copy_gbps"], titles[0], plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    failed = [r for regime in measured for r in regime["rows"] if r["status"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
