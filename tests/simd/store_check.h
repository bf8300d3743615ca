// The body of tests/simd/store_<target>.cpp, which define MSDA_VEC_BYTES and MSDA_STORE_TARGET
// (the target's name) before including it: that target's cpu/simd.h in a namespace of its own,
// and msda_store_mismatches_<target>, for test_simd_store.cpp.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "numeric.h"

#define MSDA_STORE_PASTE_(a, b) a##b
#define MSDA_STORE_PASTE(a, b) MSDA_STORE_PASTE_(a, b)

namespace msda::cpu::MSDA_STORE_PASTE(store_test_, MSDA_STORE_TARGET) {
#include "cpu/simd.h"

// How many of `count` f32 bit patterns the target's store() rounds to other V bits than the
// scalar Storage<V>::store (`count` a multiple of the target's lanes).
template <class V>
std::int64_t store_mismatches(const std::uint32_t* bits, std::int64_t count) {
  constexpr int kL = kLanes<float>;
  std::int64_t mismatches = 0;
  for (std::int64_t at = 0; at + kL <= count; at += kL) {
    Vec<float> lanes;
    __builtin_memcpy(&lanes, bits + at, sizeof(lanes));
    V got[kL];
    store(got, lanes);
    for (int i = 0; i < kL; ++i) mismatches += got[i].bits != Storage<V>::store(lanes[i]).bits;
  }
  return mismatches;
}
}  // namespace msda::cpu::store_test_<target>

std::int64_t MSDA_STORE_PASTE(msda_store_mismatches_, MSDA_STORE_TARGET)(bool half, const std::uint32_t* bits,
                                                                          std::int64_t count) {
  using namespace msda::cpu::MSDA_STORE_PASTE(store_test_, MSDA_STORE_TARGET);
  return half ? store_mismatches<msda::f16>(bits, count) : store_mismatches<msda::bf16>(bits, count);
}
