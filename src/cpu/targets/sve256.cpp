// The CPU kernels built for sve256 (compile flags in CMakeLists.txt): SVE with the vector length
// fixed at 256 bits, so that kernels.inl's 32-byte GCC vector types are whole SVE registers.
// cpu.cpp runs them only where the length is 256 bits.
#include <arm_sve.h>
#include <omp.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/cpu.h"
#include "numeric.h"

#define MSDA_VEC_BYTES 32
#define MSDA_TARGET_SVE 1
// Half of the 32 vector registers for the forward's accumulators, the rest for loads and weights.
#define MSDA_ACCUMULATOR_REGS 16
namespace msda::cpu::sve256 {
#include "cpu/kernels.inl"
}  // namespace msda::cpu::sve256
