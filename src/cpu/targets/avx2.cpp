// The CPU kernels built for avx2 (compile flags in CMakeLists.txt).
#include <omp.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/cpu.h"
#include "numeric.h"

#define MSDA_VEC_BYTES 32
namespace msda::cpu::avx2 {
#include "cpu/kernels.inl"
}  // namespace msda::cpu::avx2
