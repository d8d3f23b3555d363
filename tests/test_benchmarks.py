"""The benchmark's report structure (no timing is checked): the CPU allocator regimes it measures, each in the
JSON with its own copy bandwidth and rows, and named in the Markdown headers."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import child_command, markdown_table, summarise
from benchmarks.case import BenchCase

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path, *args):
    out = tmp_path / "bench.json"
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # the default regime
    subprocess.run([sys.executable, "-m", "benchmarks", "--device", "cpu", "--smoke", "--no-compile",
                    "--ops", "pearson", "--json", str(out), *args], cwd=ROOT, env=environment, check=True,
                   capture_output=True)
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_cpu_benchmark_reports_both_allocator_regimes(tmp_path):
    report, markdown = run_benchmark(tmp_path, "--regimes", "default", "thp")
    assert [regime["regime"] for regime in report["regimes"]] == ["default", "thp"]
    for regime in report["regimes"]:
        assert regime["copy_gbps"] > 0
        assert [row["op"] for row in regime["rows"]] == ["pearson_correlation_loss"]
        assert "fwd_bwd_ms" in regime["rows"][0]["results"]["fused"]
    assert report["allocator_regime"] == "default" and report["rows"] == report["regimes"][0]["rows"]
    assert "default CPU allocator (4 KB pages)" in markdown and "THP_MEM_ALLOC_ENABLE=1 (2 MB pages)" in markdown


@pytest.mark.parametrize("ops, budget", [(None, None), (["pearson", "bce"], 60.0)])
def test_child_process_measures_the_same_selection(ops, budget):
    args = argparse.Namespace(device="cpu", quick=True, smoke=False, no_compile=True, headline=False, ops=ops,
                              time_budget_s=budget)
    command = child_command(args, Path("out.json"))
    assert command[command.index("--device") + 1] == "cpu" and "--quick" in command and "--no-compile" in command
    assert command[command.index("--ops") + 1:] == ops if ops else "--ops" not in command
    assert command[command.index("--time-budget-s") + 1] == "60.0" if budget else "--time-budget-s" not in command


def test_smoke_run_says_it_measured_one_regime(tmp_path):
    report, markdown = run_benchmark(tmp_path)
    assert [regime["regime"] for regime in report["regimes"]] == ["default"]
    assert "Allocator regime measured: default only" in markdown


@pytest.mark.parametrize("speedup, pct_copy, status", [
    (1.6, 10.0, "met"),  # fast enough against torch.compile
    (1.1, 85.0, "met"),  # at the bandwidth ceiling
    (1.1, 50.0, "MISSED 1.5x compiled or 80% copy"),
])
def test_cpu_target_is_speedup_or_bandwidth(speedup, pct_copy, status):
    case = BenchCase(op="op", label="case", make_inputs=dict, fused=None, reference=None,
                     bytes_forward=1, bytes_forward_backward=int(pct_copy * 1e6))
    results = {"fused": {"fwd_bwd_ms": 1.0, "fwd_ms": 1.0}, "compiled": {"fwd_bwd_ms": speedup}}
    assert summarise(case, results, "cpu", copy_gbps=100.0)["status"] == status


def test_bce_cases_pass_contiguous_targets():
    """The targets a user passes are contiguous: a padded view (once made by the reference's dense-target
    helper) sent the GPU benchmark's float-target row through the strided kernel, not the flat one it reports."""
    from benchmarks.cases_weighted_bce import cases
    for case in cases("cpu", quick=True):
        inputs = case.make_inputs()
        for name in ("target", "float_target", "positive_indices"):
            if name in inputs:
                assert inputs[name].is_contiguous(), (case.label, name)


@pytest.mark.parametrize("fused, shown", [
    ({"graph_fwd_bwd_ms": 0.5}, "| 0.500 (50%) |"),
    ({"graph_error": "RuntimeError: capture failed"}, "| err |"),
    ({}, "| - |"),  # the CPU: no graph
])
def test_graph_replay_column(fused, shown):
    """The CUDA graph replay of the fused forward + backward (the device's time without host overhead) gets its
    own column and its own share of the copy bandwidth: 50 MB in 0.5 ms at a copy of 200 GB/s is 50%."""
    case = BenchCase(op="op", label="case", make_inputs=dict, fused=None, reference=None, bytes_forward=1,
                     bytes_forward_backward=50_000_000)
    results = {"fused": {"fwd_bwd_ms": 1.0, "fwd_ms": 1.0, **fused}}
    row = summarise(case, results, "cuda", copy_gbps=200.0)
    assert "graph ms (% copy)" in markdown_table([row]).splitlines()[0]
    assert shown in markdown_table([row]).splitlines()[2]


def test_cuda_timing_lets_the_host_run_ahead(monkeypatch):
    """On the GPU each run is timed by CUDA events and the host synchronises once per `reps` runs, not after each
    run (which added the host's whole overhead to every sample). Checked with stand-ins for the events: a run
    "takes" 0.5 ms of device time."""
    from benchmarks import harness

    clock = {"device_ms": 0.0, "synchronisations": 0}

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock["device_ms"]

        def elapsed_time(self, end):
            return end.at - self.at

    def run(i):
        assert clock["synchronisations"] == i // 7 + 1  # the warm-up's, then one per batch of 7 runs
        clock["device_ms"] += 0.5

    def synchronize():
        clock["synchronisations"] += 1

    monkeypatch.setattr(harness.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(harness.torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(harness, "MIN_SAMPLE_SECONDS", 0.01)  # 20 runs of 0.5 ms: 3 batches of 7
    assert harness.time_ms(run, "cuda", warmup=0, reps=7) == 0.5
    assert clock["synchronisations"] == 1 + 3
