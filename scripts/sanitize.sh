#!/usr/bin/env bash
# Sanitizer builds and runs, bounded for CI, each in its own build directory:
#   1. build-asan: AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer): the C++ test
#      suite (tests/msda_tests), the emulated CUDA kernels (tests/msda_cuda_emulated_tests, ~1 min;
#      ASan warns that it does not fully support the emulator's swapcontext, and has reported
#      nothing false there), each as one process per core (scripts/gtest-shards.sh), and the
#      example smoke tests.
#   2. build-tsan: ThreadSanitizer on the multi-threaded tests (Determinism*, *Thread*), on the
#      best instruction set. GCC's libgomp is not TSan-instrumented (false positives), so this
#      build links LLVM's OpenMP runtime (libomp, from libomp-14-dev) and runs with its TSan tool,
#      Archer, which tells TSan about OpenMP's barriers and tasks.
#   3. build-fuzz: the libFuzzer harness fuzz/fuzz_msda (ASan + UBSan) for MSDA_FUZZ_SECONDS
#      (default 60) from the seed corpus fuzz/corpus (new inputs go to build-fuzz/corpus, crashes to
#      build-fuzz/artifacts/).
# All three use GCC: the CPU kernels use GCC-only vector builtins, so the library does not build
# with clang (MSDA_FUZZ_CXX=clang++ selects clang for the fuzzer once it does). Installs what is
# missing from Debian 12 first (only when dpkg says something is). Prints a summary; exits
# non-zero if any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gtest-shards.sh

fuzz_seconds=${MSDA_FUZZ_SECONDS:-60}
fuzz_cxx=${MSDA_FUZZ_CXX:-g++}
jobs=${MSDA_SANITIZE_JOBS:-$(nproc)}
llvm_lib=${MSDA_LLVM_LIBDIR:-/usr/lib/llvm-14/lib}  # libomp.so and libarcher.so

# LLVM's OpenMP runtime and Archer (TSan), clang's libFuzzer runtime, beside the usual build.
extra=(libomp-14-dev libclang-rt-14-dev)
[[ $fuzz_cxx == clang* ]] && extra+=(clang-14)
scripts/install-deps.sh "${extra[@]}" || exit 1

# The OpenMP threads of these short runs sleep instead of spinning between parallel regions: on a
# machine with few cores spinning threads starve the rest (and TSan makes spinning expensive).
export OMP_WAIT_POLICY=passive
# allocator_may_return_null: an impossible allocation must be the std::bad_alloc the library promises
# (tests/test_reliability.cpp), not an ASan abort.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_init_order=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1}

summary=()
failed=0
started=$SECONDS
# record NAME SECONDS_AT_START STATUS [DETAIL]
record() {
  local verdict=PASS
  if [[ $3 -ne 0 ]]; then verdict=FAIL; failed=1; fi
  summary+=("$(printf '%-4s  %-34s %4ds  %s' "$verdict" "$1" $((SECONDS - $2)) "${4:-}")")
}

# -O1 -g1, not RelWithDebInfo's -O2 -g: the sanitizers check the same source-level operations at
# -O1 (what their documentation suggests), and -g1's line tables keep file:line in every report.
# The three builds compile the CPU kernels once per instruction set, and these were most of CI's
# time: the AVX-512 kernels' file under ASan took 299 s at -O2 -g, 109 s at -O1 -g1 (AMD EPYC,
# 2 cores, two compiles at once). MSDA_SANITIZE_FLAGS overrides.
flags=${MSDA_SANITIZE_FLAGS:--O1 -g1 -DNDEBUG}

configure_and_build() {  # DIR TARGET CMAKE_ARGS...   (TARGET: all, or the one binary a step runs)
  local dir=$1 target=$2
  shift 2
  mkdir -p "$dir"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$flags" \
    -DMSDA_BUILD_TORCH=OFF -DMSDA_BUILD_BENCHMARKS=OFF "$@" \
    >"$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; return 1; }
  cmake --build "$dir" -j"$jobs" --target "$target" >"$dir/build.log" 2>&1 || { tail -n 60 "$dir/build.log"; return 1; }
}

# ---- 1. ASan + UBSan: the C++ test suite ----
echo "== msda sanitize: ASan + UBSan build (build-asan)"
t=$SECONDS
configure_and_build build-asan all -DMSDA_SANITIZE="address;undefined"
status=$?
record "asan+ubsan build" $t $status
if [[ $status -eq 0 ]]; then
  echo "== msda sanitize: C++ tests under ASan + UBSan + LSan"
  t=$SECONDS
  gtest_shards build-asan/tests.log timeout -k 10 1200 build-asan/tests/msda_tests --gtest_brief=1
  status=$?
  cat build-asan/tests.log
  record "asan+ubsan C++ tests" $t $status "$(gtest_ran build-asan/tests.log)"
  t=$SECONDS
  gtest_shards build-asan/cuda-emulated.log timeout -k 10 600 build-asan/tests/msda_cuda_emulated_tests --gtest_brief=1
  status=$?
  cat build-asan/cuda-emulated.log
  record "asan+ubsan emulated CUDA kernels" $t $status "$(gtest_ran build-asan/cuda-emulated.log)"
  t=$SECONDS
  ctest --test-dir build-asan -L smoke --output-on-failure >build-asan/smoke.log 2>&1
  status=$?
  ((status)) && tail -n 60 build-asan/smoke.log
  record "asan+ubsan example smoke tests" $t $status "$(grep -Eo '[0-9]+% tests passed.*' build-asan/smoke.log)"
fi

# ---- 2. TSan + Archer: the threaded tests ----
echo "== msda sanitize: TSan build with LLVM's libomp (build-tsan)"
t=$SECONDS
# With every kernel: only the runtime-D ones (-DMSDA_SPECIALIZE_D=0) compiled in 40 s instead of
# 70 but ran the threaded tests in 200 s instead of 176 (Intel Xeon, 2 cores): no time saved.
configure_and_build build-tsan msda_tests -DMSDA_SANITIZE=thread -DMSDA_BUILD_EXAMPLES=OFF \
  -DOpenMP_CXX_LIB_NAMES=omp -DOpenMP_omp_LIBRARY="$llvm_lib/libomp.so"
status=$?
if [[ $status -eq 0 ]] && ldd build-tsan/tests/msda_tests | grep -q libgomp; then
  echo "msda sanitize: build-tsan/tests/msda_tests links libgomp, not libomp"
  status=1
fi
record "tsan build (libomp)" $t $status
if [[ $status -eq 0 ]]; then
  echo "== msda sanitize: threaded tests under TSan + Archer"
  t=$SECONDS
  # One instruction set (best): how work is split among threads (cpu.cpp) and the parallel loops
  # are the same source for every ISA, whose kernels differ in vector width; the tests that loop
  # over ISAs took most of the run (175 s for all four, Intel Xeon, 2 cores). The ASan run and
  # scripts/test.sh keep every ISA.
  MSDA_TEST_ISA=best OMP_TOOL_LIBRARIES="$llvm_lib/libarcher.so" ARCHER_OPTIONS=verbose=1 \
    TSAN_OPTIONS="ignore_noninstrumented_modules=1 exitcode=66 ${TSAN_OPTIONS:-}" \
    timeout -k 10 1200 build-tsan/tests/msda_tests --gtest_brief=1 --gtest_filter='*Determinism*:*Thread*' \
    >build-tsan/tests.log 2>&1
  status=$?
  grep -v '^Archer detected' build-tsan/tests.log
  if ! grep -q 'Archer detected OpenMP application with TSan' build-tsan/tests.log; then
    echo "msda sanitize: Archer ($llvm_lib/libarcher.so) did not attach: OpenMP synchronization is invisible to TSan"
    status=1
  fi
  races=$(grep -c 'WARNING: ThreadSanitizer' build-tsan/tests.log)
  record "tsan threaded tests" $t $status "$(grep -Eo '[0-9]+ tests? from [0-9]+ test suites? ran' build-tsan/tests.log | head -n 1), $races TSan reports"
fi

# ---- 3. libFuzzer ----
echo "== msda sanitize: fuzzer build ($fuzz_cxx, ASan + UBSan, build-fuzz)"
t=$SECONDS
configure_and_build build-fuzz fuzz_msda -DCMAKE_CXX_COMPILER="$fuzz_cxx" -DMSDA_BUILD_FUZZERS=ON \
  -DMSDA_SANITIZE="address;undefined" -DMSDA_BUILD_TESTS=OFF -DMSDA_BUILD_EXAMPLES=OFF
status=$?
record "fuzzer build" $t $status
if [[ $status -eq 0 ]]; then
  echo "== msda sanitize: fuzz_msda for ${fuzz_seconds}s from fuzz/corpus"
  t=$SECONDS
  mkdir -p build-fuzz/corpus build-fuzz/artifacts
  # -timeout: one input may take 30 s at most; the outer timeout ends a process whose crash
  # handling itself hangs (two OpenMP threads failing at once).
  timeout -k 10 $((fuzz_seconds + 120)) build-fuzz/fuzz/fuzz_msda -max_total_time="$fuzz_seconds" -timeout=30 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=build-fuzz/artifacts/ build-fuzz/corpus fuzz/corpus \
    >build-fuzz/fuzz.log 2>&1
  status=$?
  if ((status)); then
    grep -v -E '^#[0-9]+ +(NEW|REDUCE|pulse)' build-fuzz/fuzz.log | tail -n 80
    echo "msda sanitize: the failing input is in build-fuzz/artifacts/; reproduce with build-fuzz/fuzz/fuzz_msda <file>"
    echo "(MSDA_FUZZ_DUMP=1 prints the problem's tensors)"
  fi
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' build-fuzz/fuzz.log | grep -Eo '[0-9]+$')
  rate=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' build-fuzz/fuzz.log | grep -Eo '[0-9]+$')
  corpus=$(find build-fuzz/corpus fuzz/corpus -type f | wc -l)
  record "fuzz_msda ${fuzz_seconds}s" $t $status "${runs:-?} executions, ${rate:-?} exec/s, corpus $corpus files"
fi

echo
echo "== msda sanitize: summary ($((SECONDS - started))s)"
printf '%s\n' "${summary[@]}"
if ((failed)); then
  echo "msda sanitize: FAILED"
  exit 1
fi
echo "msda sanitize: all passed"
