"""scripts/gpu_profile.py's reading of Nsight Compute's details CSV (no GPU): kernels attributed to the case
whose marker launch precedes them, names shortened as the SASS report does, durations in microseconds."""

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "scripts"))
import gpu_profile  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
MARKER = "at::cuda::(anonymous namespace)::spin_kernel(long)"
FLAT = ("void fused_losses::cuda::<unnamed>::flat_kernel<2, c10::BFloat16, bool, 0, 1>"
        "(fused_losses::cuda::<unnamed>::PassArgs<c10::BFloat16>)")


def _row(kernel_id, name, section, metric, unit, value):
    return (f'"{kernel_id}","1","python3","h","{name}","1","7","(256, 1, 1)","(1056, 1, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}"')


def test_kernels_follow_their_case_marker(tmp_path, capsys):
    csv = tmp_path / "profile.csv"
    csv.write_text("\n".join([
        "==PROF== Connected to process 1", HEADER,
        _row(0, MARKER, "GPU Speed Of Light Throughput", "Duration", "nsecond", "1,000"),
        _row(1, MARKER, "GPU Speed Of Light Throughput", "Duration", "nsecond", "1,000"),
        _row(2, FLAT, "GPU Speed Of Light Throughput", "Duration", "usecond", "250"),
        _row(2, FLAT, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "81.5"),
        _row(2, FLAT, "Memory Workload Analysis", "Memory Throughput", "byte/second", "4,000,000,000,000"),
        _row(2, FLAT, "Instruction Statistics", "Executed Instructions", "inst", "31,250,000"),
    ]))
    kernels = gpu_profile.read_kernels(csv)
    assert [k["id"] for k in kernels] == ["0", "1", "2"] and kernels[2]["time_us"] == 250.0
    assert gpu_profile.summarize(csv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "flat_kernel" in line]
    second_case = gpu_profile.profiled_cases()[1]
    # 1e9 bytes in 250 us; 1e9 thread-instructions: 1 per byte.
    assert rows == [f"| {second_case.op} {second_case.label} | `flat_kernel<2, bf16, bool, 0, 1>` | "
                    "(1056, 1, 1) x (256, 1, 1) | nan | 250.0 | 82 | 4000 | nan | nan | nan (nan) | nan | 1.0 |"]
