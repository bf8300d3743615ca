#!/usr/bin/env bash
# Installs, from Debian 12's packages, whatever msda's build, tests and benchmarks need and this
# machine lacks, plus any packages named as arguments. Idempotent: does nothing (and needs no
# network) when all are present.
set -euo pipefail

packages=(
  g++ cmake make            # the build
  libgtest-dev              # C++ tests
  libbenchmark-dev          # C++ benchmarks
  libtorch-dev python3-torch python3-pytest python3-numpy  # the PyTorch op and its tests
  python3-matplotlib        # charts of the benchmark report
  libopenblas0-pthread      # torch's Linear layers: the default reference BLAS is ~14x slower
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "msda: installing ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
