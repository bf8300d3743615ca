#!/usr/bin/env bash
# Installs, from Debian 12's packages, whatever msda's build, tests and benchmarks need and this
# machine lacks, plus any packages named as arguments. Idempotent: does nothing (and needs no
# network) when all are present. PyTorch and the other Python packages come from PyPI into the
# project's virtual environment (scripts/venv.sh), not from Debian.
set -euo pipefail

packages=(
  g++ cmake make            # the build
  libgtest-dev              # C++ tests
  libbenchmark-dev          # C++ benchmarks
  python3 python3-venv      # the virtual environment .venv (torch from PyPI)
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
