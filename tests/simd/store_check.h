// Included by tests/simd/store_*.cpp inside the namespace where they include cpu/simd.h, after
// it: the vector store() of that target against Storage<V>::store, lane by lane.
#pragma once

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
