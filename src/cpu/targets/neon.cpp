// The CPU kernels built for neon (compile flags in CMakeLists.txt).
#include <arm_neon.h>
#include <omp.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/cpu.h"
#include "numeric.h"

#define MSDA_VEC_BYTES 16
#define MSDA_TARGET_NEON 1
// Half of the 32 vector registers for the forward's accumulators, the rest for loads and weights.
#define MSDA_ACCUMULATOR_REGS 16
namespace msda::cpu::neon {
#include "cpu/kernels.inl"
}  // namespace msda::cpu::neon
