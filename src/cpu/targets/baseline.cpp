// The CPU kernels built for baseline (compile flags in CMakeLists.txt).
#include <omp.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/cpu.h"
#include "numeric.h"

#define MSDA_VEC_BYTES 16
namespace msda::cpu::baseline {
#include "cpu/kernels.inl"
}  // namespace msda::cpu::baseline
