#include "reference/reference.h"

#include <cmath>
#include <vector>

#include "dtype_switch.h"

namespace msda::reference {
namespace {

// SPEC's bilinear_l(u, v): u = x*W - 0.5 (columns), v = y*H - 0.5 (rows).
struct Bilinear {
  bool in_range = false;
  std::int64_t h0 = 0, w0 = 0;
  double lh = 0, lw = 0, hh = 0, hw = 0;
};

Bilinear locate(double x, double y, std::int64_t H, std::int64_t W) {
  Bilinear b;
  const double u = x * static_cast<double>(W) - 0.5;
  const double v = y * static_cast<double>(H) - 0.5;
  b.in_range = v > -1 && u > -1 && v < static_cast<double>(H) && u < static_cast<double>(W);
  if (!b.in_range) return b;
  b.h0 = static_cast<std::int64_t>(std::floor(v));
  b.w0 = static_cast<std::int64_t>(std::floor(u));
  b.lh = v - static_cast<double>(b.h0);
  b.lw = u - static_cast<double>(b.w0);
  b.hh = 1 - b.lh;
  b.hw = 1 - b.lw;
  return b;
}

template <class V, class Loc, class W>
struct Kernels {
  const Params& p;
  const V* value = static_cast<const V*>(p.value);
  const Loc* loc = static_cast<const Loc*>(p.locations);
  const W* weight = static_cast<const W*>(p.weights);

  // value[n, pixel (h, w) of level l, m, d], zero outside the map.
  double pixel(std::int64_t n, std::int64_t l, std::int64_t m, std::int64_t h, std::int64_t w,
               std::int64_t d) const {
    if (h < 0 || w < 0 || h >= p.height[l] || w >= p.width[l]) return 0;
    const std::int64_t row = p.level_start[l] + h * p.width[l] + w;
    return Storage<V>::load(value[p.value_offset(n, row, m) + d]);
  }

  void forward() const {
    V* out = static_cast<V*>(p.output);
    std::vector<double> acc(static_cast<std::size_t>(p.D));
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t q = 0; q < p.Q; ++q)
        for (std::int64_t m = 0; m < p.M; ++m) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (std::int64_t l = 0; l < p.L; ++l)
            for (std::int64_t pt = 0; pt < p.P; ++pt) {
              const std::int64_t i = p.sample_index(n, q, m, l, pt);
              const double a = Storage<W>::load(weight[i]);
              const Bilinear b = locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]),
                                        p.height[l], p.width[l]);
              if (!b.in_range) continue;
              for (std::int64_t d = 0; d < p.D; ++d) {
                const double sample = b.hh * b.hw * pixel(n, l, m, b.h0, b.w0, d) +
                                      b.hh * b.lw * pixel(n, l, m, b.h0, b.w0 + 1, d) +
                                      b.lh * b.hw * pixel(n, l, m, b.h0 + 1, b.w0, d) +
                                      b.lh * b.lw * pixel(n, l, m, b.h0 + 1, b.w0 + 1, d);
                acc[d] += a * sample;
              }
            }
          for (std::int64_t d = 0; d < p.D; ++d) out[p.output_offset(n, q, m) + d] = Storage<V>::store(acc[d]);
        }
  }

  void backward() const {
    const V* grad_out = static_cast<const V*>(p.grad_output);
    V* grad_value = static_cast<V*>(p.grad_value);
    Loc* grad_loc = static_cast<Loc*>(p.grad_locations);
    W* grad_weight = static_cast<W*>(p.grad_weights);
    // grad_value summed in double, rounded once at the end.
    std::vector<double> gv(grad_value ? static_cast<std::size_t>(p.N * p.S * p.M * p.D) : 0, 0.0);
    auto add_to_corner = [&](std::int64_t n, std::int64_t l, std::int64_t m, std::int64_t h, std::int64_t w,
                             std::int64_t d, double x) {
      if (h < 0 || w < 0 || h >= p.height[l] || w >= p.width[l]) return;
      gv[p.value_offset(n, p.level_start[l] + h * p.width[l] + w, m) + d] += x;
    };
    for (std::int64_t n = 0; n < p.N; ++n)
      for (std::int64_t q = 0; q < p.Q; ++q)
        for (std::int64_t m = 0; m < p.M; ++m)
          for (std::int64_t l = 0; l < p.L; ++l)
            for (std::int64_t pt = 0; pt < p.P; ++pt) {
              const std::int64_t i = p.sample_index(n, q, m, l, pt);
              const double a = Storage<W>::load(weight[i]);
              const Bilinear b = locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]),
                                        p.height[l], p.width[l]);
              double d_weight = 0, d_u = 0, d_v = 0;
              if (b.in_range) {
                for (std::int64_t d = 0; d < p.D; ++d) {
                  const double g = Storage<V>::load(grad_out[p.output_offset(n, q, m) + d]);
                  const double v00 = pixel(n, l, m, b.h0, b.w0, d), v01 = pixel(n, l, m, b.h0, b.w0 + 1, d);
                  const double v10 = pixel(n, l, m, b.h0 + 1, b.w0, d), v11 = pixel(n, l, m, b.h0 + 1, b.w0 + 1, d);
                  d_weight += g * (b.hh * b.hw * v00 + b.hh * b.lw * v01 + b.lh * b.hw * v10 + b.lh * b.lw * v11);
                  d_u += g * (b.hh * (v01 - v00) + b.lh * (v11 - v10));
                  d_v += g * (b.hw * (v10 - v00) + b.lw * (v11 - v01));
                  if (grad_value) {
                    add_to_corner(n, l, m, b.h0, b.w0, d, a * b.hh * b.hw * g);
                    add_to_corner(n, l, m, b.h0, b.w0 + 1, d, a * b.hh * b.lw * g);
                    add_to_corner(n, l, m, b.h0 + 1, b.w0, d, a * b.lh * b.hw * g);
                    add_to_corner(n, l, m, b.h0 + 1, b.w0 + 1, d, a * b.lh * b.lw * g);
                  }
                }
              }
              // A sample zeroed by the range rule has exactly zero gradients (even for a NaN weight).
              if (grad_weight) grad_weight[i] = Storage<W>::store(d_weight);
              if (grad_loc) {
                grad_loc[2 * i] = Storage<Loc>::store(b.in_range ? a * static_cast<double>(p.width[l]) * d_u : 0.0);
                grad_loc[2 * i + 1] = Storage<Loc>::store(b.in_range ? a * static_cast<double>(p.height[l]) * d_v : 0.0);
              }
            }
    for (std::size_t e = 0; e < gv.size(); ++e) grad_value[e] = Storage<V>::store(gv[e]);
  }
};

}  // namespace

void forward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { Kernels<V, Loc, W>{params}.forward(); });
}

void backward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { Kernels<V, Loc, W>{params}.backward(); });
}

}  // namespace msda::reference
