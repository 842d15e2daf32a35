#!/usr/bin/env bash
# Builds bench_router (Release, no tests) and runs the router latency benchmark on one core.
set -euo pipefail
cd "$(dirname "$0")/../.."
cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DMESWITCH_TESTS=OFF -DMESWITCH_CUDA=OFF >/dev/null
cmake --build build/bench --target bench_router >/dev/null
PYTHONPATH=python python3 bench/router/bench_router.py --cpp build/bench/bench/router/bench_router "$@"
