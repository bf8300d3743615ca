// The x86 targets' vector rounding of f32 to bf16 and f16 (cpu/simd.h, store()) against the
// scalar Storage<V>::store that the reference and the other targets use: the same bits on every
// rounding boundary (ties to even included), NaN, inf, overflow and f16 subnormals. Random data
// almost never lands on a tie, so the kernels' tests against the reference alone would miss a
// rounding that breaks ties the other way. (Checked once over all 2^32 patterns, 2026-12-07.)
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#if defined(__x86_64__)
std::int64_t msda_store_mismatches_avx512(bool half, const std::uint32_t* bits, std::int64_t count);
std::int64_t msda_store_mismatches_avx2(bool half, const std::uint32_t* bits, std::int64_t count);

namespace {

// Every combination of `high` bits above `shift` with each of `lows` below it.
void add_boundaries(std::vector<std::uint32_t>& bits, int shift, std::initializer_list<std::uint32_t> lows) {
  for (std::uint64_t high = 0; high < (std::uint64_t(1) << (32 - shift)); ++high)
    for (const std::uint32_t low : lows) bits.push_back(static_cast<std::uint32_t>(high << shift) | low);
}

std::vector<std::uint32_t> patterns() {
  std::vector<std::uint32_t> bits;
  // bf16 keeps the top 16 bits: below them, zero, just past zero, just below, on and past the
  // halfway point, and the largest, for every sign, exponent and kept mantissa.
  add_boundaries(bits, 16, {0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF});
  // f16 normals keep 10 of f32's 23 mantissa bits: the same points below bit 13.
  add_boundaries(bits, 13, {0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF});
  // f16 subnormals and the smallest normals (f32 exponents 101 to 113), where the kept bits
  // shrink: every halfway point and its neighbours, over random upper mantissa bits.
  std::mt19937 rng(7);
  for (std::uint32_t sign = 0; sign < 2; ++sign)
    for (std::uint32_t exponent = 101; exponent <= 113; ++exponent)
      for (int shift = 13; shift <= 24; ++shift)
        for (int k = 0; k < 64; ++k) {
          const std::uint32_t half = std::uint32_t(1) << (shift - 1);
          const std::uint32_t high = (rng() << shift) & 0x7FFFFFu;
          for (const std::uint32_t low : {half - 1, half, half + 1, 0u, 2 * half - 1})
            bits.push_back(sign << 31 | exponent << 23 | ((high | (low & (2 * half - 1))) & 0x7FFFFFu));
        }
  for (int k = 0; k < (1 << 20); ++k) bits.push_back(rng());
  while (bits.size() % 16 != 0) bits.push_back(0);
  return bits;
}

// A target's mismatch counter (msda_store_mismatches_<target>) over patterns(), bf16 then f16.
void expect_no_mismatches(std::int64_t (*mismatches)(bool, const std::uint32_t*, std::int64_t)) {
  const std::vector<std::uint32_t> bits = patterns();
  const auto count = static_cast<std::int64_t>(bits.size());
  EXPECT_EQ(mismatches(false, bits.data(), count), 0) << "bf16, of " << count;
  EXPECT_EQ(mismatches(true, bits.data(), count), 0) << "f16, of " << count;
}

TEST(SimdStore, Avx512RoundsLikeTheScalarConversion) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
    GTEST_SKIP() << "this CPU has no AVX-512";
  expect_no_mismatches(msda_store_mismatches_avx512);
}

TEST(SimdStore, Avx2RoundsLikeTheScalarConversion) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    GTEST_SKIP() << "this CPU has no AVX2";
  expect_no_mismatches(msda_store_mismatches_avx2);
}

}  // namespace
#endif
