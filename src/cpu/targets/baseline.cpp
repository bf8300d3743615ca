// The CPU kernels built for baseline (compile flags in CMakeLists.txt).
#include <omp.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/cpu.h"
#include "numeric.h"

#define MSDA_VEC_BYTES 16
// The fallback: best() picks it only on an x86-64 CPU without AVX2 (Arm's best is neon at least),
// so it carries the runtime-D kernels alone, a third of the code: every build (tests, sanitizers,
// the wheel, Arm) compiles this file, and the D = 32 and 64 kernels were most of its time.
#define MSDA_SPECIALIZE_D 0
namespace msda::cpu::baseline {
#include "cpu/kernels.inl"
}  // namespace msda::cpu::baseline
