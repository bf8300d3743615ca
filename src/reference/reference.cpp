#include "reference/reference.h"

#include <cmath>
#include <limits>
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

// SPEC's discrete sampling: the one pixel (h0, w0) = (clamp(trunc(y*H + 0.5)), clamp(trunc(x*W +
// 0.5))) with weight 1 (lh = lw = 0); a NaN coordinate reads nothing. Clamped as doubles, so an
// infinite coordinate never meets an integer conversion.
Bilinear locate_discrete(double x, double y, std::int64_t H, std::int64_t W) {
  Bilinear b;
  if (std::isnan(x) || std::isnan(y)) return b;
  auto pixel = [](double c, std::int64_t size) {
    const double t = std::trunc(c * static_cast<double>(size) + 0.5);
    return static_cast<std::int64_t>(t < 0 ? 0.0 : t > static_cast<double>(size - 1) ? static_cast<double>(size - 1) : t);
  };
  b.in_range = true;
  b.h0 = pixel(y, H);
  b.w0 = pixel(x, W);
  b.hh = b.hw = 1;
  return b;
}

Bilinear locate(double x, double y, std::int64_t H, std::int64_t W, bool discrete) {
  if (discrete) return locate_discrete(x, y, H, W);
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
            for (std::int64_t pt = 0; pt < p.points[l]; ++pt) {
              const std::int64_t i = p.sample_index(n, q, m, l, pt);
              const double a = Storage<W>::load(weight[i]);
              const Bilinear b = locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]),
                                        p.height[l], p.width[l], p.discrete);
              if (!b.in_range) continue;
              for (std::int64_t d = 0; d < p.D; ++d) {
                // Discrete: the one pixel alone (its neighbours, weight 0, may be infinite).
                const double sample = p.discrete ? pixel(n, l, m, b.h0, b.w0, d) :
                                      b.hh * b.hw * pixel(n, l, m, b.h0, b.w0, d) +
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
            for (std::int64_t pt = 0; pt < p.points[l]; ++pt) {
              const std::int64_t i = p.sample_index(n, q, m, l, pt);
              const double a = Storage<W>::load(weight[i]);
              const Bilinear b = locate(Storage<Loc>::load(loc[2 * i]), Storage<Loc>::load(loc[2 * i + 1]),
                                        p.height[l], p.width[l], p.discrete);
              double d_weight = 0, d_u = 0, d_v = 0;
              if (b.in_range && p.discrete) {  // one pixel, weight 1; the location has no gradient
                for (std::int64_t d = 0; d < p.D; ++d) {
                  const double g = Storage<V>::load(grad_out[p.output_offset(n, q, m) + d]);
                  d_weight += g * pixel(n, l, m, b.h0, b.w0, d);
                  if (grad_value) add_to_corner(n, l, m, b.h0, b.w0, d, a * g);
                }
              } else if (b.in_range) {
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
                const bool moves = b.in_range && !p.discrete;
                grad_loc[2 * i] = Storage<Loc>::store(moves ? a * static_cast<double>(p.width[l]) * d_u : 0.0);
                grad_loc[2 * i + 1] = Storage<Loc>::store(moves ? a * static_cast<double>(p.height[l]) * d_v : 0.0);
              }
            }
    for (std::size_t e = 0; e < gv.size(); ++e) grad_value[e] = Storage<V>::store(gv[e]);
  }
};

// ---- the fused op: locations and softmax materialised in double, then the kernels above ----

double load_any(DType dtype, const void* base, std::int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(base)[i];
    case DType::f64: return static_cast<const double*>(base)[i];
    case DType::bf16: return bf16_to_float(static_cast<const bf16*>(base)[i]);
    case DType::f16: return f16_to_float(static_cast<const f16*>(base)[i]);
  }
  return 0;
}

void store_any(DType dtype, void* base, std::int64_t i, double x) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(base)[i] = static_cast<float>(x); return;
    case DType::f64: static_cast<double*>(base)[i] = x; return;
    case DType::bf16: static_cast<bf16*>(base)[i] = float_to_bf16(static_cast<float>(x)); return;
    case DType::f16: static_cast<f16*>(base)[i] = float_to_f16(static_cast<float>(x)); return;
  }
}

// Softmax of the K logits of row (n, q, m) into a[0, K), in double, max-subtracted. A NaN
// logit, or a row of -inf, gives a row of NaN (as torch.softmax does).
void softmax_row(const Params& p, std::int64_t row, double* a) {
  const std::int64_t LP = p.K;
  double max = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < LP; ++j) {
    a[j] = load_any(p.problem->weight_dtype, p.weights, row * LP + j);
    if (a[j] > max) max = a[j];
  }
  double total = 0;
  for (std::int64_t j = 0; j < LP; ++j) total += a[j] = std::exp(a[j] - max);
  for (std::int64_t j = 0; j < LP; ++j) a[j] /= total;
}

// SPEC "The fused op": every sample's location and weight in double.
struct Materialised {
  std::vector<double> locations, weights;
};

Materialised materialise(const Params& p) {
  const std::int64_t samples = p.N * p.Q * p.M * p.K, C = p.reference_coords;
  Materialised out{std::vector<double>(static_cast<std::size_t>(2 * samples)),
                   std::vector<double>(static_cast<std::size_t>(samples))};
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t q = 0; q < p.Q; ++q)
      for (std::int64_t m = 0; m < p.M; ++m) {
        softmax_row(p, (n * p.Q + q) * p.M + m, out.weights.data() + p.sample_index(n, q, m, 0, 0));
        for (std::int64_t l = 0; l < p.L; ++l) {
          double ref[4];
          for (std::int64_t c = 0; c < C; ++c)
            ref[c] = load_any(p.reference_dtype, p.reference_points, p.reference_offset(n, q) + l * C + c);
          const double P = static_cast<double>(p.points[l]);
          for (std::int64_t pt = 0; pt < p.points[l]; ++pt) {
            const std::int64_t i = p.sample_index(n, q, m, l, pt);
            const double ox = load_any(p.problem->location_dtype, p.locations, 2 * i);
            const double oy = load_any(p.problem->location_dtype, p.locations, 2 * i + 1);
            double& x = out.locations[2 * i];
            double& y = out.locations[2 * i + 1];
            if (C == 2) {
              x = ref[0] + ox / p.width_f[l];
              y = ref[1] + oy / p.height_f[l];
            } else {
              x = ref[0] + ox / P * ref[2] * p.offset_scale;
              y = ref[1] + oy / P * ref[3] * p.offset_scale;
            }
          }
        }
      }
  return out;
}

// The plain op's Params over the materialised f64 locations and weights.
struct Plain {
  Problem problem;
  Params params;
  Plain(const Params& fused, const Materialised& m) : problem(*fused.problem), params(fused) {
    problem.location_dtype = problem.weight_dtype = DType::f64;
    params.problem = &problem;
    params.fused = false;
    params.locations = m.locations.data();
    params.weights = m.weights.data();
  }
};

template <class F>
void with_value_type(const Params& p, F&& f) {
  switch (p.problem->value_dtype) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    case DType::bf16: return f.template operator()<bf16>();
    case DType::f16: return f.template operator()<f16>();
  }
}

}  // namespace

void forward_fused(const Params& params) {
  const Materialised m = materialise(params);
  const Plain plain(params, m);
  with_value_type(params, [&]<class V>() { Kernels<V, double, double>{plain.params}.forward(); });
}

// The chain rule through the location arithmetic and the softmax, in double, over the plain
// backward's gradients of the materialised locations (g_loc) and weights (g_a). A sample whose
// location gradient is zero (one zeroed by the range rule) adds nothing: its offset or box size
// may be infinite.
void backward_fused(const Params& params) {
  const Params& p = params;
  const Materialised mat = materialise(p);
  Plain plain(p, mat);
  const std::int64_t samples = p.N * p.Q * p.M * p.K, LP = p.K, C = p.reference_coords;
  std::vector<double> g_loc(static_cast<std::size_t>(2 * samples)), g_a(static_cast<std::size_t>(samples));
  plain.params.grad_locations = g_loc.data();
  plain.params.grad_weights = g_a.data();
  with_value_type(p, [&]<class V>() { Kernels<V, double, double>{plain.params}.backward(); });

  auto times = [](double g, double x) { return g == 0 ? 0.0 : g * x; };
  for (std::int64_t n = 0; n < p.N; ++n)
    for (std::int64_t q = 0; q < p.Q; ++q) {
      std::vector<double> grad_ref(static_cast<std::size_t>(p.L * C), 0.0);  // summed over m, then p
      for (std::int64_t m = 0; m < p.M; ++m) {
        const std::int64_t first = p.sample_index(n, q, m, 0, 0);
        if (p.grad_logits) {
          double dot = 0;
          for (std::int64_t j = 0; j < LP; ++j) dot += mat.weights[first + j] * g_a[first + j];
          for (std::int64_t j = 0; j < LP; ++j)
            store_any(p.problem->weight_dtype, p.grad_logits, first + j,
                      mat.weights[first + j] * (g_a[first + j] - dot));
        }
        for (std::int64_t l = 0; l < p.L; ++l) {
          double box[4] = {0, 0, 0, 0};
          for (std::int64_t c = 0; c < C; ++c)
            box[c] = load_any(p.reference_dtype, p.reference_points, p.reference_offset(n, q) + l * C + c);
          const double P = static_cast<double>(p.points[l]), scale = p.offset_scale;
          for (std::int64_t pt = 0; pt < p.points[l]; ++pt) {
            const std::int64_t i = p.sample_index(n, q, m, l, pt);
            const double gx = g_loc[2 * i], gy = g_loc[2 * i + 1];
            double* gr = grad_ref.data() + l * C;
            gr[0] += gx;
            gr[1] += gy;
            if (C == 2) {
              if (p.grad_offsets) {
                store_any(p.problem->location_dtype, p.grad_offsets, 2 * i, gx / p.width_f[l]);
                store_any(p.problem->location_dtype, p.grad_offsets, 2 * i + 1, gy / p.height_f[l]);
              }
            } else {
              const double ox = load_any(p.problem->location_dtype, p.locations, 2 * i);
              const double oy = load_any(p.problem->location_dtype, p.locations, 2 * i + 1);
              gr[2] += times(gx, ox / P * scale);
              gr[3] += times(gy, oy / P * scale);
              if (p.grad_offsets) {
                store_any(p.problem->location_dtype, p.grad_offsets, 2 * i, times(gx, box[2] * scale / P));
                store_any(p.problem->location_dtype, p.grad_offsets, 2 * i + 1, times(gy, box[3] * scale / P));
              }
            }
          }
        }
      }
      if (p.grad_reference_points)
        for (std::int64_t k = 0; k < p.L * C; ++k)
          store_any(p.reference_dtype, p.grad_reference_points, p.reference_offset(n, q) + k, grad_ref[k]);
    }
}

void forward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { Kernels<V, Loc, W>{params}.forward(); });
}

void backward(const Params& params) {
  visit_dtypes(*params.problem, [&]<class V, class Loc, class W>() { Kernels<V, Loc, W>{params}.backward(); });
}

}  // namespace msda::reference
