// SPEC's bilinear sample as the cuda kernels compute it, in functions that compile for the host
// too: the CPU test suite runs the same arithmetic (the bucketing of the deterministic backward
// included) where no GPU is, and compares it with the reference backend.
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
// `inside` is SPEC's range rule (false for NaN too); when false nothing else is meaningful.
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

// The weight of corner (dh, dw) in {0, 1}^2 of the sample: hh*hw, hh*lw, lh*hw or lh*lw.
template <class A>
MSDA_HD A corner_weight(const Corners<A>& c, int dh, int dw) {
  return (dh ? c.lh : c.hh) * (dw ? c.lw : c.hw);
}

// What the deterministic grad_value keeps of an in-range sample between bucketing and gathering:
// its interpolation fractions, weight, and the head (row of grad_output, in units of D) it reads.
// The bucket already says which corner a pixel is, so the gather never recomputes a floor.
template <class A>
struct Place {
  A lh, lw, a;
  std::int64_t head;
};

// A sample index (((n*Q + q)*M + m)*L + l)*P + p split into its head index (n*Q + q)*M + m (the
// row of grad_output it reads, in units of D) and its level.
struct SampleSite {
  std::int64_t head;  // (n*Q + q)*M + m
  std::int64_t level;
};
MSDA_HD SampleSite site_of(std::int64_t sample, std::int64_t L, std::int64_t P) {
  const std::int64_t lp = sample / P;
  return {lp / L, lp % L};
}

// The first sorted position of bucket k: a lower bound in the sorted keys. One thread per bucket
// and no atomics; buckets + 1 of them give every segment [start(k), start(k+1)).
template <class Key>
MSDA_HD std::int64_t segment_start(const Key* sorted_keys, std::int64_t samples, std::int64_t bucket) {
  std::int64_t lo = 0, hi = samples;
  while (lo < hi) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<std::int64_t>(sorted_keys[mid]) < bucket)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// The level holding row `row` of value: the last level whose start is <= row.
template <class Level>
MSDA_HD std::int64_t level_of_row(const Level* levels, std::int64_t L, std::int64_t row) {
  std::int64_t lo = 0, hi = L - 1;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi + 1) / 2;
    if (levels[mid].start <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace msda::cuda
