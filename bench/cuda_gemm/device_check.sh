#!/usr/bin/env bash
# Every GPU check of the CUDA kernels, as one command on a GPU machine (run from the device
# tool with carry [".device"] after prepare_device_deps.sh here). Logs and the benchmark's JSON
# go to $OUT (the device tool's folder that comes back) or build/device-check.
#
#   1. build meswitch._core and the CUDA tests for sm_90 (CUDA_ARCHS to change)
#   2. the GPU Catch2 tests, then pytest's CUDA tests (tests/python/test_cuda.py, and the
#      multi-expert model on cuda in test_serve_cuda.py)
#   3. compute-sanitizer memcheck and racecheck over the smaller GPU Catch2 cases
#   4. bench/cuda_gemm/bench_cuda_gemm.py (about 2-4 minutes on an H200)
#
# Each step has its own time limit and a failing step does not stop the later ones; the
# exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-build/device-check}
mkdir -p "$out"
status=0
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$out/summary.txt"
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "   exit $code after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
  tail -5 "$out/$name.log" | sed 's/^/   /' | tee -a "$out/summary.txt"
  [ "$code" -eq 0 ] || [ "$status" -ne 0 ] || status=$code
}

export CMAKE_PREFIX_PATH="$PWD/.device/deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
nvcc --version >> "$out/device.txt" 2>&1

build() {
  cmake -S . -B build/cuda-dev -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESWITCH_CUDA=ON -DMESWITCH_PYTHON=ON \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" &&
    cmake --build build/cuda-dev -j "$(nproc)" --target _core meswitch_cuda_tests &&
    for module in build/cuda-dev/_core*.so; do ln -sf "../../$module" python/meswitch/; done
}
step build 420 build
tests=build/cuda-dev/tests/cpp/meswitch_cuda_tests
step catch2 300 "$tests" --durations yes
step pytest 300 env PYTHONPATH=python python3 -m pytest -q -m cuda tests/python/test_cuda.py tests/python/test_serve_cuda.py
step memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 1 "$tests" \
  "tiles dequantized on the GPU equal the CPU reference bit for bit" "multi_delta_matmul runs on the caller's stream"
step racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 1 "$tests" "multi_delta_matmul runs on the caller's stream"
step bench 420 env PYTHONPATH=python PYTHONUNBUFFERED=1 python3 bench/cuda_gemm/bench_cuda_gemm.py --json "$out/cuda_gemm.json"
exit $status
