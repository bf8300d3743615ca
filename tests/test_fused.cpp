// The fused op (SPEC "The fused op"): forward_fused / backward_fused.
//
//   - the reference backend against the plain op fed locations and softmax weights that this file
//     computes itself in double from SPEC's formulas, and against central finite differences of
//     its own forward (f64);
//   - the cpu backend (every instruction set) against the reference in f64 on the widened inputs,
//     for every dtype mix, 2 and 4 coordinates, edge shapes and non-finite inputs, with every
//     result poisoned (NaN) before the call;
//   - bitwise determinism across runs and thread counts; requested gradients only;
//   - every bad input naming its argument, with nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "test_support.h"

namespace msda_test {
namespace {

using msda::Backend;
using msda::DType;
using msda::Level;

constexpr double kInfinity = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- problems -------------------------------------------------------------------------------

struct FusedShape {
  std::int64_t batch = 1, heads = 1, channels = 1, queries = 1, points = 1, coords = 2;
  std::vector<Level> levels;
  // The v2 attention: points per level (empty: `points` on every level), the sampling, and the
  // box formula's scale (D-FINE and RT-DETRv2 pass their own).
  std::vector<std::int64_t> level_points;
  msda::Sampling sampling = msda::Sampling::bilinear;
  double offset_scale = 0.5;
};

FusedShape with_v2(FusedShape shape, std::vector<std::int64_t> level_points, msda::Sampling sampling,
                   double offset_scale) {
  shape.level_points = std::move(level_points);
  shape.sampling = sampling;
  shape.offset_scale = offset_scale;
  return shape;
}

FusedShape fused_shape(std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t q, std::int64_t p,
                       std::vector<Level> levels, std::int64_t coords) {
  FusedShape s;
  s.batch = n, s.heads = m, s.channels = d, s.queries = q, s.points = p, s.levels = levels, s.coords = coords;
  return s;
}

msda::Problem make_fused_problem(const FusedShape& shape, const FusedDTypes& d) {
  msda::Problem p;
  p.batch = shape.batch;
  p.heads = shape.heads;
  p.channels = shape.channels;
  p.queries = shape.queries;
  p.points = shape.points;
  p.levels = shape.levels;
  p.level_start_index = msda::level_starts(shape.levels);
  for (const Level& l : shape.levels) p.value_len += l.height * l.width;
  p.value_dtype = d.value;
  p.reference_dtype = d.reference;
  p.location_dtype = d.offset;
  p.weight_dtype = d.logit;
  p.reference_coords = shape.coords;
  p.level_points = shape.level_points;
  p.sampling = shape.sampling;
  p.offset_scale = shape.offset_scale;
  return p;
}

std::int64_t reference_size(const msda::Problem& p) {
  return p.batch * p.queries * p.num_levels() * p.reference_coords;
}

// How offsets, reference points and logits are drawn.
enum class Draw {
  local,      // offsets of a few pixels (2 coords) or within the box (4): mostly in range
  wide,       // offsets up to most of the map: many samples partly or wholly outside
  nonfinite,  // local, with NaN / +-inf / huge offsets, -inf logits, and (4 coords) infinite box sizes
  boundaries, // 2 coords: reference points at pixel centres of each level and whole-pixel offsets, so
              // x*W - 0.5 is an integer up to rounding: the cpu backend must compute the locations'
              // bits exactly as the reference does (the corners, and the one-sided location gradient,
              // follow from them)
};

const char* name(Draw d) {
  switch (d) {
    case Draw::local: return "local";
    case Draw::wide: return "wide";
    case Draw::nonfinite: return "nonfinite";
    case Draw::boundaries: return "boundaries";
  }
  return "?";
}

struct FusedTensors {
  Buffer value, reference, offsets, logits, grad_output;
  msda::FusedInputs inputs() const { return {value.data(), reference.data(), offsets.data(), logits.data()}; }
  FusedTensors widened() const {
    return {value.converted(DType::f64), reference.converted(DType::f64), offsets.converted(DType::f64),
            logits.converted(DType::f64), grad_output.converted(DType::f64)};
  }
};

struct FusedCase {
  msda::Problem problem;
  FusedTensors tensors;
  std::string label;
};

FusedCase make_fused_case(const FusedShape& shape, const FusedDTypes& d, Draw draw, std::uint64_t seed) {
  FusedCase c;
  c.problem = make_fused_problem(shape, d);
  const msda::Problem& p = c.problem;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0), sym(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::int64_t L = p.num_levels(), R = p.reference_coords, K = p.total_points();
  std::vector<std::int64_t> level_of;  // the level of each of a row's K samples
  for (std::int64_t l = 0; l < L; ++l) level_of.insert(level_of.end(), p.points_of(l), l);
  const bool nonfinite = draw == Draw::nonfinite;
  auto special = [&]() {
    const double values[] = {kNaN, kInfinity, -kInfinity, 1e30, -1e30};
    return values[std::uniform_int_distribution<int>(0, 4)(rng)];
  };

  c.tensors.value = Buffer(d.value, value_size(p));
  for (std::int64_t i = 0; i < c.tensors.value.size(); ++i) c.tensors.value.set(i, sym(rng));

  c.tensors.reference = Buffer(d.reference, reference_size(p));
  for (std::int64_t i = 0; i < c.tensors.reference.size(); i += R) {
    c.tensors.reference.set(i, unit(rng));
    c.tensors.reference.set(i + 1, unit(rng));
    if (R == 4) {
      c.tensors.reference.set(i + 2, 0.05 + 0.6 * unit(rng));
      c.tensors.reference.set(i + 3, 0.05 + 0.6 * unit(rng));
      if (nonfinite && unit(rng) < 0.05) c.tensors.reference.set(i + 2 + (unit(rng) < 0.5), kInfinity);
    }
  }

  if (draw == Draw::boundaries) {  // every level's reference point at a pixel centre of that level
    for (std::int64_t i = 0; i < c.tensors.reference.size(); i += R) {
      const Level& level = p.levels[i / R % L];
      c.tensors.reference.set(i, (std::uniform_int_distribution<std::int64_t>(0, level.width - 1)(rng) + 0.5) /
                                     static_cast<double>(level.width));
      c.tensors.reference.set(i + 1, (std::uniform_int_distribution<std::int64_t>(0, level.height - 1)(rng) + 0.5) /
                                         static_cast<double>(level.height));
    }
  }

  c.tensors.offsets = Buffer(d.offset, location_size(p));
  for (std::int64_t i = 0; i < c.tensors.offsets.size(); i += 2) {
    const std::int64_t l = level_of[i / 2 % K];
    const double P = static_cast<double>(p.points_of(l));
    for (std::int64_t k = 0; k < 2; ++k) {
      const double size = static_cast<double>(k == 0 ? p.levels[l].width : p.levels[l].height);
      double o;
      if (draw == Draw::boundaries)
        o = static_cast<double>(std::uniform_int_distribution<int>(-3, 3)(rng));
      else if (R == 2)  // pixels of the level
        o = draw == Draw::wide ? 0.8 * size * sym(rng) : 4.0 * sym(rng);
      else  // fractions of half the box, spread over the points: loc = c + o / P * w / 2
        o = (draw == Draw::wide ? 4.0 : 1.2) * P * sym(rng);
      if (nonfinite && unit(rng) < 0.1) o = special();
      c.tensors.offsets.set(i + k, o);
    }
  }

  c.tensors.logits = Buffer(d.logit, weight_size(p));
  for (std::int64_t i = 0; i < c.tensors.logits.size(); ++i) {
    // Every row keeps its first logit finite: a row of -inf is a row of NaN (tested on its own).
    const bool row_start = i % K == 0;
    c.tensors.logits.set(i, nonfinite && !row_start && unit(rng) < 0.15 ? -kInfinity : 1.5 * normal(rng));
  }

  c.tensors.grad_output = Buffer(d.value, output_size(p));
  for (std::int64_t i = 0; i < c.tensors.grad_output.size(); ++i) c.tensors.grad_output.set(i, sym(rng));

  std::ostringstream os;
  os << "seed=" << seed << " " << describe(p) << " coords=" << R << " reference_dtype=" << msda::name(d.reference)
     << " draw=" << name(draw);
  c.label = os.str();
  return c;
}

// ---- results --------------------------------------------------------------------------------

struct FusedResults {
  Buffer output, grad_value, grad_reference, grad_offsets, grad_logits;
  explicit FusedResults(const msda::Problem& p)
      : output(p.value_dtype, output_size(p)),
        grad_value(p.value_dtype, value_size(p)),
        grad_reference(p.reference_dtype, reference_size(p)),
        grad_offsets(p.location_dtype, location_size(p)),
        grad_logits(p.weight_dtype, weight_size(p)) {}
  std::vector<Buffer*> all() { return {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits}; }
  std::vector<const Buffer*> all() const {
    return {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits};
  }
  void poison() {
    for (Buffer* b : all()) b->poison();
  }
  msda::FusedGradients gradients() {
    return {grad_value.data(), grad_reference.data(), grad_offsets.data(), grad_logits.data()};
  }
  bool guards_intact() const {
    for (const Buffer* b : all())
      if (!b->guards_intact()) return false;
    return true;
  }
};

const char* const kResultNames[] = {"output", "grad_value", "grad_reference_points", "grad_sampling_offsets",
                                    "grad_attention_logits"};

msda::Problem widened(const msda::Problem& problem) {
  msda::Problem p = problem;
  p.value_dtype = p.reference_dtype = p.location_dtype = p.weight_dtype = DType::f64;
  return p;
}

void run_fused(const msda::Problem& p, const FusedTensors& t, FusedResults& r, const msda::Options& options) {
  r.poison();
  msda::forward_fused(p, t.inputs(), r.output.data(), options);
  msda::backward_fused(p, t.inputs(), t.grad_output.data(), r.gradients(), options);
}

FusedResults truth_of(const FusedCase& c) {
  const msda::Problem p64 = widened(c.problem);
  FusedResults truth(p64);
  run_fused(p64, c.tensors.widened(), truth, {0, Backend::reference});
  return truth;
}

void expect_close(const FusedResults& got, const FusedResults& truth, const char* who) {
  SCOPED_TRACE(who);
  const auto g = got.all();
  const auto t = truth.all();
  for (std::size_t k = 0; k < g.size(); ++k)
    EXPECT_TRUE(close(g[k]->to_double(), t[k]->to_double(), tolerance(g[k]->dtype()))) << kResultNames[k];
  EXPECT_TRUE(got.guards_intact()) << "a result was written outside its buffer";
}

void check_fused_case(const FusedCase& c) {
  SCOPED_TRACE(c.label);
  const FusedTensors before = c.tensors;
  const FusedResults truth = truth_of(c);
  for (msda::Isa isa : cpu_isas()) {
    const std::string who = "backend cpu, isa " + std::string(msda::name(isa));
    FusedResults cpu(c.problem);
    run_fused(c.problem, c.tensors, cpu, {0, Backend::cpu, isa});
    expect_close(cpu, truth, who.c_str());
  }
  FusedResults ref(c.problem);
  run_fused(c.problem, c.tensors, ref, {0, Backend::reference});
  expect_close(ref, truth, "backend reference in the case's dtypes");
  EXPECT_TRUE(c.tensors.value.same_bytes(before.value));
  EXPECT_TRUE(c.tensors.reference.same_bytes(before.reference));
  EXPECT_TRUE(c.tensors.offsets.same_bytes(before.offsets));
  EXPECT_TRUE(c.tensors.logits.same_bytes(before.logits));
  EXPECT_TRUE(c.tensors.grad_output.same_bytes(before.grad_output));
}

// ---- cpu against the reference: scenarios x dtype mixes -------------------------------------

struct FusedScenario {
  std::string name;
  FusedShape shape;
  Draw draw;
};

const std::vector<FusedScenario>& fused_scenarios() {
  static const std::vector<FusedScenario> all = {
      {"basic_2", fused_shape(2, 2, 8, 30, 4, {{8, 8}, {4, 5}}, 2), Draw::local},
      {"basic_4", fused_shape(2, 2, 8, 30, 4, {{8, 8}, {4, 5}}, 4), Draw::local},
      {"D32_four_levels_2", fused_shape(1, 3, 32, 25, 4, {{12, 15}, {6, 8}, {3, 4}, {2, 2}}, 2), Draw::local},
      {"D64_4", fused_shape(1, 2, 64, 20, 3, {{9, 10}, {5, 5}}, 4), Draw::wide},
      {"one_by_one_P1_2", fused_shape(2, 2, 5, 20, 1, {{1, 1}, {1, 1}}, 2), Draw::wide},
      {"one_by_one_P1_4", fused_shape(2, 2, 5, 20, 1, {{1, 1}, {3, 1}}, 4), Draw::wide},
      {"odd_D_2", fused_shape(1, 3, 17, 25, 3, {{7, 9}, {3, 5}, {1, 3}}, 2), Draw::wide},
      {"nonfinite_2", fused_shape(2, 2, 8, 40, 4, {{6, 7}, {3, 3}}, 2), Draw::nonfinite},
      {"nonfinite_4", fused_shape(2, 2, 32, 40, 4, {{6, 7}, {3, 3}}, 4), Draw::nonfinite},
      {"pixel_boundaries_2", fused_shape(2, 2, 8, 40, 3, {{7, 9}, {5, 3}, {3, 1}}, 2), Draw::boundaries},
      // An encoder (queries as many as value's rows): the backward walks them in stripes.
      {"encoder_like_2", fused_shape(2, 2, 32, 222, 4, {{12, 14}, {6, 7}, {3, 4}}, 2), Draw::local},
      // The v2 attention: D-FINE's points [3, 6, 3] and offset_scale, discrete sampling.
      {"v2_dfine_4", with_v2(fused_shape(1, 8, 32, 30, 0, {{16, 16}, {8, 8}, {4, 4}}, 4), {3, 6, 3},
                             msda::Sampling::bilinear, 0.5), Draw::local},
      {"v2_scale_4", with_v2(fused_shape(2, 2, 8, 30, 0, {{9, 7}, {5, 4}, {2, 3}}, 4), {1, 4, 2},
                             msda::Sampling::bilinear, 0.75), Draw::wide},
      {"v2_points_2", with_v2(fused_shape(2, 2, 17, 30, 0, {{9, 7}, {5, 4}}, 2), {5, 2},
                              msda::Sampling::bilinear, 0.5), Draw::local},
      {"v2_discrete_4", with_v2(fused_shape(1, 3, 32, 30, 0, {{16, 16}, {8, 8}, {4, 4}}, 4), {3, 6, 3},
                                msda::Sampling::discrete, 0.5), Draw::local},
      {"v2_discrete_nonfinite_4", with_v2(fused_shape(2, 2, 8, 40, 0, {{6, 7}, {3, 3}}, 4), {2, 3},
                                          msda::Sampling::discrete, 0.3), Draw::nonfinite},
  };
  return all;
}

class FusedCpuVsReference : public ::testing::TestWithParam<std::tuple<std::size_t, std::size_t>> {};

TEST_P(FusedCpuVsReference, OutputAndGradientsMatch) {
  const FusedScenario& s = fused_scenarios()[std::get<0>(GetParam())];
  const FusedDTypes& d = fused_mixes()[std::get<1>(GetParam())];
  check_fused_case(make_fused_case(s.shape, d, s.draw, case_seed(0)));
}

INSTANTIATE_TEST_SUITE_P(
    Scenarios, FusedCpuVsReference,
    ::testing::Combine(::testing::Range<std::size_t>(0, fused_scenarios().size()),
                       ::testing::Range<std::size_t>(0, fused_mixes().size())),
    [](const ::testing::TestParamInfo<FusedCpuVsReference::ParamType>& info) {
      return fused_scenarios()[std::get<0>(info.param)].name + "_" + to_string(fused_mixes()[std::get<1>(info.param)]);
    });

// Random shapes, f32 and bf16 with f32 offsets and logits (autocast's mix).
TEST(FusedCpuVsReferenceMisc, RandomShapes) {
  const FusedDTypes mixes[] = {{DType::f32, DType::f32, DType::f32, DType::f32},
                               {DType::bf16, DType::f32, DType::bf16, DType::bf16},
                               {DType::f64, DType::f64, DType::f64, DType::f64}};
  const std::int64_t channel_choices[] = {1, 3, 4, 8, 16, 31, 32, 33, 64};
  for (std::uint64_t index = 0; index < 24; ++index) {
    std::mt19937_64 rng(case_seed(index));
    auto uniform = [&](std::int64_t lo, std::int64_t hi) {
      return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
    };
    FusedShape s;
    s.batch = uniform(1, 3), s.heads = uniform(1, 4), s.channels = channel_choices[uniform(0, 8)];
    s.queries = uniform(1, 30), s.points = uniform(1, 6), s.coords = uniform(0, 1) ? 4 : 2;
    for (std::int64_t l = 0, levels = uniform(1, 5); l < levels; ++l) s.levels.push_back({uniform(1, 10), uniform(1, 10)});
    const Draw draws[] = {Draw::local, Draw::wide, Draw::nonfinite};
    check_fused_case(make_fused_case(s, mixes[index % 3], draws[uniform(0, 2)], case_seed(index)));
  }
}

// Parts of one level (more threads than (n, m) pairs, or level_parts): the softmax still runs
// over the whole row, and the two-pass split gives the same results.
TEST(FusedCpuVsReferenceMisc, LevelPartsAndTwoPasses) {
  const FusedCase c = make_fused_case(fused_shape(1, 1, 8, 40, 3, {{6, 7}, {3, 4}, {2, 2}}, 4),
                                      {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::local, case_seed(0));
  SCOPED_TRACE(c.label);
  const FusedResults truth = truth_of(c);
  for (int threads : {1, 2, 3, 8}) {
    for (bool level_parts : {false, true}) {
      msda::Options o{threads, Backend::cpu};
      o.tuning.level_parts = level_parts;
      FusedResults got(c.problem);
      run_fused(c.problem, c.tensors, got, o);
      expect_close(got, truth, ("threads " + std::to_string(threads) + " level_parts " + std::to_string(level_parts)).c_str());
    }
  }
}

// ---- the reference against SPEC's formula, computed here ------------------------------------

// The locations and softmax weights of SPEC "The fused op", in double, from the case's tensors.
struct Materialised {
  Buffer locations, weights;
};

Materialised materialise(const FusedCase& c) {
  const msda::Problem& p = c.problem;
  const std::int64_t L = p.num_levels(), R = p.reference_coords, LP = p.total_points();
  Materialised m{Buffer(DType::f64, location_size(p)), Buffer(DType::f64, weight_size(p))};
  for (std::int64_t row = 0; row < p.batch * p.queries * p.heads; ++row) {
    const std::int64_t nq = row / p.heads;
    double top = -kInfinity, total = 0;
    for (std::int64_t j = 0; j < LP; ++j) top = std::max(top, c.tensors.logits.get(row * LP + j));
    for (std::int64_t j = 0; j < LP; ++j) total += std::exp(c.tensors.logits.get(row * LP + j) - top);
    for (std::int64_t j = 0; j < LP; ++j)
      m.weights.set(row * LP + j, std::exp(c.tensors.logits.get(row * LP + j) - top) / total);
    for (std::int64_t l = 0, first = 0; l < L; first += p.points_of(l), ++l)
      for (std::int64_t pt = 0; pt < p.points_of(l); ++pt) {
        const std::int64_t i = row * LP + first + pt;
        const double P = static_cast<double>(p.points_of(l));
        auto ref = [&](std::int64_t k) { return c.tensors.reference.get((nq * L + l) * R + k); };
        for (std::int64_t k = 0; k < 2; ++k) {
          const double o = c.tensors.offsets.get(2 * i + k);
          const double size = static_cast<double>(k == 0 ? p.levels[l].width : p.levels[l].height);
          m.locations.set(2 * i + k,
                          R == 2 ? ref(k) + o / size : ref(k) + o / P * ref(2 + k) * p.offset_scale);
        }
      }
  }
  return m;
}

// The fused op equals the plain op on the locations and weights of SPEC's formula: in f64 to
// rounding; in f32 within f32 rounding of the locations. grad_value too.
TEST(FusedVsPlainOp, EqualsThePlainOpOnMaterialisedLocationsAndWeights) {
  const FusedShape equal = fused_shape(2, 3, 16, 30, 4, {{9, 11}, {5, 6}, {2, 3}}, 2);
  // The v2 attention too: points per level, D-FINE's box formula with its own scale, discrete.
  const FusedShape shapes[] = {equal, with_v2(equal, {3, 6, 3}, msda::Sampling::bilinear, 0.75),
                               with_v2(equal, {2, 1, 4}, msda::Sampling::discrete, 0.5)};
  for (const FusedShape& shape : shapes)
  for (std::int64_t coords : {2, 4}) {
    for (DType dtype : {DType::f64, DType::f32}) {
      FusedShape s = shape;
      s.coords = coords;
      const FusedCase c = make_fused_case(s, {dtype, dtype, dtype, dtype}, Draw::wide, case_seed(coords));
      SCOPED_TRACE(c.label);
      const Materialised m = materialise(c);
      msda::Problem plain = c.problem;
      plain.location_dtype = plain.weight_dtype = dtype;
      const Buffer locations = m.locations.converted(dtype), weights = m.weights.converted(dtype);
      const msda::Inputs inputs{c.tensors.value.data(), locations.data(), weights.data()};
      for (Backend backend : {Backend::reference, Backend::cpu}) {
        SCOPED_TRACE(std::string(msda::name(backend)));
        Buffer out(dtype, output_size(plain)), grad_value(dtype, value_size(plain));
        out.poison(), grad_value.poison();
        msda::forward(plain, inputs, out.data(), {0, backend});
        msda::backward(plain, inputs, c.tensors.grad_output.data(), {grad_value.data(), nullptr, nullptr}, {0, backend});
        FusedResults fused(c.problem);
        run_fused(c.problem, c.tensors, fused, {0, backend});
        const double tol = dtype == DType::f64 ? 1e-12 : 1e-5;
        EXPECT_TRUE(close(fused.output.to_double(), out.to_double(), tol)) << "output";
        EXPECT_TRUE(close(fused.grad_value.to_double(), grad_value.to_double(), tol)) << "grad_value";
      }
    }
  }
}

// ---- finite differences of the reference, f64 -----------------------------------------------

// L(inputs) = sum(grad_output * forward_fused(inputs)); its central differences against
// backward_fused, for every element of the four inputs. Offsets are drawn away from integer pixel
// coordinates (where the bilinear form has kinks) and from the range rule's edges.
TEST(FusedGradcheck, ReferenceGradientsMatchFiniteDifferences) {
  for (std::int64_t coords : {2, 4}) {
    SCOPED_TRACE("coords " + std::to_string(coords));
    FusedCase c = make_fused_case(fused_shape(2, 2, 3, 4, 2, {{4, 5}, {3, 2}}, coords),
                                  {DType::f64, DType::f64, DType::f64, DType::f64}, Draw::local, case_seed(coords));
    const msda::Problem& p = c.problem;
    std::mt19937_64 rng(case_seed(100 + coords));
    std::uniform_real_distribution<double> sym(-1.0, 1.0);
    // Redraw offsets until every pixel coordinate is at least 0.01 from an integer.
    for (int attempt = 0;; ++attempt) {
      ASSERT_LT(attempt, 1000);
      const Materialised m = materialise(c);
      bool fine = true;
      for (std::int64_t i = 0; i < m.locations.size(); ++i) {
        const std::int64_t l = i / 2 / p.points % p.num_levels();
        const double size = static_cast<double>(i % 2 == 0 ? p.levels[l].width : p.levels[l].height);
        const double u = m.locations.get(i) * size - 0.5, frac = u - std::floor(u);
        if (frac < 0.01 || frac > 0.99) {
          fine = false;
          c.tensors.offsets.set(i, c.tensors.offsets.get(i) + 0.1 * sym(rng));
        }
      }
      if (fine) break;
    }
    FusedResults analytic(p);
    run_fused(p, c.tensors, analytic, {0, Backend::reference});
    auto loss = [&](const FusedTensors& t) {
      Buffer out(DType::f64, output_size(p));
      msda::forward_fused(p, t.inputs(), out.data(), {0, Backend::reference});
      double sum = 0;
      for (std::int64_t i = 0; i < out.size(); ++i) sum += out.get(i) * t.grad_output.get(i);
      return sum;
    };
    const double h = 1e-6;
    auto numeric = [&](Buffer FusedTensors::*member) {
      FusedTensors t = c.tensors;
      Buffer& b = t.*member;
      std::vector<double> out(static_cast<std::size_t>(b.size()));
      for (std::int64_t i = 0; i < b.size(); ++i) {
        const double x = b.get(i);
        b.set(i, x + h);
        const double up = loss(t);
        b.set(i, x - h);
        const double down = loss(t);
        b.set(i, x);
        out[static_cast<std::size_t>(i)] = (up - down) / (2 * h);
      }
      return out;
    };
    EXPECT_TRUE(close(analytic.grad_value.to_double(), numeric(&FusedTensors::value), 1e-7)) << "value";
    EXPECT_TRUE(close(analytic.grad_reference.to_double(), numeric(&FusedTensors::reference), 1e-7)) << "reference";
    EXPECT_TRUE(close(analytic.grad_offsets.to_double(), numeric(&FusedTensors::offsets), 1e-7)) << "offsets";
    EXPECT_TRUE(close(analytic.grad_logits.to_double(), numeric(&FusedTensors::logits), 1e-7)) << "logits";
  }
}

// ---- edge cases -----------------------------------------------------------------------------

// A sample zeroed by the range rule adds nothing to any gradient: an infinite offset or box size
// must not turn 0 * inf into NaN.
TEST(FusedEdges, ZeroedSamplesGiveFiniteGradients) {
  for (std::int64_t coords : {2, 4}) {
    const FusedCase c = make_fused_case(fused_shape(2, 2, 8, 30, 4, {{6, 7}, {3, 3}}, coords),
                                        {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::nonfinite,
                                        case_seed(coords));
    SCOPED_TRACE(c.label);
    for (Backend backend : {Backend::reference, Backend::cpu}) {
      FusedResults r(c.problem);
      run_fused(c.problem, c.tensors, r, {0, backend});
      std::size_t k = 0;
      for (const Buffer* b : r.all()) {
        for (double x : b->to_double()) ASSERT_TRUE(std::isfinite(x)) << kResultNames[k] << " " << msda::name(backend);
        ++k;
      }
    }
  }
}

// A row of -inf logits is a row of NaN weights (torch.softmax's answer): its output and logit
// gradients are NaN on both backends, and the other rows are unaffected.
TEST(FusedEdges, RowOfMinusInfinityLogitsIsNaN) {
  FusedCase c = make_fused_case(fused_shape(1, 2, 8, 3, 2, {{4, 4}, {2, 2}}, 2),
                                {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::local, case_seed(0));
  const std::int64_t LP = 4, row = 3;  // (q = 1, m = 1)
  for (std::int64_t j = 0; j < LP; ++j) {
    c.tensors.logits.set(row * LP + j, -kInfinity);
    c.tensors.offsets.set(2 * (row * LP + j), 0.0);  // on the map: the NaN weight is used
    c.tensors.offsets.set(2 * (row * LP + j) + 1, 0.0);
  }
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    SCOPED_TRACE(std::string(msda::name(backend)));
    FusedResults r(c.problem);
    run_fused(c.problem, c.tensors, r, {0, backend});
    for (std::int64_t i = 0; i < r.output.size(); ++i) EXPECT_EQ(std::isnan(r.output.get(i)), i / 8 == row) << i;
    for (std::int64_t i = 0; i < r.grad_logits.size(); ++i) EXPECT_EQ(std::isnan(r.grad_logits.get(i)), i / LP == row) << i;
  }
}

// N = 0 and Q = 0: an empty output, grad_value all zeros, nothing else to write; M = 0 leaves
// grad_reference_points zero (no sample moves it).
TEST(FusedEdges, EmptyBatchQueriesAndHeads) {
  for (auto [n, q, m] : {std::tuple{0, 5, 2}, std::tuple{2, 0, 2}, std::tuple{2, 5, 0}}) {
    for (std::int64_t coords : {2, 4}) {
      const msda::Problem p = make_fused_problem(fused_shape(n, m, 4, q, 2, {{3, 4}, {2, 2}}, coords), {});
      SCOPED_TRACE(describe(p));
      Buffer value(DType::f32, value_size(p)), ref(DType::f32, reference_size(p)), off(DType::f32, location_size(p)),
          logits(DType::f32, weight_size(p)), grad_out(DType::f32, output_size(p));
      for (std::int64_t i = 0; i < value.size(); ++i) value.set(i, 1.0);
      for (std::int64_t i = 0; i < ref.size(); ++i) ref.set(i, 0.5);
      const msda::FusedInputs in{value.data(), ref.data(), off.data(), logits.data()};
      for (Backend backend : {Backend::reference, Backend::cpu}) {
        FusedResults r(p);
        r.poison();
        msda::forward_fused(p, in, r.output.data(), {0, backend});
        msda::backward_fused(p, in, grad_out.data(), r.gradients(), {0, backend});
        for (double x : r.grad_value.to_double()) ASSERT_EQ(x, 0.0);
        for (double x : r.grad_reference.to_double()) ASSERT_EQ(x, 0.0);
        EXPECT_TRUE(r.guards_intact());
      }
    }
  }
}

// Only the requested gradients are computed and written; every requested one matches the truth.
TEST(FusedEdges, RequestedGradientsOnly) {
  const FusedCase c = make_fused_case(fused_shape(2, 2, 8, 20, 3, {{8, 8}, {4, 2}}, 4),
                                      {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::wide, case_seed(0));
  SCOPED_TRACE(c.label);
  const FusedResults truth = truth_of(c);
  for (int mask = 0; mask < 16; ++mask) {
    for (Backend backend : {Backend::cpu, Backend::reference}) {
      SCOPED_TRACE("mask " + std::to_string(mask) + " " + std::string(msda::name(backend)));
      FusedResults r(c.problem);
      for (Buffer* b : r.all()) b->fill_bytes(0x5A);
      msda::FusedGradients g;
      if (mask & 1) g.value = r.grad_value.data();
      if (mask & 2) g.reference_points = r.grad_reference.data();
      if (mask & 4) g.sampling_offsets = r.grad_offsets.data();
      if (mask & 8) g.attention_logits = r.grad_logits.data();
      msda::backward_fused(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(), g, {0, backend});
      const Buffer* got[] = {&r.grad_value, &r.grad_reference, &r.grad_offsets, &r.grad_logits};
      const Buffer* want[] = {&truth.grad_value, &truth.grad_reference, &truth.grad_offsets, &truth.grad_logits};
      for (int k = 0; k < 4; ++k) {
        if (mask & (1 << k))
          EXPECT_TRUE(close(got[k]->to_double(), want[k]->to_double(), 1e-5)) << kResultNames[k + 1];
        else
          EXPECT_TRUE(got[k]->all_bytes_are(0x5A)) << kResultNames[k + 1] << " written though not requested";
      }
      EXPECT_TRUE(r.guards_intact());
    }
  }
}

// ---- determinism ----------------------------------------------------------------------------

TEST(FusedDeterminism, BitwiseIdenticalAcrossThreadCountsAndRuns) {
  const FusedDTypes mixes[] = {{DType::f32, DType::f32, DType::f32, DType::f32},
                               {DType::bf16, DType::f32, DType::bf16, DType::bf16},
                               {DType::f64, DType::f64, DType::f64, DType::f64}};
  for (std::int64_t coords : {2, 4}) {
    for (const FusedDTypes& d : mixes) {
      // Many queries share pixels (local offsets on small maps): grad_value rows collide.
      const FusedCase c = make_fused_case(fused_shape(2, 4, 32, 300, 4, {{12, 15}, {6, 8}}, coords), d, Draw::local,
                                          case_seed(coords));
      SCOPED_TRACE(c.label);
      for (msda::Isa isa : cpu_isas()) {
        SCOPED_TRACE("isa " + std::string(msda::name(isa)));
        // Gathers from value itself first, then from staged per-head copies (forced, and as
        // automatic picks): the same bits.
        msda::Options direct{1, Backend::cpu, isa};
        direct.tuning.staging = msda::CpuTuning::Staging::direct;
        FusedResults first(c.problem);
        run_fused(c.problem, c.tensors, first, direct);
        for (const Buffer* b : first.all()) {
          double norm = 0;
          for (double x : b->to_double()) norm += x * x;
          ASSERT_TRUE(std::isfinite(norm) && norm > 0);
        }
        for (int threads : {2, 3, 8, 1}) {
          for (int rep = 0; rep < 2; ++rep) {
            msda::Options o{threads, Backend::cpu, isa};
            o.tuning.staging = rep == 0 ? msda::CpuTuning::Staging::copy : msda::CpuTuning::Staging::automatic;
            FusedResults again(c.problem);
            run_fused(c.problem, c.tensors, again, o);
            const auto a = again.all();
            const auto f = first.all();
            for (std::size_t k = 0; k < a.size(); ++k)
              EXPECT_TRUE(a[k]->same_bytes(*f[k])) << kResultNames[k] << " threads " << threads;
          }
        }
      }
    }
  }
}

// The backward keeps its reference-point scratch between calls (a cached workspace): calls of
// different sizes in turn, and many threads calling at once (each leases its own buffer), give
// the bits of a lone call.
TEST(FusedDeterminism, WorkspaceReuseAndConcurrentCallers) {
  const FusedCase big = make_fused_case(fused_shape(2, 4, 8, 200, 4, {{10, 12}, {5, 6}}, 4),
                                        {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::local, case_seed(0));
  const FusedCase small = make_fused_case(fused_shape(1, 2, 8, 30, 2, {{6, 7}}, 2),
                                          {DType::f32, DType::f32, DType::f32, DType::f32}, Draw::wide, case_seed(1));
  FusedResults big_alone(big.problem), small_alone(small.problem);
  run_fused(big.problem, big.tensors, big_alone, {2, Backend::cpu});
  run_fused(small.problem, small.tensors, small_alone, {2, Backend::cpu});
  auto same = [](const FusedResults& a, const FusedResults& b) {
    const auto x = a.all();
    const auto y = b.all();
    for (std::size_t k = 0; k < x.size(); ++k)
      if (!x[k]->same_bytes(*y[k])) return false;
    return true;
  };
  for (int round = 0; round < 3; ++round) {  // small after big reuses the big buffer, and back
    FusedResults b(big.problem), s(small.problem);
    run_fused(small.problem, small.tensors, s, {2, Backend::cpu});
    run_fused(big.problem, big.tensors, b, {2, Backend::cpu});
    EXPECT_TRUE(same(b, big_alone));
    EXPECT_TRUE(same(s, small_alone));
  }
  std::vector<FusedResults> results;
  for (int t = 0; t < 6; ++t) results.emplace_back(t % 2 ? small.problem : big.problem);
  std::vector<std::thread> callers;
  for (int t = 0; t < 6; ++t)
    callers.emplace_back([&, t] {
      const FusedCase& c = t % 2 ? small : big;
      run_fused(c.problem, c.tensors, results[static_cast<std::size_t>(t)], {2, Backend::cpu});
    });
  for (std::thread& t : callers) t.join();
  for (int t = 0; t < 6; ++t) EXPECT_TRUE(same(results[static_cast<std::size_t>(t)], t % 2 ? small_alone : big_alone)) << t;
}

// ---- bad input ------------------------------------------------------------------------------

template <class F>
::testing::AssertionResult throws_naming(F&& call, const std::vector<std::string>& names) {
  try {
    call();
  } catch (const msda::Error& e) {
    if (e.argument().empty() || e.expected().empty() || e.actual().empty())
      return ::testing::AssertionFailure() << "an Error with an empty field: " << e.what();
    if (!names_one_of(e.argument(), names))
      return ::testing::AssertionFailure() << "names '" << e.argument() << "': " << e.what();
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not an msda::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

msda::Problem base_fused() {
  return make_fused_problem(fused_shape(2, 2, 4, 3, 2, {{3, 4}, {2, 2}}, 2), {});
}

struct FusedSentinels {
  static constexpr std::size_t kBytes = 1 << 16;
  static constexpr unsigned char kByte = 0x5A;
  std::vector<double> inputs = std::vector<double>(kBytes / 8, 0.25);
  std::vector<unsigned char> output = std::vector<unsigned char>(kBytes, kByte);
  std::vector<unsigned char> gv = output, gr = output, go = output, gl = output;
  std::vector<double> grad_output = std::vector<double>(kBytes / 8, 0.5);
  msda::FusedInputs in() const { return {inputs.data(), inputs.data(), inputs.data(), inputs.data()}; }
  msda::FusedGradients grads() { return {gv.data(), gr.data(), go.data(), gl.data()}; }
  bool untouched() const {
    for (const auto* b : {&output, &gv, &gr, &go, &gl})
      for (unsigned char c : *b)
        if (c != kByte) return false;
    return true;
  }
};

TEST(FusedValidation, BadProblemsThrowNamingTheArgumentAndTouchNothing) {
  struct Bad {
    std::string what;
    msda::Problem problem;
    std::vector<std::string> names;
  };
  std::vector<Bad> bad;
  auto add = [&](std::string what, auto mutate, std::vector<std::string> names) {
    msda::Problem p = base_fused();
    mutate(p);
    bad.push_back({std::move(what), p, std::move(names)});
  };
  add("3 reference coordinates", [](msda::Problem& p) { p.reference_coords = 3; }, {"reference_points"});
  add("0 reference coordinates", [](msda::Problem& p) { p.reference_coords = 0; }, {"reference_points"});
  add("reference f64 with f32 value", [](msda::Problem& p) { p.reference_dtype = DType::f64; }, {"reference_points"});
  add("reference bf16 with f16 value",
      [](msda::Problem& p) { p.value_dtype = DType::f16, p.reference_dtype = DType::bf16; }, {"reference_points"});
  add("offsets f64 with f32 value", [](msda::Problem& p) { p.location_dtype = DType::f64; }, {"sampling_offsets"});
  add("logits bf16 with f32 value", [](msda::Problem& p) { p.weight_dtype = DType::bf16; }, {"attention_logits"});
  add("P = 0", [](msda::Problem& p) { p.points = 0; }, {"points", "P"});
  add("D = 0", [](msda::Problem& p) { p.channels = 0; }, {"channels", "D"});
  add("no levels", [](msda::Problem& p) { p.levels.clear(), p.level_start_index.clear(), p.value_len = 0; },
      {"spatial_shapes"});
  add("S wrong", [](msda::Problem& p) { p.value_len = 15; }, {"value"});
  add("level_start_index wrong", [](msda::Problem& p) { p.level_start_index = {0, 11}; }, {"level_start_index"});
  add("reference byte size overflows", [](msda::Problem& p) {
        p.heads = 0, p.queries = std::int64_t{1} << 59, p.batch = 1, p.reference_coords = 4;  // 2^62 elements, f32
      }, {"reference_points"});
  add("reference element count overflows", [](msda::Problem& p) {
        p.heads = 0, p.queries = std::int64_t{1} << 61, p.batch = 1, p.reference_coords = 4;
      }, {"reference_points"});
  add("offsets overflow", [](msda::Problem& p) { p.queries = std::int64_t{1} << 61; }, {"sampling_offsets"});
  add("L*P overflows with M = 0", [](msda::Problem& p) { p.heads = 0, p.points = std::int64_t{1} << 62; },
      {"attention_logits"});
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    EXPECT_TRUE(throws_naming([&] { msda::validate_fused(b.problem); }, b.names));
    for (Backend backend : {Backend::cpu, Backend::reference}) {
      FusedSentinels s;
      EXPECT_TRUE(throws_naming([&] { msda::forward_fused(b.problem, s.in(), s.output.data(), {1, backend}); }, b.names));
      EXPECT_TRUE(throws_naming(
          [&] { msda::backward_fused(b.problem, s.in(), s.grad_output.data(), s.grads(), {1, backend}); }, b.names));
      EXPECT_TRUE(s.untouched());
    }
  }
  EXPECT_NO_THROW(msda::validate_fused(base_fused()));
  // The plain op ignores the fused fields.
  msda::Problem p = base_fused();
  p.reference_coords = 3;
  EXPECT_NO_THROW(msda::validate(p));
}

TEST(FusedValidation, NullPointersForNonEmptyTensors) {
  const msda::Problem p = base_fused();
  for (Backend backend : {Backend::cpu, Backend::reference}) {
    SCOPED_TRACE(std::string(msda::name(backend)));
    FusedSentinels s;
    const std::pair<const void* msda::FusedInputs::*, const char*> members[] = {
        {&msda::FusedInputs::value, "value"},
        {&msda::FusedInputs::reference_points, "reference_points"},
        {&msda::FusedInputs::sampling_offsets, "sampling_offsets"},
        {&msda::FusedInputs::attention_logits, "attention_logits"}};
    for (const auto& [member, argument] : members) {
      msda::FusedInputs in = s.in();
      in.*member = nullptr;
      EXPECT_TRUE(throws_naming([&] { msda::forward_fused(p, in, s.output.data(), {1, backend}); }, {argument}));
      EXPECT_TRUE(throws_naming(
          [&] { msda::backward_fused(p, in, s.grad_output.data(), s.grads(), {1, backend}); }, {argument}));
    }
    EXPECT_TRUE(throws_naming([&] { msda::forward_fused(p, s.in(), nullptr, {1, backend}); }, {"output"}));
    EXPECT_TRUE(throws_naming([&] { msda::backward_fused(p, s.in(), nullptr, s.grads(), {1, backend}); },
                              {"grad_output"}));
    EXPECT_TRUE(s.untouched());
  }
}

TEST(FusedValidation, DescribeFused) {
  const std::int64_t shapes[] = {3, 4, 2, 2}, starts[] = {0, 12};
  auto sizes = [] {
    msda::FusedTensorSizes s;
    s.value = {2, 16, 2, 4};
    s.spatial_shapes = {2, 2};
    s.level_start_index = {2};
    s.reference_points = {2, 3, 2, 4};
    s.sampling_offsets = {2, 3, 2, 2, 5, 2};
    s.attention_logits = {2, 3, 2, 10};
    return s;
  };
  const msda::Problem p = msda::describe_fused(sizes(), shapes, starts, DType::bf16, DType::f32, DType::bf16, DType::f32);
  EXPECT_EQ(p.batch, 2);
  EXPECT_EQ(p.queries, 3);
  EXPECT_EQ(p.heads, 2);
  EXPECT_EQ(p.channels, 4);
  EXPECT_EQ(p.points, 5);
  EXPECT_EQ(p.reference_coords, 4);
  EXPECT_EQ(p.reference_dtype, DType::f32);
  EXPECT_EQ(p.location_dtype, DType::bf16);
  EXPECT_EQ(p.weight_dtype, DType::f32);

  struct Bad {
    std::string what;
    void (*mutate)(msda::FusedTensorSizes&);
    const char* name;
  };
  const Bad bad[] = {
      {"value rank", [](msda::FusedTensorSizes& s) { s.value = {2, 16, 8}; }, "value"},
      {"reference rank", [](msda::FusedTensorSizes& s) { s.reference_points = {2, 3, 8}; }, "reference_points"},
      {"reference 3 coords", [](msda::FusedTensorSizes& s) { s.reference_points = {2, 3, 2, 3}; }, "reference_points"},
      {"reference N", [](msda::FusedTensorSizes& s) { s.reference_points = {1, 3, 2, 4}; }, "reference_points"},
      {"reference Q", [](msda::FusedTensorSizes& s) { s.reference_points = {2, 4, 2, 4}; }, "reference_points"},
      {"reference L", [](msda::FusedTensorSizes& s) { s.reference_points = {2, 3, 3, 4}; }, "reference_points"},
      {"offsets rank", [](msda::FusedTensorSizes& s) { s.sampling_offsets = {2, 3, 2, 2, 10}; }, "sampling_offsets"},
      {"offsets M", [](msda::FusedTensorSizes& s) { s.sampling_offsets = {2, 3, 3, 2, 5, 2}; }, "sampling_offsets"},
      {"offsets last", [](msda::FusedTensorSizes& s) { s.sampling_offsets = {2, 3, 2, 2, 5, 3}; }, "sampling_offsets"},
      {"offsets P = 0", [](msda::FusedTensorSizes& s) { s.sampling_offsets = {2, 3, 2, 2, 0, 2}; }, "sampling_offsets"},
      {"logits rank", [](msda::FusedTensorSizes& s) { s.attention_logits = {2, 3, 2, 2, 5}; }, "attention_logits"},
      {"logits L*P", [](msda::FusedTensorSizes& s) { s.attention_logits = {2, 3, 2, 9}; }, "attention_logits"},
      {"logits Q", [](msda::FusedTensorSizes& s) { s.attention_logits = {2, 2, 2, 10}; }, "attention_logits"},
      {"negative size", [](msda::FusedTensorSizes& s) { s.attention_logits = {2, 3, -2, 10}; }, "attention_logits"},
      {"level_start_index size", [](msda::FusedTensorSizes& s) { s.level_start_index = {3}; }, "level_start_index"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    msda::FusedTensorSizes s = sizes();
    b.mutate(s);
    EXPECT_TRUE(throws_naming(
        [&] { msda::describe_fused(s, shapes, starts, DType::f32, DType::f32, DType::f32, DType::f32); }, {b.name}));
  }
  EXPECT_TRUE(throws_naming(
      [&] { msda::describe_fused(sizes(), shapes, starts, DType::f32, DType::f64, DType::f32, DType::f32); },
      {"reference_points"}));
}

}  // namespace
}  // namespace msda_test
