#!/usr/bin/env bash
# Configures and builds everything into build/ (Release): the core library, its tests, benchmarks
# and examples, and the PyTorch op against the torch of the project's environment (.venv, or
# MSDA_PYTHON; scripts/venv.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(scripts/venv.sh | tail -n 1)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python" >/dev/null
cmake --build build -j"$(nproc)"
