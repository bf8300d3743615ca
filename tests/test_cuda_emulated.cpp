// The cuda backend's kernels and host side (src/cuda/backend.inl), run on the CPU over the
// emulated runtime of tests/cuda_emulation/ (every warp's 32 lanes in lockstep, shuffles checked
// for divergence, fresh workspace full of NaN bytes, CUB's sort replaced by a stable sort that
// leaves its result in the other buffer as CUB's does), against the reference backend in double.
// This is what a machine without a GPU can say about the kernels; tests/cuda/ runs the same
// questions on a GPU. The plain op and the fused op both, with equal points and points per level,
// bilinear and discrete sampling (SPEC "Points per level and discrete sampling").
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emulation/emulated_backend.h"
#include "cuda_emulation/runtime.h"
#include "test_support.h"

namespace {

using namespace msda_test;
namespace emulated = msda::cuda_emulation;

struct Run {
  bool deterministic = true;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

msda::Params with_inputs(const msda::Problem& pr, const Tensors& t, const Run& how) {
  msda::Params p = emulated::params_for(pr);
  p.value = t.value.data();
  p.locations = t.locations.data();
  p.weights = t.weights.data();
  p.cuda.deterministic = how.deterministic;
  p.cuda.workspace = how.workspace;
  p.cuda.workspace_bytes = how.workspace_bytes;
  return p;
}

void run_emulated(const msda::Problem& pr, const Tensors& t, Results& r, const Run& how = {}) {
  r.poison();
  msda::Params forward = with_inputs(pr, t, how);
  forward.output = r.output.data();
  emulated::forward(forward);
  msda::Params backward = with_inputs(pr, t, how);
  backward.grad_output = t.grad_output.data();
  backward.grad_value = r.grad_value.data();
  backward.grad_locations = r.grad_locations.data();
  backward.grad_weights = r.grad_weights.data();
  emulated::backward(backward);
}

Results truth_of(const Case& c) {
  const msda::Problem f64 = as_f64(c.problem);
  Results truth(f64);
  msda::Options reference;
  reference.backend = msda::Backend::reference;
  run_all(f64, c.tensors.converted(DType::f64, DType::f64, DType::f64), truth, reference);
  return truth;
}

// close(), for results that may hold NaN or inf where the reference does too (an infinite value
// or grad_output): the same elements non-finite, each the same kind (NaN, +inf or -inf), and the
// finite rest within `tol`.
::testing::AssertionResult matches(const std::vector<double>& actual, const std::vector<double>& expected,
                                   double tol) {
  if (actual.size() != expected.size()) return close(actual, expected, tol);
  std::vector<double> finite_actual, finite_expected;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    if (std::isfinite(e) && std::isfinite(a)) {
      finite_actual.push_back(a);
      finite_expected.push_back(e);
    } else if (!(std::isnan(a) && std::isnan(e)) && a != e) {
      return ::testing::AssertionFailure() << "element " << i << ": " << a << ", the reference's " << e;
    }
  }
  return close(finite_actual, finite_expected, tol);
}

void expect_matches_reference(const Case& c, const Results& got) {
  const Results truth = truth_of(c);
  // Each result to the bound of its own dtype (an f32 gradient of an f64 problem to f32's).
  for (auto [member, name] : {std::pair{&Results::output, "output"}, std::pair{&Results::grad_value, "grad_value"},
                              std::pair{&Results::grad_locations, "grad_locations"},
                              std::pair{&Results::grad_weights, "grad_weights"}}) {
    const Buffer& g = got.*member;
    EXPECT_TRUE(matches(g.to_double(), (truth.*member).to_double(), tolerance(g.dtype()))) << name;
  }
  EXPECT_TRUE(got.guards_intact()) << "a result was written outside its buffer";
}

// The points-per-level layouts of the workloads: D-FINE's [3, 6, 3], and one with a level of a
// single point and unequal neighbours.
struct PointsPerLevel {
  std::vector<std::int64_t> points;
  std::vector<msda::Level> levels;  // power-of-two maps: boundaries are exact in f32
};
const std::vector<PointsPerLevel>& points_per_level() {
  static const std::vector<PointsPerLevel> all = {
      {{3, 6, 3}, {{8, 4}, {4, 2}, {2, 2}}},
      {{1, 4, 2, 3}, {{4, 8}, {2, 4}, {1, 2}, {1, 1}}},
  };
  return all;
}

const char* name(msda::Sampling sampling) { return sampling == msda::Sampling::discrete ? "discrete" : "bilinear"; }

class CudaEmulated : public ::testing::Test {
 protected:
  void SetUp() override { msda_emulator::reset_faults(); }
  void TearDown() override { EXPECT_EQ(msda_emulator::faults(), 0) << "a warp shuffle some lanes did not reach"; }
};

TEST_F(CudaEmulated, EveryDtypeMixMatchesTheReference) {
  std::uint64_t index = 0;
  for (const DTypes& mix : dtype_mixes())
    for (Locations kind : {Locations::mixed, Locations::cluster, Locations::centres}) {
      const Case c = make_case({2, 3, 32, 9, 4, {{8, 4}, {4, 2}, {1, 2}}}, mix, kind, case_seed(index++));
      SCOPED_TRACE(c.label);
      Results got(c.problem);
      run_emulated(c.problem, c.tensors, got);
      expect_matches_reference(c, got);
    }
}

// Points per level and both samplings, every dtype mix, the deterministic and the atomic
// grad_value: unequal P_l moves every sample's index, level and softmax position.
TEST_F(CudaEmulated, PointsPerLevelAndDiscreteSamplingMatchTheReference) {
  std::uint64_t index = 0;
  for (const PointsPerLevel& layout : points_per_level())
    for (msda::Sampling sampling : {msda::Sampling::bilinear, msda::Sampling::discrete})
      for (const DTypes& mix : dtype_mixes()) {
        const Case c = make_case(with_v2({2, 3, 8, 5, 1, layout.levels}, layout.points, sampling), mix,
                                 Locations::mixed, case_seed(index++));
        SCOPED_TRACE(c.label);
        for (bool deterministic : {true, false}) {
          SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
          Results got(c.problem);
          run_emulated(c.problem, c.tensors, got, {.deterministic = deterministic});
          expect_matches_reference(c, got);
        }
      }
}

// Discrete sampling where the pixel choice is delicate: t = x*W + 0.5 a whole number (centres and
// edges on power-of-two maps), x in {0, 1} (borders: 1 clamps to the last pixel), far outside
// (clamped to the edge), NaN and +-inf (nothing; the edge). Channel counts around the lane groups.
TEST_F(CudaEmulated, DiscretePixelsAtBoundariesAndNonFiniteLocations) {
  std::uint64_t index = 0;
  const DTypes mixes[] = {{DType::f32, DType::f32, DType::f32},
                          {DType::f64, DType::f64, DType::f64},
                          {DType::bf16, DType::f32, DType::f32},
                          {DType::f16, DType::f16, DType::f16}};
  for (Locations kind : {Locations::centres, Locations::edges, Locations::borders, Locations::nonfinite,
                         Locations::wide, Locations::cluster})
    for (const DTypes& mix : mixes)
      for (std::int64_t d : {1, 33}) {
        const Case c = make_case(with_v2({1, 2, d, 6, 1, {{8, 4}, {2, 2}, {1, 4}}}, {3, 6, 3}, msda::Sampling::discrete),
                                 mix, kind, case_seed(index++));
        SCOPED_TRACE(c.label);
        for (bool deterministic : {true, false}) {
          SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
          Results got(c.problem);
          run_emulated(c.problem, c.tensors, got, {.deterministic = deterministic});
          expect_matches_reference(c, got);
        }
      }
}

// The pixel each discrete sample of a plain case reads: (n, row of value), SPEC's formula.
std::set<std::pair<std::int64_t, std::int64_t>> discrete_pixels_read(const Case& c) {
  const msda::Problem& p = c.problem;
  const std::int64_t K = p.total_points();
  std::set<std::pair<std::int64_t, std::int64_t>> read;
  for (std::int64_t i = 0; i < weight_size(p); ++i) {
    std::int64_t k = i % K, l = 0;
    while (k >= p.points_of(l)) k -= p.points_of(l++);
    const msda::Level& level = p.levels[static_cast<std::size_t>(l)];
    const double x = c.tensors.locations.get(2 * i), y = c.tensors.locations.get(2 * i + 1);
    if (std::isnan(x) || std::isnan(y)) continue;
    auto pixel = [](double t, std::int64_t size) {
      const double i = std::trunc(t);
      return static_cast<std::int64_t>(std::min(std::max(i, 0.0), static_cast<double>(size - 1)));
    };
    const std::int64_t h = pixel(y * double(level.height) + 0.5, level.height);
    const std::int64_t w = pixel(x * double(level.width) + 0.5, level.width);
    read.insert({i / K / p.queries / p.heads, p.level_start_index[static_cast<std::size_t>(l)] + h * level.width + w});
  }
  return read;
}

// A discrete sample reads its pixel and nothing else: with every pixel no sample reads set to
// +inf, the output and gradients stay finite (a bilinear form with zero weights would give
// 0 * inf = NaN). Then an infinite grad_output: the pixels its samples read get inf or NaN in
// grad_value, as in the reference, and their neighbours nothing.
TEST_F(CudaEmulated, DiscreteSamplesNeverTouchTheirNeighbours) {
  std::uint64_t index = 0;
  for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::bf16, DType::f32, DType::f32},
                            DTypes{DType::f64, DType::f64, DType::f64}})
    for (Locations kind : {Locations::centres, Locations::unit, Locations::mixed}) {
      Case c = make_case(with_v2({2, 2, 5, 3, 1, {{8, 8}, {4, 4}}}, {3, 2}, msda::Sampling::discrete), mix, kind,
                         case_seed(index++));
      SCOPED_TRACE(c.label);
      const auto read = discrete_pixels_read(c);
      const msda::Problem& p = c.problem;
      const double inf = std::numeric_limits<double>::infinity();
      std::int64_t unread = 0;
      for (std::int64_t n = 0; n < p.batch; ++n)
        for (std::int64_t row = 0; row < p.value_len; ++row) {
          if (read.count({n, row})) continue;
          ++unread;
          for (std::int64_t e = 0; e < p.heads * p.channels; ++e)
            c.tensors.value.set((n * p.value_len + row) * p.heads * p.channels + e, inf);
        }
      ASSERT_GT(unread, 0);
      for (bool deterministic : {true, false}) {
        SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
        Results got(c.problem);
        run_emulated(c.problem, c.tensors, got, {.deterministic = deterministic});
        for (const Buffer* b : {&got.output, &got.grad_value, &got.grad_locations, &got.grad_weights})
          for (double x : b->to_double()) ASSERT_TRUE(std::isfinite(x));
        expect_matches_reference(c, got);

        Case infinite_grad = c;
        for (std::int64_t i = 0; i < infinite_grad.tensors.grad_output.size(); i += 7)
          infinite_grad.tensors.grad_output.set(i, i % 2 ? inf : -inf);
        Results with_inf(c.problem);
        run_emulated(c.problem, infinite_grad.tensors, with_inf, {.deterministic = deterministic});
        expect_matches_reference(infinite_grad, with_inf);
      }
    }
}

// Equal points given per level ([P] * L) are the plain [L, P] problem: the same bits.
TEST_F(CudaEmulated, EqualPointsPerLevelIsThePlainLayout) {
  for (msda::Sampling sampling : {msda::Sampling::bilinear, msda::Sampling::discrete}) {
    const Case c = make_case(with_v2({2, 2, 8, 5, 3, {{4, 4}, {2, 2}}}, {}, sampling), {}, Locations::mixed,
                             case_seed(0));
    SCOPED_TRACE(c.label);
    msda::Problem per_level = c.problem;
    per_level.level_points = {3, 3};
    Results plain(c.problem), listed(per_level);
    run_emulated(c.problem, c.tensors, plain);
    run_emulated(per_level, c.tensors, listed);
    for (auto member : {&Results::output, &Results::grad_value, &Results::grad_locations, &Results::grad_weights})
      EXPECT_TRUE((plain.*member).same_bytes(listed.*member));
  }
}

TEST_F(CudaEmulated, ChannelCountsAroundTheLaneGroups) {
  // D = 1 and 3: groups of 1 and 4 lanes, several heads per warp; 33: lanes with one or two
  // channels; 130: two passes of 32 lanes x 4 channels.
  std::uint64_t index = 0;
  for (std::int64_t d : {1, 3, 33, 130})
    for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::bf16, DType::f32, DType::f32}}) {
      const Case c = make_case({1, 3, d, 5, 2, {{3, 5}, {2, 2}}}, mix, Locations::mixed, case_seed(index++));
      SCOPED_TRACE(c.label);
      Results got(c.problem);
      run_emulated(c.problem, c.tensors, got);
      expect_matches_reference(c, got);
    }
}

TEST_F(CudaEmulated, ManyLevelsAndPoints) {
  std::vector<msda::Level> levels;
  for (int l = 0; l < 9; ++l) levels.push_back({1 + l % 3, 2 + l % 4});
  const Case c = make_case({1, 2, 8, 3, 9, levels}, {}, Locations::wide, case_seed(0));
  Results got(c.problem);
  run_emulated(c.problem, c.tensors, got);
  expect_matches_reference(c, got);
}

TEST_F(CudaEmulated, DeterministicBackwardRepeatsItsBitsAndAtomicsAgree) {
  const Shape shapes[] = {{2, 2, 16, 40, 4, {{3, 3}, {2, 2}}},
                          with_v2({2, 2, 16, 40, 1, {{3, 3}, {2, 2}}}, {6, 2}),
                          with_v2({2, 2, 16, 40, 1, {{3, 3}, {2, 2}}}, {2, 5}, msda::Sampling::discrete)};
  for (std::uint64_t index = 0; index < std::size(shapes); ++index) {
    for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::f16, DType::f32, DType::f32}}) {
      const Case c = make_case(shapes[index], mix, Locations::cluster, case_seed(index));
      SCOPED_TRACE(c.label);
      Results first(c.problem), again(c.problem), atomic(c.problem);
      run_emulated(c.problem, c.tensors, first);
      run_emulated(c.problem, c.tensors, again);
      for (auto member : {&Results::output, &Results::grad_value, &Results::grad_locations, &Results::grad_weights})
        EXPECT_TRUE((first.*member).same_bytes(again.*member));
      run_emulated(c.problem, c.tensors, atomic, {.deterministic = false});
      expect_matches_reference(c, atomic);
    }
  }
}

TEST_F(CudaEmulated, OnlyTheRequestedGradients) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  const Results truth = truth_of(c);
  Results got(c.problem);
  got.poison();
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  p.grad_output = c.tensors.grad_output.data();
  p.grad_weights = got.grad_weights.data();  // weights only: no grad_value pipeline at all
  emulated::backward(p);
  EXPECT_TRUE(close(got.grad_weights.to_double(), truth.grad_weights.to_double(), 1e-5));
  for (double x : got.grad_value.to_double()) EXPECT_TRUE(std::isnan(x));  // untouched
  p.grad_weights = nullptr;
  p.grad_value = got.grad_value.data();  // grad_value only
  emulated::backward(p);
  EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(), 1e-5));
}

TEST_F(CudaEmulated, WorkspaceFollowsTheWantedGradients) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  char wanted;
  p.grad_weights = &wanted;
  const std::size_t samples_only = emulated::workspace_size(p, true);
  p.grad_value = &wanted;
  const std::size_t with_value = emulated::workspace_size(p, true);
  p.cuda.deterministic = false;  // f32 atomics add into grad_value itself
  const std::size_t atomic = emulated::workspace_size(p, true);
  EXPECT_EQ(samples_only, 256u);  // the level table alone
  EXPECT_EQ(atomic, 256u);
  EXPECT_GT(with_value, samples_only + 12u * 2 * 6 * 2 * 4);  // places, keys and ids of 24 samples
}

TEST_F(CudaEmulated, CallersWorkspaceIsCheckedBeforeUse) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  Results got(c.problem);
  p.grad_output = c.tensors.grad_output.data();
  p.grad_value = got.grad_value.data();
  const std::size_t bytes = emulated::workspace_size(p, true);
  std::vector<std::uint64_t> storage(bytes / 8 + 64);
  auto* aligned = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 255) / 256 * 256);
  for (const auto& [pointer, size, what] :
       {std::tuple{aligned + 8, bytes, "options.cuda.workspace"}, std::tuple{aligned, bytes - 1, "options.cuda.workspace_bytes"}}) {
    p.cuda.workspace = pointer;
    p.cuda.workspace_bytes = size;
    try {
      emulated::backward(p);
      ADD_FAILURE() << "expected an Error naming " << what;
    } catch (const msda::Error& e) {
      EXPECT_EQ(e.argument(), what);
    }
  }
  p.cuda.workspace = aligned;
  p.cuda.workspace_bytes = bytes;
  emulated::backward(p);
  const Results truth = truth_of(c);
  EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(), 1e-5));
}


// ---- the fused op: points per level, offset_scale and discrete sampling ----

struct FusedDTypes {
  DType value = DType::f32, reference = DType::f32, offset = DType::f32, logit = DType::f32;
};

// How reference points, offsets and logits are drawn.
enum class Draw {
  local,       // offsets of a few pixels (2 coordinates) or within the box (4): mostly in range
  nonfinite,   // local, with NaN, +-inf and huge offsets, -inf logits and (4 coordinates) infinite box sizes
  boundaries,  // 2 coordinates: reference points at pixel centres and whole-pixel offsets, so x*W - 0.5
               // (bilinear) and x*W + 0.5 (discrete) are whole numbers on power-of-two maps
};

const char* name(Draw d) {
  switch (d) {
    case Draw::local: return "local";
    case Draw::nonfinite: return "nonfinite";
    case Draw::boundaries: return "boundaries";
  }
  return "?";
}

struct FusedCase {
  msda::Problem problem;
  Buffer value, reference, offsets, logits, grad_output;
  std::string label;
  msda::FusedInputs inputs() const { return {value.data(), reference.data(), offsets.data(), logits.data()}; }
};

std::int64_t reference_size(const msda::Problem& p) {
  return p.batch * p.queries * p.num_levels() * p.reference_coords;
}

FusedCase make_fused_case(const Shape& shape, std::int64_t coords, double offset_scale, const FusedDTypes& d,
                          Draw draw, std::uint64_t seed) {
  FusedCase c;
  c.problem = make_problem(shape, {d.value, d.offset, d.logit});
  c.problem.reference_coords = coords;
  c.problem.reference_dtype = d.reference;
  c.problem.offset_scale = offset_scale;
  const msda::Problem& p = c.problem;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0), sym(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double inf = std::numeric_limits<double>::infinity();
  const std::int64_t L = p.num_levels(), K = p.total_points();
  const bool nonfinite = draw == Draw::nonfinite;
  auto special = [&] {
    const double values[] = {std::numeric_limits<double>::quiet_NaN(), inf, -inf, 1e30, -1e30};
    return values[std::uniform_int_distribution<int>(0, 4)(rng)];
  };
  auto pixel_centre = [&](std::int64_t size) {
    return (static_cast<double>(std::uniform_int_distribution<std::int64_t>(0, size - 1)(rng)) + 0.5) /
           static_cast<double>(size);
  };

  c.value = Buffer(d.value, value_size(p));
  for (std::int64_t i = 0; i < c.value.size(); ++i) c.value.set(i, sym(rng));

  c.reference = Buffer(d.reference, reference_size(p));
  for (std::int64_t i = 0; i < c.reference.size(); i += coords) {
    const msda::Level& level = p.levels[static_cast<std::size_t>(i / coords % L)];
    c.reference.set(i, draw == Draw::boundaries ? pixel_centre(level.width) : unit(rng));
    c.reference.set(i + 1, draw == Draw::boundaries ? pixel_centre(level.height) : unit(rng));
    if (coords == 4) {
      c.reference.set(i + 2, 0.05 + 0.6 * unit(rng));
      c.reference.set(i + 3, 0.05 + 0.6 * unit(rng));
      if (nonfinite && unit(rng) < 0.05) c.reference.set(i + 2 + (unit(rng) < 0.5), inf);
    }
  }

  c.offsets = Buffer(d.offset, location_size(p));
  std::int64_t sample = 0;
  for (std::int64_t head = 0; head < p.batch * p.queries * p.heads; ++head)
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t pt = 0; pt < p.points_of(l); ++pt, ++sample)
        for (std::int64_t k = 0; k < 2; ++k) {
          double o;
          if (draw == Draw::boundaries)
            o = static_cast<double>(std::uniform_int_distribution<int>(-3, 3)(rng));
          else if (coords == 2)  // pixels of the level
            o = 4.0 * sym(rng);
          else  // loc = centre + o / P_l * size * offset_scale: about the box, whatever P_l
            o = 1.2 * static_cast<double>(p.points_of(l)) * sym(rng);
          if (nonfinite && unit(rng) < 0.1) o = special();
          c.offsets.set(2 * sample + k, o);
        }

  c.logits = Buffer(d.logit, weight_size(p));
  for (std::int64_t i = 0; i < c.logits.size(); ++i) {
    // Every row (one softmax over K) keeps its first logit finite: a row of -inf is a row of NaN.
    const bool row_start = i % K == 0;
    c.logits.set(i, nonfinite && !row_start && unit(rng) < 0.15 ? -inf : 1.5 * normal(rng));
  }

  c.grad_output = Buffer(d.value, output_size(p));
  for (std::int64_t i = 0; i < c.grad_output.size(); ++i) c.grad_output.set(i, sym(rng));

  std::ostringstream os;
  os << "seed=" << seed << " " << describe(p) << " coords=" << coords << " offset_scale=" << offset_scale
     << " reference_dtype=" << msda::name(d.reference) << " draw=" << name(draw);
  c.label = os.str();
  return c;
}

struct FusedResults {
  Buffer output, grad_value, grad_reference, grad_offsets, grad_logits;
  explicit FusedResults(const msda::Problem& p)
      : output(p.value_dtype, output_size(p)),
        grad_value(p.value_dtype, value_size(p)),
        grad_reference(p.reference_dtype, reference_size(p)),
        grad_offsets(p.location_dtype, location_size(p)),
        grad_logits(p.weight_dtype, weight_size(p)) {}
  std::vector<const Buffer*> all() const { return {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits}; }
  void poison() {
    for (Buffer* b : {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits}) b->poison();
  }
};

const char* const kFusedResultNames[] = {"output", "grad_value", "grad_reference_points", "grad_sampling_offsets",
                                         "grad_attention_logits"};

FusedResults fused_truth_of(const FusedCase& c) {
  msda::Problem p = c.problem;
  p.value_dtype = p.reference_dtype = p.location_dtype = p.weight_dtype = DType::f64;
  const Buffer value = c.value.converted(DType::f64), reference = c.reference.converted(DType::f64),
               offsets = c.offsets.converted(DType::f64), logits = c.logits.converted(DType::f64),
               grad_output = c.grad_output.converted(DType::f64);
  const msda::FusedInputs inputs{value.data(), reference.data(), offsets.data(), logits.data()};
  FusedResults truth(p);
  truth.poison();
  msda::Options reference_backend;
  reference_backend.backend = msda::Backend::reference;
  msda::forward_fused(p, inputs, truth.output.data(), reference_backend);
  msda::backward_fused(p, inputs, grad_output.data(),
                       {truth.grad_value.data(), truth.grad_reference.data(), truth.grad_offsets.data(),
                        truth.grad_logits.data()},
                       reference_backend);
  return truth;
}

void run_fused_emulated(const FusedCase& c, FusedResults& r, bool deterministic) {
  r.poison();
  msda::Params p = emulated::params_for(c.problem);
  p.fused = true;
  p.cuda.deterministic = deterministic;
  p.value = c.value.data();
  p.reference_points = c.reference.data();
  p.locations = c.offsets.data();
  p.weights = c.logits.data();
  msda::Params forward = p;
  forward.output = r.output.data();
  emulated::forward(forward);
  p.grad_output = c.grad_output.data();
  p.grad_value = r.grad_value.data();
  p.grad_reference_points = r.grad_reference.data();
  p.grad_offsets = r.grad_offsets.data();
  p.grad_logits = r.grad_logits.data();
  emulated::backward(p);
}

void expect_fused_matches_reference(const FusedCase& c, const FusedResults& got) {
  const FusedResults truth = fused_truth_of(c);
  const auto g = got.all(), t = truth.all();
  for (std::size_t k = 0; k < g.size(); ++k)
    EXPECT_TRUE(matches(g[k]->to_double(), t[k]->to_double(), tolerance(g[k]->dtype()))) << kFusedResultNames[k];
  for (const Buffer* b : g) EXPECT_TRUE(b->guards_intact()) << "a result was written outside its buffer";
}

// The fused op with points per level: box offsets scaled by offset_scale / P_l (0.75 here, not
// Deformable DETR's 0.5), the softmax over each head's K logits, both samplings (discrete:
// gradients of value and logits only, zeros for offsets and reference points), 2 and 4
// coordinates, the deterministic and the atomic grad_value.
TEST_F(CudaEmulated, FusedPointsPerLevelOffsetScaleAndDiscreteMatchTheReference) {
  const FusedDTypes mixes[] = {{DType::f32, DType::f32, DType::f32, DType::f32},
                               {DType::f64, DType::f64, DType::f64, DType::f64},
                               {DType::bf16, DType::f32, DType::f32, DType::f32},
                               {DType::f16, DType::f16, DType::f16, DType::f16}};
  std::uint64_t index = 0;
  for (const PointsPerLevel& layout : points_per_level())
    for (msda::Sampling sampling : {msda::Sampling::bilinear, msda::Sampling::discrete})
      for (std::int64_t coords : {2, 4})
        for (Draw draw : {Draw::local, Draw::nonfinite, Draw::boundaries}) {
          if (draw == Draw::boundaries && coords == 4) continue;
          for (const FusedDTypes& mix : mixes) {
            const FusedCase c = make_fused_case(with_v2({2, 2, 8, 4, 1, layout.levels}, layout.points, sampling),
                                                coords, 0.75, mix, draw, case_seed(index++));
            SCOPED_TRACE(c.label);
            for (bool deterministic : {true, false}) {
              SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
              FusedResults got(c.problem);
              run_fused_emulated(c, got, deterministic);
              expect_fused_matches_reference(c, got);
            }
          }
        }
}

// offset_scale is any finite number: a larger, a negative and a zero one (every offset then lands
// on the box centre, and an infinite one on NaN: out of range), equal and unequal points.
TEST_F(CudaEmulated, FusedOffsetScales) {
  std::uint64_t index = 0;
  for (double scale : {1.5, -0.3, 0.0})
    for (const Shape& shape : {Shape{2, 2, 8, 4, 3, {{8, 4}, {4, 2}}}, with_v2({2, 2, 8, 4, 1, {{8, 4}, {4, 2}}}, {1, 4})})
      for (msda::Sampling sampling : {msda::Sampling::bilinear, msda::Sampling::discrete})
        for (const FusedDTypes& mix : {FusedDTypes{}, FusedDTypes{DType::f64, DType::f64, DType::f64, DType::f64}}) {
          Shape s = shape;
          s.sampling = sampling;
          const FusedCase c = make_fused_case(s, 4, scale, mix, Draw::nonfinite, case_seed(index++));
          SCOPED_TRACE(c.label);
          FusedResults got(c.problem);
          run_fused_emulated(c, got, true);
          expect_fused_matches_reference(c, got);
        }
}

}  // namespace
