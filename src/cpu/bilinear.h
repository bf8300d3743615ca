// Where one sample lands on its level, and how much each of its four corners weighs.
#pragma once

#include <cmath>
#include <cstdint>

namespace msda::cpu {

// Corner order: (h0,w0), (h0,w0+1), (h0+1,w0), (h0+1,w0+1) = v00, v01, v10, v11 in SPEC.
template <class C>
struct Bilinear {
  C lh, lw, hh, hw;           // fractional offsets and their complements
  C weight[4];                // hh*hw, hh*lw, lh*hw, lh*lw
  std::int64_t row[4];        // value row of each corner, -1 where the corner is off the map
};

// False when SPEC's range rule zeroes the sample (NaN and inf included). The coordinate is
// computed in double even for f32 inputs: x*W - 0.5 is then exact for f32/bf16/f16 locations,
// so which corners a sample touches never depends on rounding.
template <class C>
inline bool locate(double x, double y, std::int64_t H, std::int64_t W, std::int64_t level_start,
                   Bilinear<C>& b) {
  const double u = x * static_cast<double>(W) - 0.5;
  const double v = y * static_cast<double>(H) - 0.5;
  if (!(v > -1 && u > -1 && v < static_cast<double>(H) && u < static_cast<double>(W))) return false;
  const double fh = std::floor(v), fw = std::floor(u);
  const auto h0 = static_cast<std::int64_t>(fh), w0 = static_cast<std::int64_t>(fw);
  b.lh = static_cast<C>(v - fh);
  b.lw = static_cast<C>(u - fw);
  b.hh = 1 - b.lh;
  b.hw = 1 - b.lw;
  b.weight[0] = b.hh * b.hw;
  b.weight[1] = b.hh * b.lw;
  b.weight[2] = b.lh * b.hw;
  b.weight[3] = b.lh * b.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
  const std::int64_t base = level_start + h0 * W + w0;
  b.row[0] = top && left ? base : -1;
  b.row[1] = top && right ? base + 1 : -1;
  b.row[2] = bottom && left ? base + W : -1;
  b.row[3] = bottom && right ? base + W + 1 : -1;
  return true;
}

}  // namespace msda::cpu
