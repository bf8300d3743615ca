#!/usr/bin/env bash
# Configures and builds everything into build/ (Release): the core library, its tests, benchmarks
# and examples, and the PyTorch op against the torch of the project's environment (.venv, or
# MSDA_PYTHON; scripts/venv.sh makes it), and the cuda backend wherever the CUDA toolkit is.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(scripts/venv.sh | tail -n 1)
# Where the CUDA toolkit is installed the cuda backend must build (MSDA_CUDA=ON fails the
# configure otherwise), so a change that breaks it fails here rather than going unnoticed.
cuda=AUTO
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  cuda=ON
  command -v nvcc >/dev/null || export CUDACXX=/usr/local/cuda/bin/nvcc
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python" -DMSDA_CUDA=$cuda >/dev/null
cmake --build build -j"$(nproc)"
