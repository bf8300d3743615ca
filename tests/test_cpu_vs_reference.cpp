// Backend::cpu against Backend::reference: forward output and the three gradients, on many shapes
// and location kinds, for every allowed dtype mix.
//
// The oracle ("truth") is the reference backend run in f64 on the case's inputs widened to f64
// (exact), so a bf16/f16 case is judged on the same rounded inputs it was given. The reference run
// in the case's own dtypes is held to the same bound.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "test_support.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace msda_test {
namespace {

using msda::Backend;
using msda::Level;

struct Scenario {
  std::string name;
  Shape shape;
  Locations locations;
  Weights weights = Weights::softmax;
  // false where f32 and f64 may legitimately disagree on which side of a pixel a location lies
  // (pixel centres of maps that are not powers of two), which changes the one-sided derivative.
  bool compare_location_grad = true;
};

Shape shape(std::int64_t n, std::int64_t m, std::int64_t d, std::int64_t q, std::int64_t p,
            std::vector<Level> levels) {
  Shape s;
  s.batch = n, s.heads = m, s.channels = d, s.queries = q, s.points = p, s.levels = levels;
  return s;
}

const std::vector<Scenario>& scenarios() {
  static const std::vector<Scenario> all = {
      {"basic", shape(1, 2, 8, 50, 4, {{8, 8}, {4, 4}}), Locations::unit},
      {"one_by_one", shape(2, 2, 4, 30, 2, {{1, 1}}), Locations::wide},
      {"one_by_one_levels", shape(1, 3, 5, 20, 3, {{1, 1}, {1, 1}, {1, 1}}), Locations::mixed},
      {"row_and_column_maps", shape(1, 2, 6, 40, 3, {{1, 7}, {5, 1}, {1, 1}}), Locations::wide},
      {"row_and_column_maps_pow2", shape(2, 2, 3, 25, 2, {{1, 8}, {4, 1}}), Locations::mixed},
      {"D1", shape(1, 3, 1, 40, 4, {{6, 5}, {3, 3}}), Locations::wide},
      {"D3", shape(2, 2, 3, 30, 4, {{7, 9}, {4, 5}}), Locations::wide},
      {"D17", shape(1, 2, 17, 30, 3, {{9, 6}, {5, 3}}), Locations::wide},
      {"D257", shape(1, 1, 257, 12, 2, {{5, 6}}), Locations::wide},
      {"D8", shape(1, 3, 8, 30, 4, {{6, 5}, {3, 3}}), Locations::wide},
      {"D16", shape(2, 2, 16, 20, 3, {{5, 7}, {2, 3}}), Locations::wide},
      {"D32", shape(2, 2, 32, 30, 3, {{8, 8}, {4, 2}, {1, 1}}), Locations::mixed},
      {"D48", shape(1, 2, 48, 20, 2, {{5, 6}, {3, 3}}), Locations::wide},
      {"D64", shape(1, 2, 64, 25, 4, {{9, 10}, {5, 5}}), Locations::wide},
      {"D64_edges_pow2", shape(2, 1, 64, 20, 2, {{4, 8}, {1, 1}, {2, 16}}), Locations::edges},
      {"five_levels", shape(1, 2, 8, 30, 4, {{10, 12}, {5, 6}, {3, 3}, {2, 2}, {1, 1}}),
       Locations::wide},
      {"P1", shape(2, 4, 8, 40, 1, {{6, 7}, {3, 4}}), Locations::unit},
      {"P8", shape(1, 2, 8, 30, 8, {{6, 7}, {3, 4}}), Locations::wide},
      {"N3", shape(3, 2, 4, 20, 2, {{5, 5}, {3, 2}}), Locations::wide},
      {"decoder_like", shape(1, 8, 32, 25, 4, {{20, 27}, {10, 14}, {5, 7}, {3, 4}}),
       Locations::unit},
      {"larger_maps", shape(1, 2, 16, 60, 4, {{40, 52}, {20, 26}}), Locations::wide},
      {"uniform_weights", shape(2, 2, 8, 30, 3, {{6, 5}, {3, 2}}), Locations::wide,
       Weights::uniform},
      {"centres_pow2", shape(2, 2, 8, 40, 4, {{8, 16}, {4, 4}, {1, 2}, {2, 1}, {1, 1}}),
       Locations::centres},
      {"centres_any_size", shape(1, 2, 8, 40, 4, {{7, 9}, {3, 5}, {1, 3}}), Locations::centres,
       Weights::softmax, false},
      {"borders", shape(1, 3, 5, 40, 4, {{6, 9}, {1, 4}, {3, 1}}), Locations::borders},
      {"range_edges_pow2", shape(2, 2, 4, 40, 4, {{4, 8}, {1, 1}, {2, 16}, {8, 2}}),
       Locations::edges},
      {"nonfinite", shape(2, 2, 8, 40, 4, {{6, 7}, {3, 3}}), Locations::nonfinite},
      {"cluster", shape(1, 2, 8, 150, 4, {{16, 16}, {8, 8}}), Locations::cluster},
      {"mixed_pow2", shape(2, 2, 9, 40, 3, {{8, 8}, {4, 2}, {1, 1}}), Locations::mixed,
       Weights::uniform},
      {"mixed_any_size", shape(1, 3, 7, 40, 5, {{9, 11}, {5, 6}, {2, 3}}), Locations::mixed},
      // Encoders (queries as many as value's rows): the backward walks them in stripes of image
      // rows (CpuTuning::query_stripe), taller than some levels and not dividing others.
      {"encoder_like", shape(2, 2, 32, 222, 4, {{12, 14}, {6, 7}, {3, 4}}), Locations::mixed},
      {"encoder_like_any_D", shape(1, 3, 12, 135, 3, {{9, 11}, {5, 6}, {2, 3}}), Locations::wide},
      // The v2 attention (SPEC "Points per level and discrete sampling"): D-FINE's [3, 6, 3], a
      // level with one point, compile-time D = 32 and runtime D, bilinear and discrete, every kind
      // of location (discrete: NaN and inf coordinates, pixel edges and centres, map borders).
      {"v2_dfine_points", with_v2(shape(1, 8, 32, 30, 0, {{16, 16}, {8, 8}, {4, 4}}), {3, 6, 3}), Locations::mixed},
      {"v2_points_wide", with_v2(shape(2, 2, 5, 30, 0, {{7, 9}, {4, 5}, {2, 3}, {1, 1}}), {1, 4, 2, 3}),
       Locations::wide},
      {"v2_points_nonfinite", with_v2(shape(1, 3, 16, 20, 0, {{6, 7}, {3, 3}}), {5, 2}), Locations::nonfinite},
      {"v2_discrete", with_v2(shape(1, 8, 32, 30, 0, {{16, 16}, {8, 8}, {4, 4}}), {4, 4, 4}, msda::Sampling::discrete),
       Locations::wide},
      {"v2_discrete_points", with_v2(shape(2, 2, 7, 30, 0, {{9, 11}, {5, 6}, {2, 3}}), {3, 6, 3}, msda::Sampling::discrete),
       Locations::mixed},
      {"v2_discrete_nonfinite", with_v2(shape(1, 2, 64, 25, 0, {{6, 7}, {3, 3}}), {2, 3}, msda::Sampling::discrete),
       Locations::nonfinite},
      {"v2_discrete_centres", with_v2(shape(1, 2, 8, 40, 0, {{8, 16}, {4, 4}, {1, 2}}), {2, 1, 3}, msda::Sampling::discrete),
       Locations::centres},
      {"v2_discrete_edges", with_v2(shape(2, 2, 4, 40, 0, {{4, 8}, {1, 1}, {2, 16}}), {3, 1, 2}, msda::Sampling::discrete),
       Locations::edges},
      {"v2_discrete_borders", with_v2(shape(1, 3, 5, 40, 0, {{6, 9}, {1, 4}, {3, 1}}), {1, 2, 3}, msda::Sampling::discrete),
       Locations::borders},
  };
  return all;
}

std::string dtype_label(const DTypes& d) {
  std::string s = to_string(d);
  for (auto& ch : s)
    if (ch == '/') ch = '_';
  return s;
}

// The truth: the reference backend in f64 on the widened inputs.
Results truth_of(const Case& c) {
  const msda::Problem p64 = as_f64(c.problem);
  const Tensors t64 = c.tensors.converted(msda::DType::f64, msda::DType::f64, msda::DType::f64);
  Results truth(p64);
  run_all(p64, t64, truth, {0, Backend::reference});
  return truth;
}

void expect_matches(const Results& got, const Results& truth, bool compare_location_grad,
                    const char* who) {
  SCOPED_TRACE(who);
  EXPECT_TRUE(close(got.output.to_double(), truth.output.to_double(),
                    tolerance(got.output.dtype())))
      << "output";
  EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(),
                    tolerance(got.grad_value.dtype())))
      << "grad_value";
  if (compare_location_grad)
    EXPECT_TRUE(close(got.grad_locations.to_double(), truth.grad_locations.to_double(),
                      tolerance(got.grad_locations.dtype())))
        << "grad_sampling_locations";
  EXPECT_TRUE(close(got.grad_weights.to_double(), truth.grad_weights.to_double(),
                    tolerance(got.grad_weights.dtype())))
      << "grad_attention_weights";
  EXPECT_TRUE(got.guards_intact()) << "a result was written outside its buffer";
}

// bf16/f16 results are computed in f32 and rounded once (SPEC "Precision"), so almost every
// element equals the truth rounded to the storage type: only an element whose f32 value lies within
// f32 rounding noise of a bf16/f16 rounding boundary may differ. Repeated rounding (accumulating in
// the storage type) makes most elements differ, yet can stay under the 1e-2 norm bound.
::testing::AssertionResult rounded_once(const Buffer& got, const Buffer& truth) {
  if (got.dtype() != msda::DType::bf16 && got.dtype() != msda::DType::f16)
    return ::testing::AssertionSuccess();
  Buffer rounded = truth.converted(got.dtype());
  std::int64_t differ = 0;
  for (std::int64_t i = 0; i < got.size(); ++i)
    if (got.get(i) != rounded.get(i) && !(got.get(i) == 0 && rounded.get(i) == 0)) ++differ;
  const std::int64_t allowed = 2 + got.size() / 100;
  if (differ <= allowed) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << differ << " of " << got.size()
                                       << " elements differ from the rounded truth (at most "
                                       << allowed << " may)";
}

void expect_rounded_once(const Results& got, const Results& truth, bool compare_location_grad) {
  EXPECT_TRUE(rounded_once(got.output, truth.output)) << "output";
  EXPECT_TRUE(rounded_once(got.grad_value, truth.grad_value)) << "grad_value";
  if (compare_location_grad)
    EXPECT_TRUE(rounded_once(got.grad_locations, truth.grad_locations)) << "grad_sampling_locations";
  EXPECT_TRUE(rounded_once(got.grad_weights, truth.grad_weights)) << "grad_attention_weights";
}

void check_case(const Case& c, bool compare_location_grad) {
  SCOPED_TRACE(c.label);
  const Tensors before = c.tensors;
  const Results truth = truth_of(c);

  for (msda::Isa isa : cpu_isas()) {
    const std::string who = "backend cpu, isa " + std::string(msda::name(isa));
    SCOPED_TRACE(who);
    Results cpu(c.problem);
    run_all(c.problem, c.tensors, cpu, {0, Backend::cpu, isa});
    expect_matches(cpu, truth, compare_location_grad, who.c_str());
    expect_rounded_once(cpu, truth, compare_location_grad);
  }

  Results ref(c.problem);
  run_all(c.problem, c.tensors, ref, {0, Backend::reference});
  expect_matches(ref, truth, compare_location_grad, "backend reference in the case's dtypes");
  expect_rounded_once(ref, truth, compare_location_grad);

  EXPECT_TRUE(c.tensors.value.same_bytes(before.value)) << "value was modified";
  EXPECT_TRUE(c.tensors.locations.same_bytes(before.locations)) << "locations were modified";
  EXPECT_TRUE(c.tensors.weights.same_bytes(before.weights)) << "weights were modified";
  EXPECT_TRUE(c.tensors.grad_output.same_bytes(before.grad_output)) << "grad_output was modified";
}

// ---- fixed scenarios x dtype mixes ----

class CpuVsReference : public ::testing::TestWithParam<std::tuple<std::size_t, std::size_t>> {};

TEST_P(CpuVsReference, OutputAndGradientsMatch) {
  const Scenario& s = scenarios()[std::get<0>(GetParam())];
  const DTypes& d = dtype_mixes()[std::get<1>(GetParam())];
  const Case c = make_case(s.shape, d, s.locations, case_seed(0), s.weights);
  check_case(c, s.compare_location_grad);
}

INSTANTIATE_TEST_SUITE_P(
    Scenarios, CpuVsReference,
    ::testing::Combine(::testing::Range<std::size_t>(0, scenarios().size()),
                       ::testing::Range<std::size_t>(0, dtype_mixes().size())),
    [](const ::testing::TestParamInfo<CpuVsReference::ParamType>& info) {
      return scenarios()[std::get<0>(info.param)].name + "_" +
             dtype_label(dtype_mixes()[std::get<1>(info.param)]);
    });

// ---- random shapes x dtype mixes ----

class CpuVsReferenceRandomShapes : public ::testing::TestWithParam<std::size_t> {};

TEST_P(CpuVsReferenceRandomShapes, OutputAndGradientsMatch) {
  const DTypes& d = dtype_mixes()[GetParam()];
  const std::int64_t channel_choices[] = {1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 64};
  const Locations kinds[] = {Locations::unit, Locations::wide, Locations::borders,
                             Locations::nonfinite, Locations::cluster, Locations::mixed};
  for (std::uint64_t index = 0; index < 30; ++index) {
    const std::uint64_t seed = case_seed(index);
    std::mt19937_64 rng(seed ^ 0x5EEDull);
    auto uniform = [&](std::int64_t lo, std::int64_t hi) {
      return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
    };
    Shape s;
    s.batch = uniform(1, 3);
    s.heads = uniform(1, 4);
    s.channels = channel_choices[uniform(0, 12)];
    s.queries = uniform(1, 40);
    s.points = uniform(1, 8);
    const std::int64_t levels = uniform(1, 5);
    for (std::int64_t l = 0; l < levels; ++l) s.levels.push_back({uniform(1, 12), uniform(1, 12)});
    const Locations kind = kinds[uniform(0, 5)];
    const Weights weights = uniform(0, 1) ? Weights::softmax : Weights::uniform;
    const Case c = make_case(s, d, kind, seed, weights);
    check_case(c, true);
  }
}

INSTANTIATE_TEST_SUITE_P(DTypeMixes, CpuVsReferenceRandomShapes,
                         ::testing::Range<std::size_t>(0, dtype_mixes().size()),
                         [](const ::testing::TestParamInfo<std::size_t>& info) {
                           return dtype_label(dtype_mixes()[info.param]);
                         });

// ---- only some gradients requested ----

class PartialGradients : public ::testing::TestWithParam<std::tuple<std::size_t, int>> {};

TEST_P(PartialGradients, RequestedOnesMatchAndNothingElseIsWritten) {
  const DTypes& d = dtype_mixes()[std::get<0>(GetParam())];
  const int mask = std::get<1>(GetParam());  // bit 0: value, 1: locations, 2: weights
  const Case c = make_case(shape(2, 2, 8, 30, 3, {{8, 8}, {4, 2}, {1, 1}}), d, Locations::mixed,
                           case_seed(static_cast<std::uint64_t>(mask)));
  SCOPED_TRACE(c.label);
  SCOPED_TRACE("requested gradients mask " + std::to_string(mask));
  const Results truth = truth_of(c);
  const Tensors before = c.tensors;

  std::vector<msda::Options> runs;
  for (msda::Isa isa : cpu_isas()) runs.push_back({0, Backend::cpu, isa});
  runs.push_back({0, Backend::reference});
  for (const msda::Options& options : runs) {
    SCOPED_TRACE(std::string("backend ") + std::string(msda::name(options.backend)) + " isa " +
                 std::string(msda::name(options.isa)));
    Results got(c.problem);
    got.poison();
    msda::Gradients g;
    if (mask & 1) g.value = got.grad_value.data();
    if (mask & 2) g.sampling_locations = got.grad_locations.data();
    if (mask & 4) g.attention_weights = got.grad_weights.data();
    msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(), g, options);
    if (mask & 1)
      EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(),
                        tolerance(d.value)))
          << "grad_value";
    if (mask & 2)
      EXPECT_TRUE(close(got.grad_locations.to_double(), truth.grad_locations.to_double(),
                        tolerance(d.location)))
          << "grad_sampling_locations";
    if (mask & 4)
      EXPECT_TRUE(close(got.grad_weights.to_double(), truth.grad_weights.to_double(),
                        tolerance(d.weight)))
          << "grad_attention_weights";
    EXPECT_TRUE(got.guards_intact());
    EXPECT_TRUE(c.tensors.value.same_bytes(before.value));
    EXPECT_TRUE(c.tensors.locations.same_bytes(before.locations));
    EXPECT_TRUE(c.tensors.weights.same_bytes(before.weights));
    EXPECT_TRUE(c.tensors.grad_output.same_bytes(before.grad_output));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Masks, PartialGradients,
    ::testing::Combine(::testing::Values<std::size_t>(0, 1, 2, 4), ::testing::Range(0, 8)),
    [](const ::testing::TestParamInfo<PartialGradients::ParamType>& info) {
      return dtype_label(dtype_mixes()[std::get<0>(info.param)]) + "_mask" +
             std::to_string(std::get<1>(info.param));
    });

// ---- Backend::automatic and explicit thread counts give the same answers ----

TEST(CpuVsReferenceMisc, AutomaticBackendAndThreadCountsMatchTheTruth) {
  for (std::size_t i = 0; i < dtype_mixes().size(); ++i) {
    const DTypes& d = dtype_mixes()[i];
    const Case c = make_case(shape(2, 3, 8, 40, 3, {{7, 9}, {4, 4}}), d, Locations::wide,
                             case_seed(i));
    SCOPED_TRACE(c.label);
    const Results truth = truth_of(c);
    for (int threads : {0, 1, 3}) {
      for (Backend backend : {Backend::automatic, Backend::cpu}) {
        Results got(c.problem);
        run_all(c.problem, c.tensors, got, {threads, backend});
        expect_matches(got, truth, true,
                       (std::string(msda::name(backend)) + " threads=" + std::to_string(threads))
                           .c_str());
      }
    }
  }
}

// An off-map corner adds nothing to grad_value, not even 0 * grad_output: with infinite
// grad_output entries, a kernel that added off-map corners' zero-weight terms to some real row (a
// misplaced spare row of the branch-free scatter, say) would make it NaN where the truth is
// finite. Every element must be non-finite exactly where the truth's is, and the finite ones close
// to it: for every instruction set and every way of summing rows (copy, in place, owner-computes),
// at compile-time and runtime D.
TEST(CpuVsReferenceMisc, OffMapCornersAddNothingEvenWithInfiniteGradOutput) {
  using Scatter = msda::CpuTuning::Scatter;
  const double inf = std::numeric_limits<double>::infinity();
  std::uint64_t index = 0;
  for (std::int64_t d : {32, 5})
    for (Locations kind : {Locations::borders, Locations::edges, Locations::wide, Locations::nonfinite})
      for (const DTypes& mix : {DTypes{msda::DType::f32, msda::DType::f32, msda::DType::f32},
                                DTypes{msda::DType::bf16, msda::DType::f32, msda::DType::f32},
                                DTypes{msda::DType::f64, msda::DType::f64, msda::DType::f64}}) {
        Case c = make_case(shape(1, 2, d, 30, 4, {{6, 9}, {3, 4}}), mix, kind, case_seed(index++));
        for (std::int64_t e = 0; e < c.tensors.grad_output.size(); e += 7)
          c.tensors.grad_output.set(e, e % 2 ? inf : -inf);
        SCOPED_TRACE(c.label + ", every 7th grad_output element infinite");
        const std::vector<double> truth = truth_of(c).grad_value.to_double();
        std::int64_t finite = 0;
        for (double x : truth) finite += std::isfinite(x);
        ASSERT_GT(finite, 0);
        ASSERT_LT(finite, static_cast<std::int64_t>(truth.size())) << "no infinite gradient reached grad_value";
        // 8 threads with parts of one level: more threads than parts, so grad_value is summed in a
        // pass of its own (cpu.cpp), without the dot products.
        for (msda::Isa isa : cpu_isas())
          for (int threads : {0, 8})
            for (auto [how, way] : {std::pair{Scatter::automatic, "automatic"}, std::pair{Scatter::copy, "copy"},
                                    std::pair{Scatter::in_place, "in_place"}, std::pair{Scatter::owner, "owner"}}) {
              SCOPED_TRACE("isa " + std::string(msda::name(isa)) + ", " + std::to_string(threads) + " threads, scatter " + way);
              msda::Options options{threads, Backend::cpu, isa};
              options.tuning.level_parts = threads > 0;
              options.tuning.scatter = how;
              Results got(c.problem);
              run_all(c.problem, c.tensors, got, options);
              const std::vector<double> g = got.grad_value.to_double();
              std::vector<double> got_finite, truth_finite;
              std::int64_t mismatched = 0;
              for (std::size_t i = 0; i < truth.size(); ++i) {
                if (std::isfinite(g[i]) != std::isfinite(truth[i])) ++mismatched;
                if (std::isfinite(g[i]) && std::isfinite(truth[i])) got_finite.push_back(g[i]), truth_finite.push_back(truth[i]);
              }
              EXPECT_EQ(mismatched, 0) << "grad_value elements finite in one and not the other";
              EXPECT_TRUE(close(got_finite, truth_finite, tolerance(mix.value))) << "grad_value's finite elements";
            }
      }
}

// Subnormal values (f32: below 1.2e-38; f16: below 6.1e-5) are numbers like any other: a kernel
// that flushes them to zero (FTZ/DAZ, fast-math) loses whole outputs.
TEST(CpuVsReferenceMisc, SubnormalValues) {
  const std::pair<msda::DType, double> cases[] = {
      {msda::DType::f32, 1e-38}, {msda::DType::f16, 6e-5}, {msda::DType::f64, 1e-310}};
  std::uint64_t index = 0;
  for (const auto& [dtype, scale] : cases) {
    for (msda::DType location : {dtype, msda::DType::f32}) {
      Case c = make_case(shape(1, 2, 17, 30, 3, {{6, 7}, {3, 3}}), {dtype, location, location},
                         Locations::wide, case_seed(index++), Weights::uniform);
      std::int64_t subnormal = 0;
      const double smallest_normal = dtype == msda::DType::f32   ? 0x1p-126
                                     : dtype == msda::DType::f16 ? 0x1p-14
                                                                 : 0x1p-1022;
      for (std::int64_t i = 0; i < c.tensors.value.size(); ++i) {
        c.tensors.value.set(i, c.tensors.value.get(i) * scale);
        const double v = std::fabs(c.tensors.value.get(i));
        subnormal += v > 0 && v < smallest_normal;
      }
      ASSERT_GT(subnormal, c.tensors.value.size() / 4)
          << "the test could not store subnormal values: is denormals-are-zero set?";
      std::ostringstream os;
      os << " values scaled by " << scale;
      c.label += os.str();
      check_case(c, true);
    }
  }
}

#if defined(__SSE__) || defined(__aarch64__)
#if defined(__SSE__)
// MXCSR: rounding mode, flush-to-zero, denormals-are-zero and exception masks; the exception flags
// (bits 0-5) may change, not the modes.
unsigned control_word() { return _mm_getcsr() & ~0x3Fu; }
void set_control_word(unsigned word) { _mm_setcsr(word); }
unsigned saved_control_word() { return _mm_getcsr(); }
constexpr unsigned kDefaultControlWord = 0x1F80;  // all exceptions masked, round to nearest, no FTZ/DAZ
#else
// FPCR: rounding mode, flush-to-zero (FZ, FZ16), default NaN, trap enables; AArch64 keeps the
// exception flags apart, in FPSR.
unsigned control_word() { return __builtin_aarch64_get_fpcr(); }
void set_control_word(unsigned word) { __builtin_aarch64_set_fpcr(word); }
unsigned saved_control_word() { return __builtin_aarch64_get_fpcr(); }
constexpr unsigned kDefaultControlWord = 0;  // Linux's: round to nearest, no flushing, no traps
#endif

// The library must leave the caller's floating-point control word as it found it.
TEST(CpuVsReferenceMisc, FloatingPointControlWordUnchanged) {
  const unsigned saved = saved_control_word();
  set_control_word(kDefaultControlWord);
  const unsigned before = control_word();
  struct Restore {
    unsigned word;
    ~Restore() { set_control_word(word); }
  } restore{saved};
  for (const DTypes& d : dtype_mixes()) {
    const Case c = make_case(shape(1, 2, 32, 20, 2, {{5, 6}}), d, Locations::wide, case_seed(0));
    for (msda::Isa isa : cpu_isas()) {
      Results r(c.problem);
      run_all(c.problem, c.tensors, r, {0, Backend::cpu, isa});
      ASSERT_EQ(control_word(), before) << c.label << " isa " << msda::name(isa);
    }
    Results r(c.problem);
    run_all(c.problem, c.tensors, r, {0, Backend::reference});
    ASSERT_EQ(control_word(), before) << c.label << " reference";
  }
}
#endif

// `best` is the widest instruction set this machine supports (the last of supported_isas()): the
// same bits, on every dtype mix, for the forward and all three gradients.
TEST(CpuVsReferenceMisc, BestIsTheWidestSupportedInstructionSet) {
  const msda::Isa widest = supported_isas().back();
  ASSERT_NE(widest, msda::Isa::best);
  for (const DTypes& d : dtype_mixes()) {
    const Case c = make_case(shape(1, 2, 32, 20, 3, {{5, 6}, {3, 2}}), d, Locations::mixed, case_seed(0));
    SCOPED_TRACE(c.label + ", widest " + std::string(msda::name(widest)));
    Results best(c.problem), named(c.problem);
    run_all(c.problem, c.tensors, best, {0, Backend::cpu, msda::Isa::best});
    run_all(c.problem, c.tensors, named, {0, Backend::cpu, widest});
    EXPECT_TRUE(best.output.same_bytes(named.output));
    EXPECT_TRUE(best.grad_value.same_bytes(named.grad_value));
    EXPECT_TRUE(best.grad_locations.same_bytes(named.grad_locations));
    EXPECT_TRUE(best.grad_weights.same_bytes(named.grad_weights));
  }
}

// The truth really does see the difference between a right and a wrong answer: perturbing one
// element of the cpu output by a relative 1e-3 (f32) must fail the f32 bound.
TEST(CpuVsReferenceMisc, ComparisonCatchesASmallError) {
  const Case c = make_case(shape(1, 2, 8, 30, 3, {{6, 6}}),
                           {msda::DType::f32, msda::DType::f32, msda::DType::f32},
                           Locations::unit, case_seed(0));
  SCOPED_TRACE(c.label);
  const Results truth = truth_of(c);
  Results got(c.problem);
  run_all(c.problem, c.tensors, got, {0, Backend::cpu});
  ASSERT_TRUE(close(got.output.to_double(), truth.output.to_double(), 1e-5));
  std::vector<double> out = got.output.to_double();
  double norm = 0;
  for (double v : out) norm += v * v;
  out[7] += 1e-3 * std::sqrt(norm);
  EXPECT_FALSE(close(out, truth.output.to_double(), 1e-5));
  out[7] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(close(out, truth.output.to_double(), 1e300));
}

}  // namespace
}  // namespace msda_test
