// Where one sample lands on its level (SPEC "Forward"), shared by every CPU kernel and target.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace msda::cpu {

template <class C>
struct SamplePoint {
  std::int64_t h0, w0;  // top-left corner (may be -1)
  C lh, lw, hh, hw;     // fractional offsets and their complements
  bool top, bottom, left, right;  // which corner rows and columns lie on the map
};

// False when SPEC's range rule zeroes the sample (NaN and inf included). The coordinate is
// computed in double even for f32 inputs: x*W - 0.5 is then exact for f32, bf16 and f16
// locations, so which corners a sample touches (and its one-sided location gradient at integer
// coordinates) never depends on rounding, and agrees with the reference exactly.
template <class C>
MSDA_INLINE bool locate(double x, double y, double H, double W, SamplePoint<C>& s) {
  const double u = x * W - 0.5;
  const double v = y * H - 0.5;
  if (!(v > -1 && u > -1 && v < H && u < W)) return false;
  // floor() without a libm call on baseline x86-64: truncate, then step down for negatives.
  std::int64_t h0 = static_cast<std::int64_t>(v), w0 = static_cast<std::int64_t>(u);
  h0 -= static_cast<double>(h0) > v;
  w0 -= static_cast<double>(w0) > u;
  s.h0 = h0;
  s.w0 = w0;
  s.lh = static_cast<C>(v - static_cast<double>(h0));
  s.lw = static_cast<C>(u - static_cast<double>(w0));
  s.hh = 1 - s.lh;
  s.hw = 1 - s.lw;
  s.top = h0 >= 0;
  s.bottom = static_cast<double>(h0 + 1) < H;
  s.left = w0 >= 0;
  s.right = static_cast<double>(w0 + 1) < W;
  return true;
}

// Locations and weights come in value's dtype or f32: read and written through one switch per
// element (a perfectly predicted branch) instead of multiplying the kernels' instantiations.
MSDA_INLINE double load_scalar(const void* base, std::int64_t i, DType dtype) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(base)[i];
    case DType::f64: return static_cast<const double*>(base)[i];
    case DType::bf16: return bf16_to_float(static_cast<const bf16*>(base)[i]);
    case DType::f16: return f16_to_float(static_cast<const f16*>(base)[i]);
  }
  return 0;
}

template <class C>
MSDA_INLINE void store_scalar(void* base, std::int64_t i, DType dtype, C x) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(base)[i] = static_cast<float>(x); return;
    case DType::f64: static_cast<double*>(base)[i] = static_cast<double>(x); return;
    case DType::bf16: static_cast<bf16*>(base)[i] = float_to_bf16(static_cast<float>(x)); return;
    case DType::f16: static_cast<f16*>(base)[i] = float_to_f16(static_cast<float>(x)); return;
  }
}

}  // namespace msda::cpu
