#!/usr/bin/env bash
# The whole GPU check on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc) and a Python with
# torch, and no network: builds msda with its CUDA backend into build-gpu/, runs the GPU tests
# (CTest's CUDA tests, tests/python/test_cuda.py) and prints bench/gpu_bench.py's table for every
# named workload (also written to build-gpu/gpu-bench.json). Meant to finish within 8 minutes on
# one GPU; each phase prints its seconds.
#
#   scripts/gpu-check.sh [PYTHON]      PYTHON: an interpreter with torch (default: $MSDA_PYTHON,
#                                      else python3)
#   CUDA_ARCHITECTURES=90 scripts/gpu-check.sh   builds for that architecture only (quicker);
#                                      default: the project's own list
set -euo pipefail
cd "$(dirname "$0")/.."

python=${1:-${MSDA_PYTHON:-python3}}
build="build-gpu"
cpp_tests=0
export PYTHONUNBUFFERED=1
started=$SECONDS

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

# phase NAME COMMAND...: runs COMMAND, then prints how long it took; a failure ends the script.
phase() {
  local name=$1 t0=$SECONDS
  shift
  echo
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - t0)) s"
}

check_machine() {
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
  nvidia-smi -L
  if [[ -z ${CUDACXX:-} ]] && ! command -v nvcc >/dev/null; then
    # The toolkit's usual home is often left off PATH.
    [[ -x /usr/local/cuda/bin/nvcc ]] || die "nvcc not found: install the CUDA toolkit, or set CUDACXX to its nvcc"
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  "${CUDACXX:-nvcc}" --version | tail -n 1
  command -v cmake >/dev/null || die "cmake not found"
  "$python" -c 'import torch' 2>/dev/null || die "$python cannot import torch: pass a Python with torch as the argument"
  "$python" - <<'PY' || die "$python's torch sees no CUDA GPU (a CPU-only torch build?)"
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
PY
}

configure() {
  local args=(-S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python" -DMSDA_BUILD_BENCHMARKS=OFF)
  if [[ -n ${CUDA_ARCHITECTURES:-} ]]; then
    args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES")
  fi
  # Ninja when there is one, but never a second generator for an existing build tree.
  if command -v ninja >/dev/null && [[ ! -f $build/CMakeCache.txt ]]; then
    args+=(-G Ninja)
  fi
  mkdir -p "$build"
  if cmake "${args[@]}" -DMSDA_BUILD_TESTS=ON >"$build/configure.log" 2>&1; then
    cpp_tests=1
  elif grep -q GTest "$build/configure.log"; then
    # A bare GPU machine may lack GoogleTest and cannot download it: the Python tests still run.
    echo "gpu-check: GoogleTest not found, building without the C++ tests (no ctest phase)"
    cpp_tests=0
    cmake "${args[@]}" -DMSDA_BUILD_TESTS=OFF >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; return 1; }
  else
    cat "$build/configure.log"
    return 1
  fi
  grep -iE "cuda|nvcc" "$build/configure.log" || true
}

build_msda() {
  cmake --build "$build" -j"$(nproc)"
  PYTHONPATH=$build/python "$python" - <<'PY' || die "msda was built without its CUDA backend: CMake did not use nvcc (see $build/configure.log and CMAKE_CUDA_COMPILER in $build/CMakeCache.txt)"
import sys, msda
built = getattr(msda, "cuda_built", lambda: False)()
print(f"msda {msda.__version__}: cuda_built() = {built}, cuda_available() = {built and msda.cuda_available()}")
sys.exit(0 if built and msda.cuda_available() else 1)
PY
}

cpp_cuda_tests() {
  if ((cpp_tests == 0)); then
    echo "skipped: built without GoogleTest"
    return
  fi
  # gtest names (CudaForward.*, ...) and CTest names (*_cuda_*) both count; none found is an error.
  ctest --test-dir "$build" -R '[Cc][Uu][Dd][Aa]' --no-tests=error --output-on-failure -j"$(nproc)"
}

python_cuda_tests() {
  PYTHONPATH=$build/python "$python" -m pytest -q -rs -p no:cacheprovider tests/python/test_cuda.py
}

benchmark() {
  PYTHONPATH=$build/python "$python" bench/gpu_bench.py --json "$build/gpu-bench.json"
}

phase "machine" check_machine
phase "configure ($build)" configure
phase "build" build_msda
phase "C++ CUDA tests (ctest -R cuda)" cpp_cuda_tests
phase "Python CUDA tests (tests/python/test_cuda.py)" python_cuda_tests
phase "benchmark (bench/gpu_bench.py)" benchmark

elapsed=$((SECONDS - started))
echo
echo "gpu-check: everything passed in $elapsed s"
((elapsed <= 480)) || echo "gpu-check: over the 8-minute target ($elapsed s)" >&2
