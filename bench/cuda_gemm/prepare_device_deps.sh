#!/usr/bin/env bash
# Run here, before device_check.sh runs on a GPU machine: that machine reaches no package
# registry, so the build's header-only C++ dependencies (Eigen, nlohmann/json, Catch2 and
# their CMake packages) travel with the working tree as .device/deps.tar.xz (git-ignored through
# .git/info/exclude; about 1.5 MB, where the unpacked headers take 12 MB of the device tool's
# 64 MiB working-tree allowance, most of which the bundled tiny family already uses).
# device_check.sh unpacks it there. Name ".device" in the device run's carry list.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-deps.sh >/dev/null
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
target=$staging/deps/usr
mkdir -p "$target/include" "$target/share/cmake" "$target/lib/cmake" "$target/share/eigen3"
cp -r /usr/include/eigen3 /usr/include/nlohmann /usr/include/catch2 "$target/include/"
cp -r /usr/share/eigen3/cmake "$target/share/eigen3/"
cp -r /usr/share/cmake/nlohmann_json "$target/share/cmake/"
cp -r /usr/lib/cmake/Catch2 "$target/lib/cmake/"
cp /usr/lib/libCatch2WithMain.a "$target/lib/"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .device
mkdir -p .device
tar -C "$staging" -cJf .device/deps.tar.xz deps
du -sh .device/deps.tar.xz
