// Storage types and their arithmetic types. bf16 and f16 are storage only (SPEC "Precision"):
// every kernel widens them to f32 on load and rounds once on store, so this is the one place
// that knows their bits. The conversions are portable (no F16C or AVX512-BF16 needed), round to
// nearest even, and keep NaN a NaN.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "msda/msda.h"

// Always inlined: the CPU backend compiles these into kernels built for several instruction sets,
// and an out-of-line copy built for AVX-512 must never be what a baseline caller links to.
#define MSDA_INLINE [[gnu::always_inline]] inline
// The same for a lambda (written after its parameter list).
#define MSDA_INLINE_LAMBDA __attribute__((always_inline))

namespace msda {

struct bf16 {
  std::uint16_t bits;
};
struct f16 {
  std::uint16_t bits;
};

MSDA_INLINE float bf16_to_float(bf16 h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h.bits) << 16);
}

MSDA_INLINE bf16 float_to_bf16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return bf16{static_cast<std::uint16_t>((x >> 16) | 0x40u)};
  const std::uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>(rounded >> 16)};
}

MSDA_INLINE float f16_to_float(f16 h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round-to-nearest-even of `value >> shift` (1 <= shift <= 24). In float_to_f16 a carry out of
// the mantissa correctly bumps the exponent, and the largest finite value rounds up to inf.
MSDA_INLINE std::uint32_t round_shift(std::uint32_t value, int shift) noexcept {
  const std::uint32_t kept = value >> shift;
  const std::uint32_t rest = value & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  return kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
}

MSDA_INLINE f16 float_to_f16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) {  // inf stays inf; NaN stays a quiet NaN
    const std::uint32_t payload = magnitude > 0x7F800000u ? 0x200u | ((magnitude >> 13) & 0x3FFu) : 0u;
    return f16{static_cast<std::uint16_t>(sign | 0x7C00u | payload)};
  }
  const int exponent = static_cast<int>(magnitude >> 23);  // biased by 127
  const std::uint32_t mantissa = magnitude & 0x7FFFFFu;
  if (exponent >= 113) {  // normal in f16 (or overflowing to inf)
    if (exponent >= 143) return f16{static_cast<std::uint16_t>(sign | 0x7C00u)};
    const std::uint32_t bits = (static_cast<std::uint32_t>(exponent - 112) << 23) | mantissa;
    return f16{static_cast<std::uint16_t>(sign | round_shift(bits, 13))};
  }
  // f16 subnormal: value = (mantissa | 2^23) * 2^(exponent - 150), in units of 2^-24.
  const int shift = 126 - exponent;
  if (shift > 24) return f16{sign};
  return f16{static_cast<std::uint16_t>(sign | round_shift(mantissa | 0x800000u, shift))};
}

// Storage<T>: how a kernel reads and writes elements of type T. `Compute` is the type the
// arithmetic happens in: f32 for f32, bf16 and f16; f64 for f64.
template <class T>
struct Storage;

template <>
struct Storage<float> {
  using Compute = float;
  static constexpr DType dtype = DType::f32;
  MSDA_INLINE static float load(float x) noexcept { return x; }
  MSDA_INLINE static float store(float x) noexcept { return x; }
};

template <>
struct Storage<double> {
  using Compute = double;
  static constexpr DType dtype = DType::f64;
  MSDA_INLINE static double load(double x) noexcept { return x; }
  MSDA_INLINE static double store(double x) noexcept { return x; }
};

template <>
struct Storage<bf16> {
  using Compute = float;
  static constexpr DType dtype = DType::bf16;
  MSDA_INLINE static float load(bf16 x) noexcept { return bf16_to_float(x); }
  MSDA_INLINE static bf16 store(float x) noexcept { return float_to_bf16(x); }
};

template <>
struct Storage<f16> {
  using Compute = float;
  static constexpr DType dtype = DType::f16;
  MSDA_INLINE static float load(f16 x) noexcept { return f16_to_float(x); }
  MSDA_INLINE static f16 store(float x) noexcept { return float_to_f16(x); }
};

}  // namespace msda
