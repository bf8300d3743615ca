// SPEC's bilinear sample as the cuda kernels compute it, in functions that compile for the host
// too: the CPU test suite runs the same arithmetic where no GPU is, and compares it with the
// reference backend.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#else
#define MSDA_HD inline
#endif

namespace msda::cuda {

template <class A>
MSDA_HD A floor_of(A x) {
  if constexpr (sizeof(A) == 4)
    return floorf(x);
  else
    return floor(x);
}

// One sample's place on its level: the top-left corner (h0, w0) and the interpolation weights.
// `inside` is SPEC's range rule (false for NaN too); when false nothing else is meaningful. A
// discrete sample (pixel_at) is the corner (h0, w0) alone, with weight hh*hw = 1; its other three
// corners are not part of it, and the kernels must not touch them (their 0 weight times an
// infinite value, or an infinite grad_output, would be NaN).
template <class A>
struct Corners {
  bool inside = false;
  std::int64_t h0 = 0, w0 = 0;
  A lh = 0, lw = 0, hh = 0, hw = 0;
};

// u = x*W - 0.5 and v = y*H - 0.5: the sample's column and row in pixel coordinates.
template <class A>
MSDA_HD Corners<A> corners_at(A u, A v, std::int64_t height, std::int64_t width) {
  Corners<A> c;
  c.inside = v > A(-1) && u > A(-1) && v < A(height) && u < A(width);
  if (!c.inside) return c;
  const A hf = floor_of(v), wf = floor_of(u);
  c.h0 = static_cast<std::int64_t>(hf);
  c.w0 = static_cast<std::int64_t>(wf);
  c.lh = v - hf;
  c.lw = u - wf;
  c.hh = A(1) - c.lh;
  c.hw = A(1) - c.lw;
  return c;
}

// SPEC's discrete index along one axis of `size` pixels: clamp(trunc(t), 0, size - 1) for
// t = x*size + 0.5. Clamped while still a double, so an infinite t reaches the edge without
// meeting an integer conversion (which is undefined for it); trunc rounds toward zero, so t in
// (-1, 0) is pixel 0 like any other negative t. The caller rules out NaN.
MSDA_HD std::int64_t discrete_index(double t, std::int64_t size) {
  const double last = static_cast<double>(size - 1);
  const double i = trunc(t);
  return static_cast<std::int64_t>(i < 0 ? 0.0 : i > last ? last : i);
}

// SPEC's discrete sample: the one pixel (row, column) = (discrete_index(y*H + 0.5, H),
// discrete_index(x*W + 0.5, W)), taken as the corner (h0, w0) with weight 1 (lh = lw = 0). The
// caller computes t_column = x*W + 0.5 and t_row = y*H + 0.5 in double, rounded operation by
// operation as the reference does (x*W is exact for f32, bf16 and f16 coordinates). A NaN
// coordinate (and only that: an infinite one clamps to the edge) reads nothing.
template <class A>
MSDA_HD Corners<A> pixel_at(double t_column, double t_row, std::int64_t height, std::int64_t width) {
  Corners<A> c;
  c.inside = t_column == t_column && t_row == t_row;  // neither is NaN
  if (!c.inside) return c;
  c.h0 = discrete_index(t_row, height);
  c.w0 = discrete_index(t_column, width);
  c.hh = c.hw = A(1);
  return c;
}

// The weight of corner (dh, dw) in {0, 1}^2 of the sample: hh*hw, hh*lw, lh*hw or lh*lw.
template <class A>
MSDA_HD A corner_weight(const Corners<A>& c, int dh, int dw) {
  return (dh ? c.lh : c.hh) * (dw ? c.lw : c.hw);
}

// The last of the levels levels[0, L) whose `field` (a start, increasing with the level) is <= x.
template <class Level>
MSDA_HD std::int64_t last_level_at_or_below(const Level* levels, std::int64_t L, std::int64_t Level::*field,
                                            std::int64_t x) {
  std::int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi + 1) / 2;
    if (levels[mid].*field <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// A sample index head*K + k, with head = (n*Q + q)*M + m and k in [0, K) (level l's P_l samples
// at k in [point_start_l, point_start_l + P_l)), split into its head (the row of grad_output it
// reads, in units of D) and its level.
struct SampleSite {
  std::int64_t head;  // (n*Q + q)*M + m
  std::int64_t level;
};
template <class Level>
MSDA_HD SampleSite site_of(std::int64_t sample, const Level* levels, std::int64_t L, std::int64_t K) {
  return {sample / K, last_level_at_or_below(levels, L, &Level::point_start, sample % K)};
}

}  // namespace msda::cuda
