#!/usr/bin/env bash
# CI's packaging step, after scripts/test.sh has built build/: `pip wheel .` from scratch and the
# wheel installed elsewhere (tests/packaging/wheel.sh), the installed CMake package used by
# another project (tests/packaging/cmake_consumer.sh), and, where nvcc is, the CUDA backend compiled
# for every GPU architecture msda ships (sm_75, sm_80, sm_90 and sm_90 PTX; scripts/build.sh
# builds only this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
ctest --test-dir build --output-on-failure --label-regex packaging
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  command -v nvcc >/dev/null || export CUDACXX=/usr/local/cuda/bin/nvcc
  started=$SECONDS
  # Only the CUDA backend's translation unit (the rest of the library is what scripts/test.sh
  # built), its architectures compiled side by side (nvcc --threads): 253 s for the whole library
  # with the architectures one after another, 45 s for this (AMD EPYC, 2 cores). Makefiles, whose
  # per-object targets (src/cuda/cuda.o) this names.
  cmake -S . -B build-cuda-all -G "Unix Makefiles" -DCMAKE_BUILD_TYPE=Release -DMSDA_CUDA=ON \
    -DCMAKE_CUDA_FLAGS="--threads $(nproc)" -DMSDA_BUILD_TESTS=OFF -DMSDA_BUILD_BENCHMARKS=OFF \
    -DMSDA_BUILD_EXAMPLES=OFF -DMSDA_BUILD_TORCH=OFF >/dev/null
  cmake --build build-cuda-all --target src/cuda/cuda.o
  echo "msda: the CUDA backend built for every architecture in $((SECONDS - started)) s"
fi
