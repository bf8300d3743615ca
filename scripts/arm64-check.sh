#!/usr/bin/env bash
# The CPU backend on 64-bit Arm, checked on an x86-64 machine, bounded for CI (about 6 minutes
# on 2 cores from a clean tree, 4 when GoogleTest and the build are there already):
#   1. Debian 12's AArch64 cross toolchain and qemu-user (installed through install-deps.sh when
#      missing), and GoogleTest built for AArch64 from Debian's googletest sources
#      (/usr/src/googletest) into build-arm64/googletest, once;
#   2. msda cross-built into build-arm64/ (cmake/toolchains/aarch64-linux-gnu.cmake): the library,
#      the C++ tests (tests/msda_tests) and the demo (examples/msda_demo);
#   3. the C++ suite under qemu-aarch64, once per instruction set (MSDA_TEST_ISA), each on an
#      emulated CPU chosen to exercise the dispatch as well:
#        sve256    -cpu max,sve256=on  SVE, 256-bit vectors (as Graviton3): the whole suite
#        neon      -cpu cortex-a72     ARMv8.0 without SVE (as Graviton1, Raspberry Pi 4): neon and
#                                      the code around it use nothing newer (an illegal instruction
#                                      would end the run)
#        baseline  -cpu max,sve128=on  SVE, 128-bit vectors (as Graviton4, Grace): sve256 refused
#        best      -cpu a64fx          SVE, 512-bit vectors: sve256 refused, best is neon (a subset)
#      Each run is one qemu process per core (scripts/gtest-shards.sh), and first checks the
#      instruction sets the emulated CPU is said to support (the suite prints them).
#      LargeTensors.* (a 4.3 GB tensor, about a minute under emulation) always runs `best`: the
#      sve256 and neon runs have it, the baseline run leaves it out (it would test neon again).
#      The demo runs once on each of those two CPUs, checked against the reference.
# Emulation measures nothing about speed: no timing of msda is printed. Prints a summary with the
# tests and seconds of each step; exits non-zero if any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gtest-shards.sh

triple=aarch64-linux-gnu
build=build-arm64
jobs=${MSDA_ARM64_JOBS:-$(nproc)}
toolchain=$PWD/cmake/toolchains/aarch64-linux-gnu.cmake

scripts/install-deps.sh g++-$triple qemu-user googletest || exit 1

# Short runs whose OpenMP threads would spin between parallel regions: under emulation, on few
# cores, spinning threads starve the working ones.
export OMP_WAIT_POLICY=passive

summary=()
failed=0
started=$SECONDS
# record NAME SECONDS_AT_START STATUS [DETAIL]
record() {
  local verdict=PASS
  if [[ $3 -ne 0 ]]; then verdict=FAIL; failed=1; fi
  summary+=("$(printf '%-4s  %-50s %4ds  %s' "$verdict" "$1" $((SECONDS - $2)) "${4:-}")")
}
finish() {
  echo
  echo "== msda arm64: summary ($((SECONDS - started))s)"
  printf '%s\n' "${summary[@]}"
  if ((failed)); then
    echo "msda arm64: FAILED"
    exit 1
  fi
  echo "msda arm64: all passed"
}

# ---- 1. GoogleTest for the target ----
gtest=$build/googletest
if [[ ! -f $gtest/lib/cmake/GTest/GTestConfig.cmake ]]; then
  echo "== msda arm64: GoogleTest for AArch64 from /usr/src/googletest ($gtest)"
  t=$SECONDS
  mkdir -p "$gtest-build"
  { cmake -S /usr/src/googletest -B "$gtest-build" -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX="$PWD/$gtest" &&
    cmake --build "$gtest-build" -j"$jobs" && cmake --install "$gtest-build"; } >"$gtest-build.log" 2>&1
  status=$?
  ((status)) && tail -n 40 "$gtest-build.log"
  record "googletest build (aarch64)" $t $status
  ((status)) && finish
fi

# ---- 2. msda ----
echo "== msda arm64: cross-build ($build)"
t=$SECONDS
mkdir -p "$build"
cmake -S . -B "$build" -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release -DMSDA_BUILD_TORCH=OFF \
  -DMSDA_BUILD_BENCHMARKS=OFF -DGTest_DIR="$PWD/$gtest/lib/cmake/GTest" >"$build/configure.log" 2>&1 &&
  cmake --build "$build" -j"$jobs" >"$build/build.log" 2>&1
status=$?
((status)) && { cat "$build/configure.log"; tail -n 60 "$build/build.log"; }
record "cross-build (library, tests, demo)" $t $status
((status)) && finish

qemu=(qemu-aarch64 -L /usr/$triple)

# ---- 3. the C++ suite under emulation ----
# suite NAME QEMU_CPU MSDA_TEST_ISA EXPECTED_SUPPORTED [GTEST_FILTER]
suite() {
  local name=$1 cpu=$2 isa=$3 expected=$4 filter=${5:-*}
  local log=$build/tests-$name.log
  echo "== msda arm64: $name: C++ tests, isa $isa, qemu -cpu $cpu${5:+, filter $filter}"
  local t=$SECONDS
  MSDA_TEST_ISA=$isa gtest_shards "$log" timeout -k 10 900 "${qemu[@]}" -cpu "$cpu" "$build/tests/msda_tests" \
    --gtest_brief=1 --gtest_filter="$filter"
  local status=$?
  local supported
  supported=$(sed -n 's/^msda tests: cpu backend instruction sets: *//p' "$log" | head -n 1)
  if [[ $status -eq 0 && $supported != "$expected" ]]; then
    echo "msda arm64: qemu -cpu $cpu: the library supports '$supported', expected '$expected'"
    status=1
  fi
  ((status)) && tail -n 60 "$log"
  local ran
  ran=$(gtest_ran "$log")
  record "$(printf '%-8s (-cpu %s)' "$isa" "$cpu")" $t $status "${ran:-no summary}; supported: ${supported:-?}"
}

demo() {  # CPU ARGS...
  local cpu=$1
  shift
  local t=$SECONDS
  timeout -k 10 300 "${qemu[@]}" -cpu "$cpu" "$build/examples/msda_demo" "$@" --repeats 1 >"$build/demo.log" 2>&1
  local status=$?
  ((status)) && tail -n 30 "$build/demo.log"
  record "demo ${*//--/} (-cpu $cpu)" $t $status "$(grep -Eo 'check: [A-Z]+' "$build/demo.log")"
}

# qemu's SVE emulation is ~10x slower than its NEON one (the whole suite ran past 15 minutes on an
# Intel host): the sve256 run takes the CPU kernels' comparisons with the reference for the v2
# attention, the compile-time D = 32 and 64 paths and a decoder shape, off-map corners under an
# infinite grad_output (the branch-free scatter), plus validation; the neon and baseline runs take
# the whole suite.
suite sve256 max,sve256=on sve256 "best baseline neon sve256" \
  "*v2*:*V2*:Validation.*:Scenarios/CpuVsReference.*/decoder_like*:Scenarios/CpuVsReference.*/D32_*:Scenarios/CpuVsReference.*/D64_*:CpuVsReferenceMisc.OffMapCorners*"
suite neon cortex-a72 neon "best baseline neon"
suite baseline max,sve128=on baseline "best baseline neon" "-LargeTensors.*"
suite best-a64fx a64fx best "best baseline neon" "Validation.*:CpuVsReferenceMisc.*:Concurrency.*:Scenarios/CpuVsReference.*/decoder_like*"
demo max,sve256=on --workload rtdetr-dec
demo cortex-a72 --workload rtdetr-dec --dtype f16

finish
