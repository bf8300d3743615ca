// The oracle itself: Backend::reference in f64 against
//   - a brute-force transcription of SPEC's forward and backward formulas written here, and
//   - central (and, at integer pixel coordinates, one-sided) finite differences of its own forward.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "test_support.h"

namespace msda_test {
namespace {

using msda::Backend;
using msda::DType;

constexpr msda::Options kReference{0, Backend::reference};

// ---- brute force, straight from SPEC ----

struct Brute {
  const msda::Problem& p;
  const std::vector<double>& value;  // [N, S, M, D]
  const std::vector<double>& loc;    // [N, Q, M, L, P, 2]
  const std::vector<double>& attn;   // [N, Q, M, L, P]

  double corner(std::int64_t n, std::int64_t l, std::int64_t h, std::int64_t w, std::int64_t m,
                std::int64_t d) const {
    const auto& lv = p.levels[static_cast<std::size_t>(l)];
    if (h < 0 || h >= lv.height || w < 0 || w >= lv.width) return 0.0;
    const std::int64_t row = p.level_start_index[static_cast<std::size_t>(l)] + h * lv.width + w;
    return value[static_cast<std::size_t>(((n * p.value_len + row) * p.heads + m) * p.channels + d)];
  }
  static bool in_range(double u, double v, const msda::Level& lv) {
    return v > -1 && u > -1 && v < static_cast<double>(lv.height) && u < static_cast<double>(lv.width);
  }
  std::int64_t sample_index(std::int64_t n, std::int64_t q, std::int64_t m, std::int64_t l,
                            std::int64_t pt) const {
    return (((n * p.queries + q) * p.heads + m) * p.num_levels() + l) * p.points + pt;
  }

  std::vector<double> forward() const {
    std::vector<double> out(static_cast<std::size_t>(output_size(p)), 0.0);
    for (std::int64_t n = 0; n < p.batch; ++n)
      for (std::int64_t q = 0; q < p.queries; ++q)
        for (std::int64_t m = 0; m < p.heads; ++m)
          for (std::int64_t d = 0; d < p.channels; ++d) {
            double sum = 0;
            for (std::int64_t l = 0; l < p.num_levels(); ++l) {
              const auto& lv = p.levels[static_cast<std::size_t>(l)];
              for (std::int64_t pt = 0; pt < p.points; ++pt) {
                const std::int64_t s = sample_index(n, q, m, l, pt);
                const double u = loc[static_cast<std::size_t>(2 * s)] * static_cast<double>(lv.width) - 0.5;
                const double v = loc[static_cast<std::size_t>(2 * s + 1)] * static_cast<double>(lv.height) - 0.5;
                if (!in_range(u, v, lv)) continue;
                const double h0 = std::floor(v), w0 = std::floor(u);
                const double lh = v - h0, lw = u - w0, hh = 1 - lh, hw = 1 - lw;
                const auto hi = static_cast<std::int64_t>(h0), wi = static_cast<std::int64_t>(w0);
                const double sample = hh * hw * corner(n, l, hi, wi, m, d) +
                                      hh * lw * corner(n, l, hi, wi + 1, m, d) +
                                      lh * hw * corner(n, l, hi + 1, wi, m, d) +
                                      lh * lw * corner(n, l, hi + 1, wi + 1, m, d);
                sum += attn[static_cast<std::size_t>(s)] * sample;
              }
            }
            out[static_cast<std::size_t>(((n * p.queries + q) * p.heads + m) * p.channels + d)] = sum;
          }
    return out;
  }

  void backward(const std::vector<double>& g, std::vector<double>& gv, std::vector<double>& gl,
                std::vector<double>& ga) const {
    gv.assign(static_cast<std::size_t>(value_size(p)), 0.0);
    gl.assign(static_cast<std::size_t>(location_size(p)), 0.0);
    ga.assign(static_cast<std::size_t>(weight_size(p)), 0.0);
    for (std::int64_t n = 0; n < p.batch; ++n)
      for (std::int64_t q = 0; q < p.queries; ++q)
        for (std::int64_t m = 0; m < p.heads; ++m)
          for (std::int64_t l = 0; l < p.num_levels(); ++l) {
            const auto& lv = p.levels[static_cast<std::size_t>(l)];
            for (std::int64_t pt = 0; pt < p.points; ++pt) {
              const std::int64_t s = sample_index(n, q, m, l, pt);
              const double u = loc[static_cast<std::size_t>(2 * s)] * static_cast<double>(lv.width) - 0.5;
              const double v = loc[static_cast<std::size_t>(2 * s + 1)] * static_cast<double>(lv.height) - 0.5;
              if (!in_range(u, v, lv)) continue;
              const double a = attn[static_cast<std::size_t>(s)];
              const double h0 = std::floor(v), w0 = std::floor(u);
              const double lh = v - h0, lw = u - w0, hh = 1 - lh, hw = 1 - lw;
              const auto hi = static_cast<std::int64_t>(h0), wi = static_cast<std::int64_t>(w0);
              const std::int64_t hs[4] = {hi, hi, hi + 1, hi + 1};
              const std::int64_t ws[4] = {wi, wi + 1, wi, wi + 1};
              const double cw[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
              double dot_sample = 0, dot_du = 0, dot_dv = 0;
              for (std::int64_t d = 0; d < p.channels; ++d) {
                const double gd =
                    g[static_cast<std::size_t>(((n * p.queries + q) * p.heads + m) * p.channels + d)];
                const double v00 = corner(n, l, hi, wi, m, d), v01 = corner(n, l, hi, wi + 1, m, d);
                const double v10 = corner(n, l, hi + 1, wi, m, d), v11 = corner(n, l, hi + 1, wi + 1, m, d);
                dot_sample += gd * (cw[0] * v00 + cw[1] * v01 + cw[2] * v10 + cw[3] * v11);
                dot_du += gd * (hh * (v01 - v00) + lh * (v11 - v10));
                dot_dv += gd * (hw * (v10 - v00) + lw * (v11 - v01));
                for (int k = 0; k < 4; ++k) {
                  if (hs[k] < 0 || hs[k] >= lv.height || ws[k] < 0 || ws[k] >= lv.width) continue;
                  const std::int64_t row =
                      p.level_start_index[static_cast<std::size_t>(l)] + hs[k] * lv.width + ws[k];
                  gv[static_cast<std::size_t>(((n * p.value_len + row) * p.heads + m) * p.channels + d)] +=
                      a * cw[k] * gd;
                }
              }
              ga[static_cast<std::size_t>(s)] = dot_sample;
              gl[static_cast<std::size_t>(2 * s)] = a * static_cast<double>(lv.width) * dot_du;
              gl[static_cast<std::size_t>(2 * s + 1)] = a * static_cast<double>(lv.height) * dot_dv;
            }
          }
  }
};

Shape random_small_shape(std::mt19937_64& rng, std::int64_t max_side) {
  auto uniform = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  Shape s;
  s.batch = uniform(1, 2);
  s.heads = uniform(1, 2);
  s.channels = uniform(1, 3);
  s.queries = uniform(1, 4);
  s.points = uniform(1, 3);
  const std::int64_t levels = uniform(1, 3);
  for (std::int64_t l = 0; l < levels; ++l)
    s.levels.push_back({uniform(1, max_side), uniform(1, max_side)});
  return s;
}

// L(inputs) = sum(g * forward(inputs)), by the reference backend in f64.
double loss(const msda::Problem& p, const Buffer& value, const Buffer& loc, const Buffer& attn,
            const std::vector<double>& g) {
  Buffer out(DType::f64, output_size(p));
  msda::forward(p, {value.data(), loc.data(), attn.data()}, out.data(), kReference);
  double sum = 0;
  for (std::int64_t i = 0; i < out.size(); ++i) sum += g[static_cast<std::size_t>(i)] * out.get(i);
  return sum;
}

enum class Fd { central, forward };

// Finite differences of the loss in every element of `target` (one of value/loc/attn).
std::vector<double> finite_differences(const msda::Problem& p, Buffer& value, Buffer& loc,
                                       Buffer& attn, const std::vector<double>& g, Buffer& target,
                                       double step, Fd kind) {
  std::vector<double> fd(static_cast<std::size_t>(target.size()));
  const double base = kind == Fd::forward ? loss(p, value, loc, attn, g) : 0.0;
  for (std::int64_t i = 0; i < target.size(); ++i) {
    const double x = target.get(i);
    target.set(i, x + step);
    const double plus = loss(p, value, loc, attn, g);
    if (kind == Fd::central) {
      target.set(i, x - step);
      const double minus = loss(p, value, loc, attn, g);
      fd[static_cast<std::size_t>(i)] = (plus - minus) / (2 * step);
    } else {
      fd[static_cast<std::size_t>(i)] = (plus - base) / step;
    }
    target.set(i, x);
  }
  return fd;
}

// A pixel coordinate in [lo, hi) at least `margin` from every integer.
double coordinate_away_from_integers(std::mt19937_64& rng, double lo, double hi, double margin) {
  std::uniform_real_distribution<double> dist(lo, hi);
  for (;;) {
    const double u = dist(rng);
    if (std::fabs(u - std::round(u)) >= margin) return u;
  }
}

enum class Region { anywhere, partial_corners };

// A f64 case whose locations keep 1e-3 pixel away from integer coordinates (so the loss is
// smooth around them). anywhere: u in (-1.5, W + 0.5) (inside, partially outside and fully outside
// the map); partial_corners: u in (-1, 0) or (W - 1, W), v likewise, so some corners are outside.
Case gradcheck_case(std::uint64_t seed, Region region) {
  std::mt19937_64 rng(seed);
  const Shape s = random_small_shape(rng, 5);
  Case c = make_case(s, {DType::f64, DType::f64, DType::f64}, Locations::unit, seed,
                     Weights::uniform);
  const msda::Problem& p = c.problem;
  std::int64_t sample = 0;
  for (std::int64_t nqm = 0; nqm < p.batch * p.queries * p.heads; ++nqm)
    for (const auto& lv : p.levels)
      for (std::int64_t pt = 0; pt < p.points; ++pt, ++sample) {
        const double W = static_cast<double>(lv.width), H = static_cast<double>(lv.height);
        double u, v;
        if (region == Region::anywhere) {
          u = coordinate_away_from_integers(rng, -1.5, W + 0.5, 1e-3);
          v = coordinate_away_from_integers(rng, -1.5, H + 0.5, 1e-3);
        } else {
          const bool left = std::uniform_int_distribution<int>(0, 1)(rng) == 0;
          const bool top = std::uniform_int_distribution<int>(0, 1)(rng) == 0;
          u = coordinate_away_from_integers(rng, left ? -1.0 : W - 1, left ? 0.0 : W, 1e-3);
          v = coordinate_away_from_integers(rng, top ? -1.0 : H - 1, top ? 0.0 : H, 1e-3);
        }
        c.tensors.locations.set(2 * sample, (u + 0.5) / W);
        c.tensors.locations.set(2 * sample + 1, (v + 0.5) / H);
      }
  c.label += region == Region::anywhere ? " (gradcheck, anywhere)" : " (gradcheck, partial corners)";
  return c;
}

void gradcheck(Case& c) {
  SCOPED_TRACE(c.label);
  const msda::Problem& p = c.problem;
  Tensors& t = c.tensors;
  const std::vector<double> g = t.grad_output.to_double();
  Results r(p);
  r.poison();
  msda::backward(p, t.inputs(), t.grad_output.data(), r.gradients(), kReference);

  const auto fd_value = finite_differences(p, t.value, t.locations, t.weights, g, t.value, 1e-3, Fd::central);
  EXPECT_TRUE(close(r.grad_value.to_double(), fd_value, 1e-8)) << "grad_value";
  const auto fd_weight = finite_differences(p, t.value, t.locations, t.weights, g, t.weights, 1e-3, Fd::central);
  EXPECT_TRUE(close(r.grad_weights.to_double(), fd_weight, 1e-8)) << "grad_attention_weights";
  // step 1e-7 in normalized units is at most 5e-7 pixel: well inside the 1e-3 margin.
  const auto fd_loc = finite_differences(p, t.value, t.locations, t.weights, g, t.locations, 1e-7, Fd::central);
  EXPECT_TRUE(close(r.grad_locations.to_double(), fd_loc, 1e-6)) << "grad_sampling_locations";
}

TEST(ReferenceGradcheck, CentralDifferencesAnywhere) {
  for (std::uint64_t i = 0; i < 40; ++i) {
    Case c = gradcheck_case(case_seed(i), Region::anywhere);
    gradcheck(c);
  }
}

TEST(ReferenceGradcheck, CentralDifferencesWithPartialCorners) {
  for (std::uint64_t i = 0; i < 40; ++i) {
    Case c = gradcheck_case(case_seed(i), Region::partial_corners);
    gradcheck(c);
  }
}

// At integer pixel coordinates the location gradient is the one-sided derivative from floor(),
// i.e. the right-hand one (the cell [k, k+1) is used). Power-of-two maps keep (k + 0.5) / W exact.
TEST(ReferenceGradcheck, OneSidedDerivativeAtIntegerCoordinates) {
  for (std::uint64_t i = 0; i < 20; ++i) {
    const std::uint64_t seed = case_seed(i);
    std::mt19937_64 rng(seed);
    Shape s = random_small_shape(rng, 4);
    const std::int64_t sides[] = {1, 2, 4, 8};
    for (auto& lv : s.levels) {
      lv.height = sides[std::uniform_int_distribution<int>(0, 3)(rng)];
      lv.width = sides[std::uniform_int_distribution<int>(0, 3)(rng)];
    }
    Case c = make_case(s, {DType::f64, DType::f64, DType::f64}, Locations::centres, seed,
                       Weights::uniform);
    SCOPED_TRACE(c.label);
    const msda::Problem& p = c.problem;
    Tensors& t = c.tensors;
    const std::vector<double> g = t.grad_output.to_double();
    Results r(p);
    r.poison();
    msda::backward(p, t.inputs(), t.grad_output.data(), r.gradients(), kReference);
    // steps of 2^-20 normalized: at most 2^-17 pixel, exact in binary
    const auto right = finite_differences(p, t.value, t.locations, t.weights, g, t.locations,
                                          0x1p-20, Fd::forward);
    EXPECT_TRUE(close(r.grad_locations.to_double(), right, 1e-6)) << "grad_sampling_locations";
  }
}

TEST(ReferenceBruteForce, ForwardAndBackwardMatchSpecTranscription) {
  const Locations kinds[] = {Locations::unit,      Locations::wide,    Locations::borders,
                             Locations::nonfinite, Locations::cluster, Locations::mixed,
                             Locations::centres,   Locations::edges};
  std::uint64_t index = 0;
  for (Locations kind : kinds) {
    for (int rep = 0; rep < 10; ++rep, ++index) {
      const std::uint64_t seed = case_seed(index);
      std::mt19937_64 rng(seed);
      Shape s = random_small_shape(rng, 9);
      if (kind == Locations::centres || kind == Locations::edges) {
        // power-of-two maps: (k + 0.5) / W and the edge locations are exact, so no formulation of
        // u = x * W - 0.5 can land on the other side of an integer
        const std::int64_t sides[] = {1, 2, 4, 8};
        for (auto& lv : s.levels) {
          lv.height = sides[std::uniform_int_distribution<int>(0, 3)(rng)];
          lv.width = sides[std::uniform_int_distribution<int>(0, 3)(rng)];
        }
      }
      const Case c = make_case(s, {DType::f64, DType::f64, DType::f64}, kind, seed,
                               rep % 2 ? Weights::uniform : Weights::softmax);
      SCOPED_TRACE(c.label);
      const auto value = c.tensors.value.to_double();
      const auto loc = c.tensors.locations.to_double();
      const auto attn = c.tensors.weights.to_double();
      const Brute brute{c.problem, value, loc, attn};
      std::vector<double> gv, gl, ga;
      brute.backward(c.tensors.grad_output.to_double(), gv, gl, ga);

      Results r(c.problem);
      run_all(c.problem, c.tensors, r, kReference);
      EXPECT_TRUE(close(r.output.to_double(), brute.forward(), 1e-13)) << "output";
      EXPECT_TRUE(close(r.grad_value.to_double(), gv, 1e-13)) << "grad_value";
      EXPECT_TRUE(close(r.grad_locations.to_double(), gl, 1e-13)) << "grad_sampling_locations";
      EXPECT_TRUE(close(r.grad_weights.to_double(), ga, 1e-13)) << "grad_attention_weights";
    }
  }
}

// A single sample, worked by hand: 2x2 map, D = 1, value rows 1, 2, 3, 4, location at pixel
// coordinates (u, v) = (0.25, 0.5) -> x = 0.75 / 2, y = 1 / 2.
TEST(ReferenceBruteForce, HandWorkedSample) {
  Shape s;
  s.batch = s.heads = s.channels = s.queries = s.points = 1;
  s.levels = {{2, 2}};
  const msda::Problem p = make_problem(s, {DType::f64, DType::f64, DType::f64});
  Buffer value(DType::f64, 4), loc(DType::f64, 2), attn(DType::f64, 1), out(DType::f64, 1);
  for (int i = 0; i < 4; ++i) value.set(i, i + 1.0);  // v00=1 v01=2 v10=3 v11=4
  loc.set(0, 0.375);
  loc.set(1, 0.5);
  attn.set(0, 2.0);
  out.poison();
  msda::forward(p, {value.data(), loc.data(), attn.data()}, out.data(), kReference);
  // lh = 0.5, lw = 0.25: 0.375*1 + 0.125*2 + 0.375*3 + 0.125*4 = 2.25; times a = 2
  EXPECT_DOUBLE_EQ(out.get(0), 4.5);

  Buffer g(DType::f64, 1), gv(DType::f64, 4), gl(DType::f64, 2), ga(DType::f64, 1);
  g.set(0, 1.0);
  gv.poison(), gl.poison(), ga.poison();
  msda::backward(p, {value.data(), loc.data(), attn.data()}, g.data(),
                 {gv.data(), gl.data(), ga.data()}, kReference);
  EXPECT_DOUBLE_EQ(gv.get(0), 2 * 0.375);
  EXPECT_DOUBLE_EQ(gv.get(1), 2 * 0.125);
  EXPECT_DOUBLE_EQ(gv.get(2), 2 * 0.375);
  EXPECT_DOUBLE_EQ(gv.get(3), 2 * 0.125);
  EXPECT_DOUBLE_EQ(ga.get(0), 2.25);
  // d/du = hh*(v01-v00) + lh*(v11-v10) = 1; times a*W = 4. d/dv = hw*(v10-v00)+lw*(v11-v01) = 2;
  // times a*H = 4 -> 8.
  EXPECT_DOUBLE_EQ(gl.get(0), 4.0);
  EXPECT_DOUBLE_EQ(gl.get(1), 8.0);
}

// Samples outside the range rule (including NaN and infinities) contribute nothing and get zero
// gradients, exactly, in both backends.
TEST(ReferenceBruteForce, OutOfRangeSamplesAreExactlyZero) {
  const DTypes mixes[] = {{DType::f64, DType::f64, DType::f64},
                          {DType::f32, DType::f32, DType::f32},
                          {DType::bf16, DType::bf16, DType::bf16},
                          {DType::f16, DType::f32, DType::f32}};
  std::uint64_t index = 0;
  for (const DTypes& d : mixes) {
    const std::uint64_t seed = case_seed(index++);
    Shape s;
    s.batch = 2, s.heads = 2, s.channels = 5, s.queries = 7, s.points = 3;
    s.levels = {{4, 8}, {2, 2}, {1, 1}};
    Case c = make_case(s, d, Locations::unit, seed);
    SCOPED_TRACE(c.label);
    std::mt19937_64 rng(seed);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    std::int64_t sample = 0;
    for (std::int64_t nqm = 0; nqm < s.batch * s.queries * s.heads; ++nqm)
      for (const auto& lv : s.levels)
        for (std::int64_t pt = 0; pt < s.points; ++pt, ++sample) {
          // one coordinate out of range (u <= -1 or u >= W, exactly on the edge included), the
          // other anywhere
          const bool on_x = std::uniform_int_distribution<int>(0, 1)(rng) == 1;
          const double size = static_cast<double>(on_x ? lv.width : lv.height);
          const double outside[] = {-0.5 / size, 1 + 0.5 / size, -0.6, 1.6, nan, inf, -inf, -1e30, 1e30};
          const double out = outside[std::uniform_int_distribution<int>(0, 8)(rng)];
          const double other = std::uniform_real_distribution<double>(-0.2, 1.2)(rng);
          c.tensors.locations.set(2 * sample, on_x ? out : other);
          c.tensors.locations.set(2 * sample + 1, on_x ? other : out);
        }
    std::vector<msda::Options> runs = {{0, Backend::reference}};
    for (msda::Isa isa : cpu_isas()) runs.push_back({0, Backend::cpu, isa});
    for (const msda::Options& options : runs) {
      SCOPED_TRACE(std::string("backend ") + std::string(msda::name(options.backend)) + " isa " +
                   std::string(msda::name(options.isa)));
      Results r(c.problem);
      run_all(c.problem, c.tensors, r, options);
      for (const Buffer* b : {&r.output, &r.grad_value, &r.grad_locations, &r.grad_weights}) {
        for (std::int64_t i = 0; i < b->size(); ++i) {
          ASSERT_EQ(b->get(i), 0.0) << "element " << i << " of a result of size " << b->size();
        }
      }
    }
  }
}

}  // namespace
}  // namespace msda_test
