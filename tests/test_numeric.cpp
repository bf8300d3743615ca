// numeric.h: the bf16 and f16 storage conversions, against GCC's _Float16 (software conversions
// of libgcc, round to nearest even; on AArch64, whose GCC has no _Float16 in C++, __fp16 and the
// hardware's fcvt) and against hand-computed bf16 cases.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "numeric.h"

namespace {

using msda::bf16;
using msda::f16;

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t bits) { return std::bit_cast<float>(bits); }

#if defined(__aarch64__)
using GccHalf = __fp16;
#else
using GccHalf = _Float16;
#endif

float gcc_f16_to_float(std::uint16_t bits) {
  GccHalf h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

std::uint16_t gcc_float_to_f16(float f) {
  const GccHalf h = static_cast<GccHalf>(f);
  std::uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

bool f16_is_nan(std::uint16_t bits) { return (bits & 0x7C00u) == 0x7C00u && (bits & 0x3FFu) != 0; }
bool bf16_is_nan(std::uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u && (bits & 0x7Fu) != 0; }

// Compares float_to_f16(f) with GCC's conversion; NaN must stay NaN with its sign.
::testing::AssertionResult f16_matches_gcc(float f) {
  const std::uint16_t got = msda::float_to_f16(f).bits;
  const std::uint16_t want = gcc_float_to_f16(f);
  if (std::isnan(f)) {
    if (f16_is_nan(got) && (got & 0x8000u) == (want & 0x8000u)) return ::testing::AssertionSuccess();
  } else if (got == want) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "float_to_f16(" << f << " = 0x" << std::hex << bits_of(f)
                                       << ") = 0x" << got << ", _Float16 gives 0x" << want;
}

// Round-to-nearest-even to bf16 computed independently: the two bf16 neighbours of f, compared in
// double.
std::uint16_t expected_bf16(float f) {
  const std::uint32_t x = bits_of(f);
  const std::uint16_t lo = static_cast<std::uint16_t>(x >> 16);  // truncation, toward zero
  if ((x & 0xFFFFu) == 0) return lo;
  const std::uint16_t hi = static_cast<std::uint16_t>(lo + 1);  // next magnitude up
  const double mag = std::fabs(static_cast<double>(f));
  const double lo_mag = std::fabs(static_cast<double>(float_of(static_cast<std::uint32_t>(lo) << 16)));
  // hi may be inf (0x7F80): its "value" for rounding purposes is 2^128.
  const double hi_mag = (hi & 0x7FFFu) == 0x7F80u
                            ? std::ldexp(1.0, 128)
                            : std::fabs(static_cast<double>(float_of(static_cast<std::uint32_t>(hi) << 16)));
  const double d_lo = mag - lo_mag, d_hi = hi_mag - mag;
  if (d_lo < d_hi) return lo;
  if (d_hi < d_lo) return hi;
  return (lo & 1u) ? hi : lo;
}

TEST(NumericF16, ToFloatMatchesGccForAllBitPatterns) {
  int mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float got = msda::f16_to_float(f16{bits});
    const float want = gcc_f16_to_float(bits);
    bool ok;
    if (std::isnan(want))
      ok = std::isnan(got) && std::signbit(got) == std::signbit(want);
    else
      ok = bits_of(got) == bits_of(want);  // also tells -0 from +0
    if (!ok && ++mismatches <= 10)
      ADD_FAILURE() << "f16_to_float(0x" << std::hex << b << ") = " << got << " (0x"
                    << bits_of(got) << "), _Float16 gives " << want << " (0x" << bits_of(want)
                    << ")";
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(NumericF16, KnownValues) {
  EXPECT_EQ(msda::f16_to_float(f16{0x3C00}), 1.0f);
  EXPECT_EQ(msda::f16_to_float(f16{0xC000}), -2.0f);
  EXPECT_EQ(msda::f16_to_float(f16{0x7BFF}), 65504.0f);
  EXPECT_EQ(msda::f16_to_float(f16{0x0001}), 0x1p-24f);
  EXPECT_EQ(msda::f16_to_float(f16{0x03FF}), 1023 * 0x1p-24f);
  EXPECT_EQ(msda::f16_to_float(f16{0x0400}), 0x1p-14f);
  EXPECT_EQ(msda::f16_to_float(f16{0x7C00}), std::numeric_limits<float>::infinity());
  EXPECT_EQ(msda::f16_to_float(f16{0xFC00}), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(msda::f16_to_float(f16{0x7E00})));
  EXPECT_TRUE(std::isnan(msda::f16_to_float(f16{0x7C01})));  // signalling NaN stays NaN
  EXPECT_TRUE(std::signbit(msda::f16_to_float(f16{0x8000})));
  EXPECT_EQ(msda::f16_to_float(f16{0x8000}), 0.0f);
}

TEST(NumericF16, FromFloatHandPickedCases) {
  struct Case {
    float in;
    std::uint16_t out;
  };
  const Case cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3C00},
      {-2.0f, 0xC000},
      {65504.0f, 0x7BFF},
      {65519.99609375f, 0x7BFF},  // just below the halfway point to 65536: stays finite
      {65520.0f, 0x7C00},         // halfway between 65504 and 65536 (even is "65536" = inf)
      {-65520.0f, 0xFC00},
      {1e6f, 0x7C00},
      {0x1p-24f, 0x0001},                       // smallest subnormal
      {0x1p-25f, 0x0000},                       // halfway to the smallest subnormal: even is 0
      {std::nextafter(0x1p-25f, 1.0f), 0x0001}, // just above halfway
      {3 * 0x1p-25f, 0x0002},                   // 1.5 units: to even (2)
      {5 * 0x1p-25f, 0x0002},                   // 2.5 units: to even (2)
      {1023.5f * 0x1p-24f, 0x0400},             // largest subnormal + half: carries to normal
      {0x1p-14f, 0x0400},                       // smallest normal
      {1.0f + 0x1p-11f, 0x3C00},                // halfway, to even
      {1.0f + 3 * 0x1p-11f, 0x3C02},            // halfway, to even (up)
      {std::nextafter(1.0f + 0x1p-11f, 2.0f), 0x3C01},
      {2047.5f, 0x6800},  // halfway between 2047 (odd mantissa) and 2048: to even, 2048
      {0x1p-30f, 0x0000},
      {std::numeric_limits<float>::infinity(), 0x7C00},
      {-std::numeric_limits<float>::infinity(), 0xFC00},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(msda::float_to_f16(c.in).bits, c.out) << "input " << c.in;
    EXPECT_TRUE(f16_matches_gcc(c.in));
  }
  // NaN stays NaN, whatever its payload (even one living only in the low float bits).
  for (std::uint32_t nan : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FBFFFFFu,
                            0x7F802000u}) {
    const std::uint16_t got = msda::float_to_f16(float_of(nan)).bits;
    EXPECT_TRUE(f16_is_nan(got)) << std::hex << nan << " -> " << got;
    EXPECT_EQ(got & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
  }
}

TEST(NumericF16, FromFloatMatchesGccNearEveryRoundingBoundary) {
  // For every finite f16 value and sign: the value itself, the halfway points to its upper
  // neighbour, and floats one ulp either side of them.
  int failures = 0;
  for (std::uint32_t h = 0; h < 0x7C00; ++h) {
    const double lo = msda::f16_to_float(f16{static_cast<std::uint16_t>(h)});
    const double hi = h + 1 == 0x7C00 ? 65536.0 : msda::f16_to_float(f16{static_cast<std::uint16_t>(h + 1)});
    const float mid = static_cast<float>((lo + hi) / 2);  // exact in float
    const float probes[] = {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f),
                            std::nextafter(mid, 1e9f), std::nextafter(static_cast<float>(lo), 1e9f),
                            std::nextafter(static_cast<float>(lo), 0.0f)};
    for (float f : probes) {
      for (float s : {f, -f}) {
        if (!f16_matches_gcc(s) && ++failures <= 10) ADD_FAILURE() << f16_matches_gcc(s).message();
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(NumericF16, FromFloatMatchesGccOnLowBitPatternsOfEveryExponent) {
  // Every float exponent, every top-10-bit mantissa, and low mantissa bits that sit around every
  // rounding position (normal: 13 dropped bits; subnormal: up to 24).
  int failures = 0;
  const std::uint32_t lows[] = {0x0u, 0x1u, 0xFFFu, 0x1000u, 0x1001u, 0x1FFFu, 0x7FFu, 0x800u};
  for (std::uint32_t exponent = 0; exponent < 256; ++exponent) {
    for (std::uint32_t top = 0; top < 1024; top += (exponent >= 95 && exponent <= 145) ? 1 : 37) {
      for (std::uint32_t low : lows) {
        for (std::uint32_t sign : {0u, 0x80000000u}) {
          const float f = float_of(sign | (exponent << 23) | (top << 13) | low);
          if (!f16_matches_gcc(f) && ++failures <= 10) ADD_FAILURE() << f16_matches_gcc(f).message();
        }
      }
    }
    // subnormal results: the rounding position moves with the exponent
    if (exponent >= 102 && exponent < 113) {
      const int shift = 126 - static_cast<int>(exponent);  // bits of (mantissa|2^23) dropped
      const std::uint32_t half = 1u << (shift - 1);
      for (std::uint32_t kept = 0; kept < (1u << (24 - shift)); kept += 1 + (kept >> 6)) {
        for (std::uint32_t rest : {0u, 1u, half - 1, half, half + 1, (1u << shift) - 1}) {
          const std::uint32_t full = (kept << shift) | rest;  // 24 bits incl. the hidden one
          if (!(full & 0x800000u)) continue;
          const float f = float_of((exponent << 23) | (full & 0x7FFFFFu));
          if (!f16_matches_gcc(f) && ++failures <= 10) ADD_FAILURE() << f16_matches_gcc(f).message();
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(NumericF16, FromFloatMatchesGccOnRandomFloats) {
  std::mt19937_64 rng(12345);
  int failures = 0;
  for (int i = 0; i < 4'000'000; ++i) {
    const auto r = static_cast<std::uint32_t>(rng());
    // half the draws uniform over all bit patterns, half with exponents near f16's range
    const std::uint32_t bits =
        (i & 1) ? r : ((r & 0x807FFFFFu) | ((95u + (r >> 23) % 52u) << 23));
    const float f = float_of(bits);
    if (!f16_matches_gcc(f) && ++failures <= 10) ADD_FAILURE() << f16_matches_gcc(f).message();
  }
  EXPECT_EQ(failures, 0);
}

TEST(NumericF16, RoundTripOfEveryF16) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const std::uint16_t back = msda::float_to_f16(msda::f16_to_float(f16{bits})).bits;
    if (f16_is_nan(bits))
      EXPECT_TRUE(f16_is_nan(back)) << std::hex << b;
    else
      EXPECT_EQ(back, bits) << std::hex << b;
  }
}

TEST(NumericBf16, ToFloatIsTheUpperHalf) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float f = msda::bf16_to_float(bf16{static_cast<std::uint16_t>(b)});
    ASSERT_EQ(bits_of(f), b << 16) << std::hex << b;
  }
}

TEST(NumericBf16, RoundToNearestEvenHandPickedCases) {
  struct Case {
    std::uint32_t in;
    std::uint16_t out;
  };
  const Case cases[] = {
      {0x3F800000u, 0x3F80},  // 1.0
      {0x3F808000u, 0x3F80},  // 1 + 2^-8: halfway, 0x3F80 is even
      {0x3F818000u, 0x3F82},  // 1 + 3*2^-8: halfway, 0x3F82 is even
      {0x3F807FFFu, 0x3F80},  // just below halfway
      {0x3F808001u, 0x3F81},  // just above halfway
      {0x3F81FFFFu, 0x3F82},
      {0xBF808000u, 0xBF80},  // negative halfway, to even
      {0xBF818000u, 0xBF82},
      {0xBF808001u, 0xBF81},
      {0x3FFF8000u, 0x4000},  // 1.99609375 + half ulp -> carries into the exponent: 2.0
      {0x7F7F7FFFu, 0x7F7F},  // below halfway to inf: stays the largest finite bf16
      {0x7F7F8000u, 0x7F80},  // halfway to 2^128, 0x7F7F is odd: rounds to inf
      {0x7F7FFFFFu, 0x7F80},  // FLT_MAX -> inf
      {0x7F800000u, 0x7F80},  // inf
      {0xFF800000u, 0xFF80},  // -inf
      {0x00000000u, 0x0000},
      {0x80000000u, 0x8000},  // -0 keeps its sign
      {0x00008000u, 0x0000},  // subnormal halfway, to even
      {0x00018000u, 0x0002},
      {0x00008001u, 0x0001},
      {0x007FFFFFu, 0x0080},  // largest float subnormal rounds up to the smallest normal
      {0x40490FDBu, 0x4049},  // pi -> 3.140625
      {0x3DCCCCCDu, 0x3DCD},  // 0.1
  };
  for (const auto& c : cases)
    EXPECT_EQ(msda::float_to_bf16(float_of(c.in)).bits, c.out) << std::hex << "input 0x" << c.in;
}

TEST(NumericBf16, NaNStaysNaN) {
  for (std::uint32_t nan : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7F80FFFFu,
                            0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FBF8000u, 0x7FFF8000u}) {
    const std::uint16_t got = msda::float_to_bf16(float_of(nan)).bits;
    EXPECT_TRUE(bf16_is_nan(got)) << std::hex << nan << " -> " << got;
    EXPECT_EQ(got & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
  }
}

TEST(NumericBf16, MatchesIndependentRoundingNearEveryBoundary) {
  int failures = 0;
  auto check = [&](std::uint32_t bits) {
    const float f = float_of(bits);
    if (std::isnan(f)) return;
    const std::uint16_t got = msda::float_to_bf16(f).bits;
    const std::uint16_t want = expected_bf16(f);
    if (got != want && ++failures <= 10)
      ADD_FAILURE() << std::hex << "float_to_bf16(0x" << bits << ") = 0x" << got << ", want 0x"
                    << want;
  };
  for (std::uint32_t upper = 0; upper < 65536; ++upper)
    for (std::uint32_t low : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu})
      check((upper << 16) | low);
  std::mt19937_64 rng(777);
  for (int i = 0; i < 2'000'000; ++i) check(static_cast<std::uint32_t>(rng()));
  EXPECT_EQ(failures, 0);
}

}  // namespace
