#!/usr/bin/env bash
# CI's packaging step, after scripts/test.sh has built build/: `pip wheel .` from scratch and the
# wheel installed elsewhere (tests/packaging/wheel.sh), the installed CMake package used by
# another project (tests/packaging/cmake_consumer.sh), and, where nvcc is, the CUDA backend built
# for every GPU architecture msda ships (sm_75, sm_80, sm_90 and sm_90 PTX; scripts/build.sh
# builds only this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
ctest --test-dir build --output-on-failure --label-regex packaging
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  command -v nvcc >/dev/null || export CUDACXX=/usr/local/cuda/bin/nvcc
  started=$SECONDS
  cmake -S . -B build-cuda-all -DCMAKE_BUILD_TYPE=Release -DMSDA_CUDA=ON -DMSDA_BUILD_TESTS=OFF \
    -DMSDA_BUILD_BENCHMARKS=OFF -DMSDA_BUILD_EXAMPLES=OFF -DMSDA_BUILD_TORCH=OFF >/dev/null
  cmake --build build-cuda-all -j"$(nproc)" --target msda
  echo "msda: the CUDA backend built for every architecture in $((SECONDS - started)) s"
fi
