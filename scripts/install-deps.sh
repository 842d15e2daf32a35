#!/usr/bin/env bash
# The one place that installs meswitch's dependencies: Debian packages for the C++
# side (Eigen, nlohmann/json, Catch2, clang for the fuzzer) and the pinned Python
# packages. Used by ./dev.sh and therefore by .ci/run and the README. Idempotent:
# a machine that already has everything spends a few seconds here.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libeigen3-dev nlohmann-json3-dev catch2 clang libclang-rt-14-dev)

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "[deps] apt: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "[deps] pip: scripts/requirements.txt"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r scripts/requirements.txt
echo "[deps] ready"
