#!/usr/bin/env bash
# Developer entry point; every command installs what it needs first.
#
#   ./dev.sh demo       the main job on the bundled tiny expert family
#   ./dev.sh test       C++ tests (Catch2 through ctest) and Python tests (pytest)
#   ./dev.sh sanitize   the C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   ./dev.sh fuzz [S]   the safetensors header and artifact manifest fuzzers, S seconds each (default 60); router 20 s
#   ./dev.sh bench-io   the 1 GiB checkpoint read benchmark
#   ./dev.sh develop    build the C++ tests and meswitch._core in build/dev, linked into
#                       python/meswitch, for `PYTHONPATH=python python -m pytest` without installing
#   ./dev.sh cuda-compile  the CUDA kernels for sm_80, sm_89 and sm_90, their tests and the CUDA
#                       bindings in build/cuda; runs the CUDA tests (GPU cases skip without a device)
#   ./dev.sh cuda-develop  on a GPU machine: meswitch._core with CUDA in build/cuda-dev, linked into
#                       python/meswitch (CUDA_ARCHS, default 90), for the GPU tests and bench/cuda_gemm
set -euo pipefail
cd "$(dirname "$0")"
JOBS=${JOBS:-$(nproc)}

deps() { bash scripts/install-deps.sh; }

build_cpp() {  # build_cpp DIR [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
}

install_python() {
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation .
}

case "${1:-help}" in
  demo)
    deps
    install_python
    meswitch demo
    ;;
  test)
    deps
    # The CUDA sources are compiled (for every architecture) by cuda-compile, not again here.
    build_cpp build/cpp -DMESWITCH_CUDA=OFF
    install_python
    status=0
    ctest --test-dir build/cpp --output-on-failure -j "$JOBS" || status=1
    python3 -m pytest tests/python || status=1
    exit $status
    ;;
  sanitize)
    deps
    build_cpp build/sanitize -DMESWITCH_SANITIZE=ON -DMESWITCH_CUDA=OFF
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir build/sanitize --output-on-failure -j "$JOBS" -E install_and_find_package
    ;;
  fuzz)
    deps
    build_cpp build/fuzz -DCMAKE_CXX_COMPILER=clang++ -DMESWITCH_FUZZ=ON -DMESWITCH_TESTS=OFF -DMESWITCH_CUDA=OFF
    mkdir -p build/fuzz/corpus build/fuzz/corpus_manifest
    cp fuzz/corpus/* build/fuzz/corpus/
    build/fuzz/fuzz/fuzz_safetensors_header -max_total_time="${2:-60}" -max_len=4096 build/fuzz/corpus
    # The manifest fuzzer seeds its corpus with the manifest of the artifact it builds.
    build/fuzz/fuzz/fuzz_artifact_manifest -max_total_time="${2:-60}" -max_len=8192 build/fuzz/corpus_manifest
    # The router featurizer: any bytes are a text; a short run, it has no file format to explore.
    mkdir -p build/fuzz/corpus_router
    build/fuzz/fuzz/fuzz_router_features -max_total_time=20 -max_len=2048 build/fuzz/corpus_router
    ;;
  develop)
    build_cpp build/dev -DMESWITCH_PYTHON=ON -DMESWITCH_CUDA=OFF -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)"
    for module in build/dev/_core*.so; do ln -sf "../../$module" python/meswitch/; done
    ;;
  cuda-compile)
    deps
    # CUDA targets only: the kernels library, its tests, and the one binding file that uses
    # CUDA (the rest of meswitch._core is built and tested without CUDA by `test`).
    cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESWITCH_CUDA=ON -DMESWITCH_PYTHON=ON \
      -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DCMAKE_CUDA_ARCHITECTURES="80;89;90" >/dev/null
    cmake --build build/cuda -j "$JOBS" --target meswitch_cuda meswitch_cuda_tests CMakeFiles/_core.dir/src/bindings_cuda.cpp.o
    ctest --test-dir build/cuda --output-on-failure -R '^cuda[.]'
    ;;
  cuda-develop)
    build_cpp build/cuda-dev -DMESWITCH_CUDA=ON -DMESWITCH_PYTHON=ON -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}"
    for module in build/cuda-dev/_core*.so; do ln -sf "../../$module" python/meswitch/; done
    ;;
  bench-io)
    deps
    install_python
    python3 bench/io/bench_read.py "${@:2}"
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
