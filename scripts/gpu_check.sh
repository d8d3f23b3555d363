#!/usr/bin/env bash
# The GPU check in one command that fits one device call (README, "Running the GPU check"): GPU machines are
# lent for minutes, so the whole check runs under one wall-time budget, build included, in six stages:
#   1 build     the CUDA extension (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0) with the machine's python3 and torch
#               (no network: nothing is installed but the wheels carried in wheels/: README, "Running the
#               GPU check": liger-kernel, expecttest, keras and the two of its needs the image lacks)
#   2 tests     every CUDA test but torch.compile, > 2^31 elements and DDP, fastest first, not stopping at a
#               failure or a crash (8 pytest-xdist workers where installed); records and checks the kernels
#               each tests/test_kernel_paths.py case launches; the build's toolchain checks (marker toolchain)
#               and the Keras tests (marker keras: on CUDA there; they skip without a carried keras wheel)
#   3 bench     python -m benchmarks --device cuda --headline (the issue's headline rows, Liger as the
#               vocabulary-size baseline), torch.compile skipped for the last rows if time runs short
#   4 sanitize  compute-sanitizer memcheck, racecheck, initcheck, synccheck over tests/test_kernel_paths.py:
#               every kernel and launch path once (its KERNELS table maps kernel -> case)
#   5 profile   Nsight Compute over the headline cases' fused kernels (scripts/gpu_profile.py): achieved DRAM
#               bandwidth, issue slots, occupancy, instructions per byte, from the hardware counters
#   6 slow      torch.compile, > 2^31 elements, DDP: with what time is left
# Each stage prints its wall time, stops at its own time limit (a cap, and what the budget leaves after
# keeping the minimum of the later stages 2-5), and writes its results as it goes, so a run cut off still
# returns what it finished. $OUT (default ./gpu_results) gets at most 7 files (the device tool returns 8):
#   summary.txt      device, then one line per stage: status, wall time, limit, result
#   <stage>.log      the log of the stage running now (moved into results.tar.gz when it ends)
#   results.tar.gz   every finished stage's log and JUnit XML, each sanitizer tool's log, bench.png
#                    (rewritten after each stage)
#   bench.json, bench.md   the benchmark rows, rewritten after each row
#   extension.tar.xz the extension the build stage built (a later call can carry it and skip the build stage)
#
# Usage: scripts/gpu_check.sh [STAGE...]      (default: build tests bench sanitize profile slow, in that order)
# Environment: OUT; GPU_CHECK_BUDGET_S (default 540: the device call's timeout_s of 600 less a margin);
#   PYTHON (default python3); GPU_CHECK_DRY_RUN=1 prints each stage's commands and limits and checks the test
#   and benchmark selections (pytest --collect-only, benchmarks --list): no GPU needed.
# shellcheck disable=SC2317  # the stage functions are called indirectly, as "stage_$stage"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT="${OUT:-$PWD/gpu_results}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # finished stages' files, packed into results.tar.gz
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"  # carried wheels, installed aside
DEADLINE=$((SECONDS + BUDGET))

# Time limits, in seconds. CAP: the most a stage may take. MIN: below this a stage is not worth starting, and
# stages 2-5 keep their MIN for themselves while earlier stages run. Measured on an H200 (2026-11-28, README):
# build 102 s, tests 45 s (12 workers), bench 62 s, sanitize 78 s, profile 76 s, slow 57 s.
declare -A CAP=([build]=240 [tests]=150 [bench]=170 [sanitize]=160 [profile]=100 [slow]=600)
declare -A MIN=([build]=60 [tests]=40 [bench]=60 [sanitize]=45 [profile]=40 [slow]=30)
RESERVED_STAGES=" tests bench sanitize profile "

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests bench sanitize profile slow)
for stage in "${STAGES[@]}"; do
  [ -n "${CAP[$stage]:-}" ] || { echo "unknown stage '$stage' (build tests bench sanitize profile slow)"; exit 2; }
done

# The test selections. Stage 2: the CUDA tests (marker `cuda`: the CUDA parameter of the `device` fixture and
# the CUDA-only tests) but the slow ones. Stage 5: those slow ones; the DDP tests run on the CPU (gloo), here
# only because the issue's slow list names them.
TEST_SELECTION=(tests -m "cuda or toolchain or keras" -k "not compile and not 2_pow_31")
SLOW_SELECTION=(tests -k "(compile or 2_pow_31) and cuda or ddp")
SANITIZE_SELECTION=(tests/test_kernel_paths.py -m cuda)
# SIGINT at a stage's limit: pytest stops as on Ctrl-C and still writes its summary and JUnit XML. A process
# started in the background by a non-interactive shell begins with SIGINT ignored, and Python then keeps it
# ignored: pytest runs under a handler set explicitly.
PYTEST=("$PYTHON" -c "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); \
sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider -rfE --fastest-first)
timed() { local limit=$1; shift; timeout --signal=INT --kill-after=20 "$limit" "$@"; }

STATUS=0
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

pack() {  # the finished stages' files into results.tar.gz (written aside, then renamed: never half a file)
  tar -czf "$OUT/results.tar.gz.part" -C "$WORK" . && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

# Seconds stage $1 may take: its cap, within what the budget leaves after the MIN of the later stages 2-5.
stage_limit() {
  local name=$1 reserve=0 later=0 stage
  for stage in "${STAGES[@]}"; do
    if [ "$later" = 1 ] && [[ $RESERVED_STAGES == *" $stage "* ]]; then reserve=$((reserve + MIN[$stage])); fi
    [ "$stage" = "$name" ] && later=1
  done
  local left=$((DEADLINE - SECONDS - reserve))
  echo $((left < CAP[$name] ? left : CAP[$name]))
}

# The pytest outcome line ("12 passed, 1 failed in 3.2s"), or what stopped it.
pytest_result() {
  local line
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)' "$1" | tail -1 | tr -d '=')
  grep -q KeyboardInterrupt "$1" && line="stopped at its time limit: ${line:-no summary}"
  echo "${line:-no pytest summary}"
}

# ------------------------------------------------------------------------------------------------- stages

stage_build() {  # $1: limit
  "$PYTHON" - <<'EOF'
import subprocess, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {__import__('sys').version.split()[0]}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
for tool in (["nvcc", "--version"], ["compute-sanitizer", "--version"], ["nproc"]):
    try:
        print(" ".join(tool[:1]), subprocess.run(tool, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    except (OSError, IndexError):
        print(tool[0], "not found")
EOF
  echo "$WHEELS"
  timeout --kill-after=10 "$1" "$PYTHON" setup.py build_ext --inplace || return 1
  # The build must hold CUDA kernels: one loss on the GPU against the CPU.
  "$PYTHON" -c "
import torch, fused_losses
x, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
gpu = fused_losses.cost_sensitive_cross_entropy(x.cuda(), y.cuda()).cpu()
torch.testing.assert_close(gpu, fused_losses.cost_sensitive_cross_entropy(x, y))
print('CUDA kernels run:', torch.ops.fused_losses.cost_sensitive_cross_entropy.default)" || return 1
  # For a later call of the same session: carried back, it spares that call the build.
  tar -cf - fused_losses/_C*.so | xz -T0 -6 >"$OUT/extension.tar.xz.part" && mv "$OUT/extension.tar.xz.part" \
    "$OUT/extension.tar.xz"
  return 0
}

stage_tests() {
  # In worker processes (pytest-xdist, on the GPU machine's image) a test that crashes its process fails alone;
  # in one process it ended the stage (seen on the first GPU run: a segfault at the 73rd of 1074 tests).
  local workers=()
  "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 8)
  FUSED_LOSSES_KERNEL_TRACE=1 timed "$1" "${PYTEST[@]}" "${TEST_SELECTION[@]}" "${workers[@]}" --durations=15 \
    --junitxml="$WORK/tests.xml"
}

stage_bench() {
  # The benchmark's own budget leaves 30 s for start-up (torch, the copy bandwidth) and the last row. It
  # rewrites bench.json / bench.md after each row: a plain SIGTERM at the limit loses nothing finished.
  timeout --kill-after=10 "$1" "$PYTHON" -m benchmarks --device cuda --headline --time-budget-s $(($1 - 30)) \
    --json "$OUT/bench.json" --plot "$WORK/bench.png"
}

# Sanitizer flags. PyTorch's caching allocator would hide out-of-bounds accesses inside its pooled blocks:
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation. memcheck, racecheck and synccheck look
# at the extension's kernels only (kns=fused_losses: PyTorch's own run unchecked, far faster); initcheck
# checks every kernel, since a kernel it does not track would leave the memory it writes "uninitialised".
# --require-cuda-init no: the process it starts is `timeout`, whose child (pytest) uses CUDA.
SANITIZER_TOOLS=(memcheck racecheck initcheck synccheck)
stage_sanitize() {
  local stage_end=$((SECONDS + $1)) tool left limit code failed=0
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) \
    || { echo "compute-sanitizer not found"; return 1; }
  local i=0
  for tool in "${SANITIZER_TOOLS[@]}"; do
    left=$((stage_end - SECONDS))
    limit=$((left / (${#SANITIZER_TOOLS[@]} - i) - 10))  # an even share of what is left, for each tool
    i=$((i + 1))
    if [ "$limit" -lt 20 ]; then echo "=== $tool: skipped, ${left} s left"; continue; fi
    local filter=(--kernel-name kns=fused_losses)
    [ "$tool" = initcheck ] && filter=()
    echo "=== $tool (limit ${limit} s) $(date -u +%T)"
    local t0=$SECONDS
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=20 $((limit + 20)) \
      "$sanitizer" --tool "$tool" "${filter[@]}" --error-exitcode 99 --print-limit 20 --launch-timeout 120 \
      --require-cuda-init no \
      timeout --signal=INT --kill-after=15 "$limit" "${PYTEST[@]}" "${SANITIZE_SELECTION[@]}" \
      --junitxml="$WORK/sanitize-$tool.xml" >"$WORK/sanitize-$tool.log" 2>&1
    code=$?
    cat "$WORK/sanitize-$tool.log"
    echo "=== $tool: exit $code, $((SECONDS - t0)) s, $(grep -E 'ERROR SUMMARY' "$WORK/sanitize-$tool.log" | tail -1)," \
      "$(pytest_result "$WORK/sanitize-$tool.log")"
    [ "$code" -ne 0 ] && STATUS=1 && failed=1
    # gVisor machines refuse the device: the other tools would too.
    if grep -qE 'Device not supported|error 999|Target application terminated before first instrumented' \
      "$WORK/sanitize-$tool.log"; then
      echo "=== compute-sanitizer cannot use this device: the other tools are skipped"
      return 1
    fi
  done
  return "$failed"
}

# Nsight Compute, clocks as found (--clock-control none: the machine's settings are not ours to change), over
# the cudaProfilerStart/Stop ranges of scripts/gpu_profile.py; the details CSV then summarised per kernel.
NCU_SECTIONS=(SpeedOfLight MemoryWorkloadAnalysis ComputeWorkloadAnalysis Occupancy LaunchStats WarpStateStats
  InstructionStats)
stage_profile() {  # $1: limit
  local ncu
  ncu=$(command -v ncu || compgen -G '/usr/local/cuda/bin/ncu' || compgen -G '/opt/nvidia/nsight-compute/*/ncu' \
    | head -1)
  [ -n "$ncu" ] || { echo "ncu not found"; return 1; }
  local sections=() section
  for section in "${NCU_SECTIONS[@]}"; do sections+=(--section "$section"); done
  timeout --kill-after=10 "$1" "$ncu" --profile-from-start off --clock-control none --target-processes all \
    "${sections[@]}" --csv --page details --print-units base --log-file "$WORK/profile.csv" \
    "$PYTHON" scripts/gpu_profile.py --budget-s $(($1 - 35))
  local code=$?
  "$PYTHON" scripts/gpu_profile.py --summarize "$WORK/profile.csv" | tee "$WORK/profile.md"
  grep -m5 -E '==(ERROR|WARNING)==' "$WORK/profile.csv"
  return "$code"
}

stage_slow() {
  timed "$1" "${PYTEST[@]}" "${SLOW_SELECTION[@]}" --durations=10 --junitxml="$WORK/slow.xml"
}

# What a stage's summary line says besides its status.
stage_result() {
  case $1 in
    build) grep -E '^(CUDA kernels run|[A-Za-z.]*(Error|error)[: ])' "$2" | tail -1 | cut -c1-150 ;;
    tests | slow) pytest_result "$2" ;;
    bench) grep -cE '\| (met|MISSED|FAILED)' "$OUT/bench.md" 2>/dev/null | sed 's/$/ rows written/' ;;
    profile) grep -c '^| .* | `' "$2" | sed 's/$/ kernels profiled/' ;;
    sanitize) grep -E '^=== (memcheck|racecheck|initcheck|synccheck):' "$2" | sed 's/^=== //' | cut -c1-60 \
      | tr '\n' ';' ;;
  esac
}

# ---------------------------------------------------------------------------------------------- dry run

dry_run() {
  echo "dry run: budget ${BUDGET} s; stages ${STAGES[*]}; OUT=$OUT; PYTHON=$PYTHON"
  local stage
  for stage in "${STAGES[@]}"; do
    echo "--- $stage: cap ${CAP[$stage]} s, min ${MIN[$stage]} s, limit now $(stage_limit "$stage") s"
    case $stage in
      build) echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $PYTHON setup.py build_ext --inplace"
             ls wheels/*.whl 2>/dev/null || echo "(no wheels/*.whl: no Liger, expecttest, Keras)" ;;
      tests) echo "FUSED_LOSSES_KERNEL_TRACE=1 ${PYTEST[*]} ${TEST_SELECTION[*]}"
             "${PYTEST[@]}" "${TEST_SELECTION[@]}" --collect-only | tail -1 ;;
      bench) echo "$PYTHON -m benchmarks --device cuda --headline --time-budget-s N --json $OUT/bench.json"
             "$PYTHON" -m benchmarks --device cuda --headline --list ;;
      sanitize) echo "compute-sanitizer --tool {${SANITIZER_TOOLS[*]}} ... ${PYTEST[*]} ${SANITIZE_SELECTION[*]}"
                "${PYTEST[@]}" "${SANITIZE_SELECTION[@]}" --collect-only | tail -1 ;;
      profile) echo "ncu --section {${NCU_SECTIONS[*]}} ... $PYTHON scripts/gpu_profile.py --budget-s N"
               "$PYTHON" scripts/gpu_profile.py --list ;;
      slow) echo "${PYTEST[*]} ${SLOW_SELECTION[*]}"
            "${PYTEST[@]}" "${SLOW_SELECTION[@]}" --collect-only | grep -E '::|collected' ;;
    esac
  done
}

if [ "$DRY_RUN" = 1 ]; then dry_run; exit $?; fi

# ------------------------------------------------------------------------------------------------- run

# The machine has no network: Liger's cross-entropy (the benchmark's baseline), expecttest (which PyTorch's
# OpInfo samples, tests/test_reliability.py, need) and Keras only from carried wheels, installed aside (nothing
# of the machine's changes) for every run, also one of a single stage.
WHEELS="no wheels/*.whl: the benchmark runs without Liger, the OpInfo and Keras tests skip"
if compgen -G "wheels/*.whl" >/dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl \
    >"$WORK/wheels-install.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    WHEELS="installed from wheels/: $(cd wheels && echo *.whl)"
  else
    WHEELS="wheels/*.whl did not install: $(tail -1 "$WORK/wheels-install.log")"
  fi
fi
: >"$OUT/summary.txt"
summary "gpu_check $(date -u +%FT%TZ): budget ${BUDGET} s, stages ${STAGES[*]}, $(git rev-parse --short HEAD 2>/dev/null)"
summary "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
summary "$WHEELS"
for stage in "${STAGES[@]}"; do
  limit=$(stage_limit "$stage")
  if [ "$limit" -lt "${MIN[$stage]}" ]; then
    summary "$(printf '%-9s skipped  %4s s  (%s s left, needs %s)' "$stage" 0 "$((DEADLINE - SECONDS))" "${MIN[$stage]}")"
    [ "$stage" = build ] && exit 1
    continue
  fi
  echo "=== $stage: limit ${limit} s, $(date -u +%T)"
  log="$OUT/$stage.log"
  t0=$SECONDS
  "stage_$stage" "$limit" >"$log" 2>&1
  code=$?
  wall=$((SECONDS - t0))
  result=$(stage_result "$stage" "$log")
  case $code in
    0) state=ok ;;
    124 | 130 | 137) state=timeout ;;
    *) state=FAILED ;;
  esac
  grep -q KeyboardInterrupt "$log" && state=timeout
  [ "$code" -ne 0 ] && STATUS=1
  tail -n 25 "$log"
  summary "$(printf '%-9s %-8s %4s s  (limit %s s)  %s' "$stage" "$state" "$wall" "$limit" "$result")"
  mv "$log" "$WORK/$stage.log"
  pack
  if [ "$stage" = build ] && [ "$code" -ne 0 ]; then
    summary "build failed: the other stages need it"
    exit 1
  fi
done
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
echo
cat "$OUT/summary.txt"
exit $STATUS
