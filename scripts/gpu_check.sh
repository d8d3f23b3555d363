#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the whole test suite (CUDA tests included), run the
# benchmark on the GPU and the CUDA tests under compute-sanitizer. Logs, JUnit XML, benchmark JSON/PNG go to
# $OUT (default ./gpu_results). Stages can be chosen: scripts/gpu_check.sh [build] [test] [bench] [sanitize].
# Uses the machine's python3 and torch as they are (no venv, no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench)
status=0
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt"
for stage in "${stages[@]}"; do
  echo "=== $stage $(date -u +%FT%TZ)"
  case "$stage" in
    build)
      python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; } ;;
    test)
      python3 -m pytest tests -q -rs --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -25
      status=$((status | ${PIPESTATUS[0]})) ;;
    bench)
      python3 -m benchmarks --device cuda --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 \
        | tee "$OUT/bench.log" | tail -30
      status=$((status | ${PIPESTATUS[0]})) ;;
    sanitize)
      for tool in memcheck racecheck initcheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 99 python3 -m pytest tests -q -x -m cuda \
          -k "not compile and not gradcheck" >"$OUT/sanitizer-$tool.log" 2>&1
        code=$?
        echo "$tool exit $code: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-$tool.log" | tail -1)"
        status=$((status | code))
      done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
