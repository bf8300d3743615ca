#!/usr/bin/env bash
# The lane logic of the AVX-512 kernels (64-byte vectors: 16 f32 lanes, 8 f64), checked on a
# machine without AVX-512. kernels.inl is written once over GCC vector types, so with
# MSDA_VEC_BYTES 64 and the x86 intrinsics of simd.h left out (their generic loops instead) it
# compiles for AVX2, GCC splitting each vector in two. That build takes the avx2 target's place in
# a copy of build/libmsda.a, the C++ suite (build/tests/msda_tests) is linked again against it and
# run on the avx2 slot (MSDA_TEST_ISA=avx2): every block size, shuffle and tail that only 16-lane
# vectors reach is compared with the float64 reference. Speed means nothing here (-O1, split
# vectors, no FMA contraction, which also keeps the reference's rounding of coordinates).
# CI runs it where the machine cannot run the avx512 target itself; about 2 minutes on 2 cores
# after scripts/test.sh has built build/.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build
out=$PWD/$build/wide-vectors
[[ -f $build/CMakeCache.txt ]] || { echo "wide-vectors-check: no build/: run scripts/test.sh first" >&2; exit 1; }
# The library and the suite as the sources stand (nothing to do after scripts/test.sh): the wide
# kernels below are linked against this build's cpu.cpp, whose scratch layout must match theirs.
cmake --build "$build" --target msda_tests -j"$(nproc)" >/dev/null
link_txt=$build/tests/CMakeFiles/msda_tests.dir/link.txt
[[ -f $build/libmsda.a && -f $link_txt ]] ||
  { echo "wide-vectors-check: needs build/ made by scripts/build.sh (Makefiles: $link_txt)" >&2; exit 1; }
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
mkdir -p "$out/cpu"
started=$SECONDS

# simd.h without the x86 block (so no intrinsics, whose 512-bit forms need AVX-512): every lane
# operation then takes its generic form. kernels.inl and the target file point at the copies.
python3 - "$out" <<'PY'
import sys
out = sys.argv[1]
def swap(text, old, new):
    if old not in text:
        sys.exit(f"wide-vectors-check: '{old}' not found: the script no longer matches the sources")
    return text.replace(old, new)
simd = open('src/cpu/simd.h').read()
simd = swap(simd, '#if defined(__x86_64__) || defined(__i386__)', '#if 0  // wide-vectors-check: no intrinsics')
open(f'{out}/cpu/simd.h', 'w').write(simd)
kernels = swap(open('src/cpu/kernels.inl').read(), '#include "cpu/simd.h"', f'#include "{out}/cpu/simd.h"')
open(f'{out}/kernels.inl', 'w').write(kernels)
target = open('src/cpu/targets/avx2.cpp').read()
target = swap(target, '"cpu/kernels.inl"', f'"{out}/kernels.inl"')
target = swap(target, '#define MSDA_VEC_BYTES 32', '#define MSDA_VEC_BYTES 64')
open(f'{out}/avx2_as_avx512.cpp', 'w').write(target)
PY
"${cxx:-c++}" -O1 -DNDEBUG -fPIC -std=gnu++20 -fopenmp -DMSDA_CPU_TARGETS_X86=1 -Iinclude -Isrc -march=x86-64-v3 \
  -mno-f16c -ffp-contract=off -fno-trapping-math -Wno-psabi -c "$out/avx2_as_avx512.cpp" -o "$out/avx2_as_avx512.o"

# The archive's avx2 member replaced by the wide build, under the member's own name.
cp "$build/libmsda.a" "$out/libmsda.a"
member=$(ar t "$out/libmsda.a" | grep -x 'avx2\.cpp\.o') ||
  { echo "wide-vectors-check: build/libmsda.a has no avx2 target (an x86-64 build is needed)" >&2; exit 1; }
cp "$out/avx2_as_avx512.o" "$out/$member"
(cd "$out" && ar r libmsda.a "$member")

# msda_tests linked as CMake links it (from build/tests), against the copy: paths relative to
# build/tests, so that nothing of the checkout's own path passes through sed or eval.
link=$(sed -e "s| ../libmsda.a | ../wide-vectors/libmsda.a |g" -e "s| -o msda_tests | -o ../wide-vectors/msda_tests |" "$link_txt")
[[ $link == *" ../wide-vectors/libmsda.a "* && $link == *"-o ../wide-vectors/msda_tests "* ]] ||
  { echo "wide-vectors-check: msda_tests' link line has changed shape" >&2; exit 1; }
(cd "$build/tests" && eval "$link")

# The CUDA tests need a GPU or test the emulated CUDA backend (no CPU kernel); SimdStore tests
# the x86 stores' intrinsics, left out of this build.
(cd "$build/tests" && MSDA_TEST_ISA=avx2 "$out/msda_tests" --gtest_filter='-Cuda*:SimdStore*' --gtest_brief=1)
echo "wide-vectors-check: passed in $((SECONDS - started)) s"
