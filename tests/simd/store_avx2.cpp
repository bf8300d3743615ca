// The avx2 target's simd.h (built with that target's flags: tests/CMakeLists.txt), for
// test_simd_store.cpp.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "numeric.h"

#define MSDA_VEC_BYTES 32
namespace msda::cpu::store_test_avx2 {
#include "cpu/simd.h"
#include "simd/store_check.h"
}  // namespace msda::cpu::store_test_avx2

std::int64_t msda_store_mismatches_avx2(bool half, const std::uint32_t* bits, std::int64_t count) {
  using namespace msda;
  return half ? cpu::store_test_avx2::store_mismatches<f16>(bits, count) : cpu::store_test_avx2::store_mismatches<bf16>(bits, count);
}
