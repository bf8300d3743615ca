#!/usr/bin/env bash
# Installs what is missing (Debian packages, the .venv of scripts/venv.sh), builds into build/,
# and runs every test through CTest: the C++ suite, the Python suite with .venv's torch, the
# examples, the installed CMake package (tests/consumer) and the wheel (pip wheel .).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
