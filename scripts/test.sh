#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (C++ and Python) through CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
