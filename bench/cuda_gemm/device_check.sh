#!/usr/bin/env bash
# Every GPU check of the CUDA kernels, as one command on a GPU machine (run from the device
# tool with carry [".device"] after prepare_device_deps.sh here). Logs and the benchmark's JSON
# go to $OUT (the device tool's folder that comes back) or build/device-check.
#
#   1. build meswitch._core and the CUDA tests for sm_90 (CUDA_ARCHS to change)
#   2. the GPU Catch2 tests, then pytest's CUDA tests (tests/python/test_cuda.py, and the
#      multi-expert model on cuda in test_serve_cuda.py)
#   3. compute-sanitizer memcheck and racecheck over the smaller GPU Catch2 cases
#   4. bench/cuda_gemm/bench_cuda_gemm.py (BENCH_ARGS to narrow it), with what time is left
#   5. with PROFILE=1, Nsight Compute over three decode-sized launches (profile_case.py)
#
# Each step has its own time limit, cut to what is left of DEADLINE seconds for the whole
# script (default 540, inside the device tool's 600 s per command); a failing step does not
# stop the later ones, and the exit status is that of the first failure. The most telling
# steps come first, so a run cut short still says whether the kernels are right.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build/device-check}
mkdir -p "$out"
status=0
deadline=${DEADLINE:-540}
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "== $name: skipped, the ${deadline} s deadline is spent" | tee -a "$out/summary.txt"
    [ "$status" -ne 0 ] || status=124
    return
  fi
  echo "== $name" | tee -a "$out/summary.txt"
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "   exit $code after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
  tail -5 "$out/$name.log" | sed 's/^/   /' | tee -a "$out/summary.txt"
  [ "$code" -eq 0 ] || [ "$status" -ne 0 ] || status=$code
}

[ -f .device/deps.tar.xz ] && tar -C .device -xJf .device/deps.tar.xz
export CMAKE_PREFIX_PATH="$PWD/.device/deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
nvcc --version >> "$out/device.txt" 2>&1

build() {
  cmake -S . -B build/cuda-dev -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESWITCH_CUDA=ON -DMESWITCH_PYTHON=ON \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" &&
    cmake --build build/cuda-dev -j "$(nproc)" --target _core meswitch_cuda_tests &&
    for module in build/cuda-dev/_core*.so; do ln -sf "../../$module" python/meswitch/; done
}
export -f build  # timeout runs programs, not shell functions
step build 300 bash -c build
tests=build/cuda-dev/tests/cpp/meswitch_cuda_tests
step catch2 120 "$tests" --durations yes
step pytest 180 env PYTHONPATH=python python3 -m pytest -q -m cuda tests/python/test_cuda.py tests/python/test_serve_cuda.py
step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$tests" \
  "tiles dequantized on the GPU equal the CPU reference bit for bit,multi_delta_matmul runs on the caller's stream"
step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 "$tests" "multi_delta_matmul runs on the caller's stream"
step bench 300 env PYTHONPATH=python PYTHONUNBUFFERED=1 python3 bench/cuda_gemm/bench_cuda_gemm.py \
  --json "$out/cuda_gemm.json" ${BENCH_ARGS:-}
if [ "${PROFILE:-0}" = 1 ]; then  # Nsight Compute on decode-sized launches: stall reasons, occupancy, bytes
  profile() {  # profile NAME ARGS...: the third launch of one case
    local name=$1
    shift
    step "ncu-$name" 90 env PYTHONPATH=python:bench/cuda_gemm ncu --clock-control none --kernel-name regex:delta_gemm \
      --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
      python3 bench/cuda_gemm/profile_case.py "$@"
  }
  profile 4096x4096-b1 --rows 4096 --cols 4096 --batch 1
  profile 4096x4096-b1-k0 --rows 4096 --cols 4096 --batch 1 --salient-fraction 0
  profile 14336x4096-b16 --rows 14336 --cols 4096 --batch 16
fi
exit $status
