#!/usr/bin/env bash
# Configures and builds everything into build/ (Release): the core library, its tests, benchmarks
# and examples, and the PyTorch op against the torch of the project's environment (.venv, or
# MSDA_PYTHON; scripts/venv.sh makes it), and the cuda backend wherever the CUDA toolkit is.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(scripts/venv.sh | tail -n 1)
# Where the CUDA toolkit is installed the cuda backend must build (MSDA_CUDA=ON fails the
# configure otherwise), so a change that breaks it fails here rather than going unnoticed.
# Only this machine's GPU architecture (the one its tests run on; sm_90 where no GPU is visible,
# enough to compile-check the kernels): nvcc per architecture is minutes of a 2-core build.
# MSDA_CUDA_ARCHITECTURES overrides; scripts/packaging-check.sh builds all that msda ships.
cuda=AUTO
archs=()
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  cuda=ON
  command -v nvcc >/dev/null || export CUDACXX=/usr/local/cuda/bin/nvcc
  arch=${MSDA_CUDA_ARCHITECTURES:-}
  if [[ -z $arch ]] && command -v nvidia-smi >/dev/null; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ' || true)
    [[ -n $arch ]] && arch="$arch-real"
  fi
  archs=(-DCMAKE_CUDA_ARCHITECTURES="${arch:-90-real}")
fi
# MSDA_CUDA_EMULATION_SOURCE= : the emulated CUDA tests from src/, even after a mutation check
# that was killed before it could say so itself (scripts/mutation-check.sh).
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python" -DMSDA_CUDA=$cuda "${archs[@]}" \
  -DMSDA_CUDA_EMULATION_SOURCE= >/dev/null
cmake --build build -j"$(nproc)"
