#!/usr/bin/env bash
# Run here, before device_check.sh runs on a GPU machine: that machine reaches no package
# registry, so the build's header-only C++ dependencies (Eigen, nlohmann/json, Catch2 and
# their CMake packages) travel with the working tree in .device/deps (git-ignored through
# .git/info/exclude). Name ".device" in the device run's carry list.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-deps.sh >/dev/null
target=.device/deps/usr
rm -rf .device/deps
mkdir -p "$target/include" "$target/share/cmake" "$target/lib/cmake" "$target/share/eigen3"
cp -r /usr/include/eigen3 /usr/include/nlohmann /usr/include/catch2 "$target/include/"
cp -r /usr/share/eigen3/cmake "$target/share/eigen3/"
cp -r /usr/share/cmake/nlohmann_json "$target/share/cmake/"
cp -r /usr/lib/cmake/Catch2 "$target/lib/cmake/"
cp /usr/lib/libCatch2WithMain.a "$target/lib/"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> "$(git rev-parse --git-path info/exclude)"
du -sh .device
