#!/usr/bin/env bash
# Installs what is missing (Debian packages, the .venv of scripts/venv.sh), builds into build/
# (incrementally after scripts/setup.sh, which built it), and runs the tests through CTest: the
# C++ suite, the Python suite with .venv's torch, the examples and the benchmarks' smoke runs.
# The packaging checks (the wheel from scratch, the installed CMake package, the CUDA backend for
# every GPU architecture) take minutes of their own: scripts/packaging-check.sh, a step of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" --label-exclude packaging
