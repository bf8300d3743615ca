// SPEC "Bad input": every rejected input throws msda::Error naming the argument, the expected and
// the actual value, before any memory is touched; and the legal corner cases (N = 0, Q = 0, huge
// but representable sizes) are accepted.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_support.h"

namespace msda_test {
namespace {

using msda::Backend;
using msda::DType;
using msda::Level;

constexpr std::int64_t kP2_30 = std::int64_t{1} << 30;
constexpr std::int64_t kP2_31 = std::int64_t{1} << 31;
constexpr std::int64_t kP2_32 = std::int64_t{1} << 32;
constexpr std::int64_t kP2_60 = std::int64_t{1} << 60;
constexpr std::int64_t kP2_61 = std::int64_t{1} << 61;
constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

template <class F>
::testing::AssertionResult throws_error_naming(F&& call, const std::vector<std::string>& names) {
  try {
    call();
  } catch (const msda::Error& e) {
    auto join = [&] {
      std::string s;
      for (const auto& n : names) {
        if (!s.empty()) s += ", ";
        s += n;
      }
      return s;
    };
    if (e.argument().empty() || e.expected().empty() || e.actual().empty())
      return ::testing::AssertionFailure()
             << "Error with an empty field: argument '" << e.argument() << "', expected '"
             << e.expected() << "', actual '" << e.actual() << "'";
    if (std::string(e.what()).empty()) return ::testing::AssertionFailure() << "empty what()";
    if (!names.empty() && !names_one_of(e.argument(), names))
      return ::testing::AssertionFailure()
             << "Error names argument '" << e.argument() << "' (expected '" << e.expected()
             << "', actual '" << e.actual() << "'), not one of: " << join();
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a std::exception that is not msda::Error: "
                                         << e.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw something that is not a std::exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// A valid problem: N=2, M=2, D=4, Q=3, P=2, levels (3,4), (2,2).
msda::Problem base_problem(DType value = DType::f32, DType location = DType::f32,
                           DType weight = DType::f32) {
  Shape s;
  s.batch = 2, s.heads = 2, s.channels = 4, s.queries = 3, s.points = 2;
  s.levels = {{3, 4}, {2, 2}};
  return make_problem(s, {value, location, weight});
}

struct BadProblem {
  std::string what;
  msda::Problem problem;
  std::vector<std::string> names;  // empty: any non-empty argument
};

std::vector<BadProblem> bad_problems() {
  std::vector<BadProblem> bad;
  auto add = [&](std::string what, auto mutate, std::vector<std::string> names) {
    msda::Problem p = base_problem();
    mutate(p);
    bad.push_back({std::move(what), p, std::move(names)});
  };
  const std::vector<std::string> level_names = {"spatial_shapes", "levels", "height", "width",
                                                "H", "W"};
  add("no levels", [](msda::Problem& p) { p.levels.clear(), p.level_start_index.clear(), p.value_len = 0; },
      {"spatial_shapes", "levels", "L"});
  add("P = 0", [](msda::Problem& p) { p.points = 0; }, {"points", "P"});
  add("D = 0", [](msda::Problem& p) { p.channels = 0; }, {"channels", "D"});
  add("H = 0", [](msda::Problem& p) { p.levels[1].height = 0, p.value_len = 12; }, level_names);
  add("W = 0", [](msda::Problem& p) { p.levels[1].width = 0, p.value_len = 12; }, level_names);
  add("H < 0", [](msda::Problem& p) { p.levels[1].height = -2, p.value_len = 8; }, level_names);
  add("W < 0", [](msda::Problem& p) { p.levels[1].width = -2, p.value_len = 8; }, level_names);
  add("H < 0 and W < 0 (positive area)",
      [](msda::Problem& p) { p.levels[1].height = -2, p.levels[1].width = -2; }, level_names);
  add("level_start_index wrong", [](msda::Problem& p) { p.level_start_index = {0, 11}; },
      {"level_start_index"});
  add("level_start_index does not start at 0", [](msda::Problem& p) { p.level_start_index = {1, 13}; },
      {"level_start_index"});
  add("level_start_index first entry not 0", [](msda::Problem& p) { p.level_start_index = {1, 12}; },
      {"level_start_index"});
  add("level_start_index of one level not 0", [](msda::Problem& p) {
        p.levels = {{3, 4}}, p.level_start_index = {5}, p.value_len = 12;
      }, {"level_start_index"});
  add("level_start_index too short", [](msda::Problem& p) { p.level_start_index = {0}; },
      {"level_start_index"});
  add("level_start_index too long", [](msda::Problem& p) { p.level_start_index = {0, 12, 16}; },
      {"level_start_index"});
  add("S too small", [](msda::Problem& p) { p.value_len = 15; }, {"value_len", "S", "value"});
  add("S too large", [](msda::Problem& p) { p.value_len = 17; }, {"value_len", "S", "value"});
  add("N < 0", [](msda::Problem& p) { p.batch = -1; }, {"batch", "N"});
  add("Q < 0", [](msda::Problem& p) { p.queries = -1; }, {"queries", "Q"});
  add("M < 0", [](msda::Problem& p) { p.heads = -1; }, {"heads", "M"});
  add("P < 0", [](msda::Problem& p) { p.points = -1; }, {"points", "P"});
  add("D < 0", [](msda::Problem& p) { p.channels = -4; }, {"channels", "D"});
  add("value dtype f32, locations f64", [](msda::Problem& p) { p.location_dtype = DType::f64; },
      {"location"});
  add("value dtype f32, weights bf16", [](msda::Problem& p) { p.weight_dtype = DType::bf16; },
      {"weight"});
  add("value dtype bf16, locations f16",
      [](msda::Problem& p) { p.value_dtype = DType::bf16, p.location_dtype = DType::f16; },
      {"location"});
  // sizes whose element counts or byte sizes overflow 64 bits
  add("H*W overflows", [](msda::Problem& p) {
        p.levels = {{kP2_32, kP2_32}}, p.level_start_index = {0}, p.value_len = kMax;
      }, {});
  add("sum of H*W overflows", [](msda::Problem& p) {
        p.levels = {{kP2_31, kP2_31}, {kP2_31, kP2_31}};
        p.level_start_index = {0, std::int64_t{1} << 62};
        p.value_len = kMax;
      }, {});
  add("value element count overflows", [](msda::Problem& p) {
        p.levels = {{kP2_30, kP2_30}}, p.level_start_index = {0}, p.value_len = kP2_60;
        p.batch = 1, p.heads = 1, p.channels = 16;
      }, {});
  add("value byte size overflows", [](msda::Problem& p) {
        p.levels = {{kP2_30, kP2_30}}, p.level_start_index = {0}, p.value_len = kP2_60;
        p.batch = 1, p.heads = 1, p.channels = 4;
        p.value_dtype = p.location_dtype = p.weight_dtype = DType::f64;  // 2^62 elements, 2^65 bytes
      }, {});
  add("location element count overflows", [](msda::Problem& p) {
        p.batch = 1, p.queries = kP2_61, p.heads = 1, p.points = 1;  // 2^61 * 2 levels * 2
      }, {});
  add("output element count overflows", [](msda::Problem& p) {
        p.batch = 1, p.queries = kP2_32, p.heads = kP2_31, p.channels = kP2_31, p.points = 1;
      }, {});
  add("N * S overflows", [](msda::Problem& p) {
        p.batch = kMax / 8;
      }, {});
  // points per level (the v2 attention)
  add("points per level: one entry for two levels", [](msda::Problem& p) { p.level_points = {3}; }, {"points"});
  add("points per level: three entries for two levels", [](msda::Problem& p) { p.level_points = {3, 1, 2}; },
      {"points"});
  add("points per level: a zero", [](msda::Problem& p) { p.level_points = {3, 0}; }, {"points"});
  add("points per level: a negative", [](msda::Problem& p) { p.level_points = {-1, 2}; }, {"points"});
  add("points per level: a sum that overflows", [](msda::Problem& p) { p.level_points = {kMax, kMax}; },
      {"points"});
  add("points per level: sample counts that overflow", [](msda::Problem& p) {
        p.level_points = {kP2_60, kP2_60};
      }, {});
  add("sampling out of range", [](msda::Problem& p) { p.sampling = static_cast<msda::Sampling>(7); },
      {"sampling"});
  return bad;
}

// Sentinel-filled raw buffers large enough for the base problem in any dtype; a rejected call
// must leave them exactly as they were.
struct Sentinels {
  static constexpr std::size_t kBytes = 1 << 16;
  static constexpr unsigned char kByte = 0x5A;
  std::vector<double> inputs = std::vector<double>(kBytes / 8, 0.25);
  std::vector<unsigned char> output = std::vector<unsigned char>(kBytes, kByte);
  std::vector<unsigned char> grad_value = output, grad_locations = output, grad_weights = output;
  std::vector<double> grad_output = std::vector<double>(kBytes / 8, 0.5);
  msda::Inputs in() const { return {inputs.data(), inputs.data(), inputs.data()}; }
  msda::Gradients grads() {
    return {grad_value.data(), grad_locations.data(), grad_weights.data()};
  }
  bool untouched() const {
    for (const auto* b : {&output, &grad_value, &grad_locations, &grad_weights})
      for (unsigned char c : *b)
        if (c != kByte) return false;
    return true;
  }
};

TEST(Validation, BaseProblemIsValid) {
  EXPECT_NO_THROW(msda::validate(base_problem()));
  Sentinels s;
  EXPECT_NO_THROW(msda::forward(base_problem(), s.in(), s.output.data(), {1, Backend::cpu}));
  EXPECT_FALSE(s.untouched()) << "the valid base problem wrote no output";
}

TEST(Validation, BadProblemsThrowAndTouchNothing) {
  for (const BadProblem& b : bad_problems()) {
    SCOPED_TRACE(b.what + ": " + describe(b.problem));
    EXPECT_TRUE(throws_error_naming([&] { msda::validate(b.problem); }, b.names)) << "validate";
    bool rejected = false;
    try {
      msda::validate(b.problem);
    } catch (...) {
      rejected = true;
    }
    // A problem that validate accepts would be run for real on buffers sized for the base
    // problem: the failure above says enough.
    if (!rejected) continue;
    for (Backend backend : {Backend::automatic, Backend::cpu, Backend::reference}) {
      SCOPED_TRACE(std::string("backend ") + std::string(msda::name(backend)));
      Sentinels s;
      EXPECT_TRUE(throws_error_naming(
          [&] { msda::forward(b.problem, s.in(), s.output.data(), {1, backend}); }, b.names))
          << "forward";
      EXPECT_TRUE(throws_error_naming(
          [&] {
            msda::backward(b.problem, s.in(), s.grad_output.data(), s.grads(), {1, backend});
          },
          b.names))
          << "backward";
      EXPECT_TRUE(s.untouched()) << "a rejected call wrote to an output or gradient";
    }
  }
}

// Null pointers for tensors that have elements are bad input too: an Error, never a crash.
TEST(Validation, NullPointersForNonEmptyTensors) {
  const msda::Problem p = base_problem();
  for (Backend backend : {Backend::cpu, Backend::reference}) {
    SCOPED_TRACE(std::string("backend ") + std::string(msda::name(backend)));
    Sentinels s;
    msda::Inputs in = s.in();
    in.value = nullptr;
    EXPECT_TRUE(throws_error_naming([&] { msda::forward(p, in, s.output.data(), {1, backend}); }, {"value"}));
    in = s.in();
    in.sampling_locations = nullptr;
    EXPECT_TRUE(throws_error_naming([&] { msda::forward(p, in, s.output.data(), {1, backend}); },
                                    {"sampling_locations", "location"}));
    in = s.in();
    in.attention_weights = nullptr;
    EXPECT_TRUE(throws_error_naming(
        [&] { msda::backward(p, in, s.grad_output.data(), s.grads(), {1, backend}); },
        {"attention_weights", "weight"}));
    EXPECT_TRUE(throws_error_naming([&] { msda::forward(p, s.in(), nullptr, {1, backend}); }, {"output"}));
    EXPECT_TRUE(throws_error_naming(
        [&] { msda::backward(p, s.in(), nullptr, s.grads(), {1, backend}); }, {"grad_output", "grad"}));
    EXPECT_TRUE(s.untouched());
  }
}

// Asking for an instruction set the CPU (or the build: another architecture's) lacks is an Error
// (and touches nothing); baseline and best always work.
TEST(Validation, InstructionSets) {
  const msda::Problem p = base_problem();
  for (msda::Isa isa : all_isas()) {
    SCOPED_TRACE(std::string("isa ") + std::string(msda::name(isa)));
    Sentinels s;
    bool accepted = true;
    try {
      msda::forward(p, s.in(), s.output.data(), {1, Backend::cpu, isa});
    } catch (const msda::Error& e) {
      accepted = false;
      EXPECT_TRUE(names_one_of(e.argument(), {"isa"})) << e.what();
      EXPECT_TRUE(s.untouched());
    }
    if (isa == msda::Isa::best || isa == msda::Isa::baseline) EXPECT_TRUE(accepted);
    const bool listed = std::find(supported_isas().begin(), supported_isas().end(), isa) != supported_isas().end();
    EXPECT_EQ(accepted, listed);
  }
  EXPECT_FALSE(cpu_isas().empty());
}

// Out-of-range tuning values are an Error naming the switch, before anything is written.
TEST(Validation, TuningOutOfRange) {
  const msda::Problem p = base_problem();
  auto expect_rejected = [&](const msda::Options& o, const char* argument) {
    Sentinels s;
    try {
      msda::forward(p, s.in(), s.output.data(), o);
      ADD_FAILURE() << argument << " was accepted";
    } catch (const msda::Error& e) {
      EXPECT_EQ(e.argument(), std::string("options.tuning.") + argument) << e.what();
    }
    EXPECT_TRUE(s.untouched());
  };
  msda::Options o{1, Backend::cpu};
  o.tuning.query_block = -1;
  expect_rejected(o, "query_block");
  o = {1, Backend::cpu};
  o.tuning.query_stripe = -1;
  expect_rejected(o, "query_stripe");
  o = {1, Backend::cpu};
  o.tuning.accumulator_budget = -1;
  expect_rejected(o, "accumulator_budget");
  o = {1, Backend::cpu};
  o.tuning.scatter = static_cast<msda::CpuTuning::Scatter>(4);
  expect_rejected(o, "scatter");
  o = {1, Backend::cpu};
  o.tuning.staging = static_cast<msda::CpuTuning::Staging>(3);
  expect_rejected(o, "staging");
}

TEST(Validation, ErrorIsAnInvalidArgument) {
  msda::Problem p = base_problem();
  p.points = 0;
  EXPECT_THROW(msda::validate(p), std::invalid_argument);
  const msda::Error e("spatial_shapes", "positive H", "H = 0");
  EXPECT_EQ(e.argument(), "spatial_shapes");
  EXPECT_EQ(e.expected(), "positive H");
  EXPECT_EQ(e.actual(), "H = 0");
  EXPECT_NE(std::string(e.what()).find("spatial_shapes"), std::string::npos) << e.what();
}

// Every (value, location, weight) dtype triple: allowed exactly when location and weight are each
// value's dtype or f32.
TEST(Validation, DTypeMixes) {
  const DType all[] = {DType::f32, DType::f64, DType::bf16, DType::f16};
  for (DType v : all)
    for (DType l : all)
      for (DType w : all) {
        const msda::Problem p = base_problem(v, l, w);
        SCOPED_TRACE(describe(p));
        const bool location_ok = l == v || l == DType::f32;
        const bool weight_ok = w == v || w == DType::f32;
        if (location_ok && weight_ok) {
          EXPECT_NO_THROW(msda::validate(p));
          continue;
        }
        std::vector<std::string> names;
        if (!location_ok) names.push_back("location");
        if (!weight_ok) names.push_back("weight");
        EXPECT_TRUE(throws_error_naming([&] { msda::validate(p); }, names));
        Sentinels s;
        EXPECT_TRUE(throws_error_naming(
            [&] { msda::forward(p, s.in(), s.output.data(), {1, Backend::cpu}); }, names));
        EXPECT_TRUE(throws_error_naming(
            [&] {
              msda::backward(p, s.in(), s.grad_output.data(), s.grads(), {1, Backend::cpu});
            },
            names));
        EXPECT_TRUE(s.untouched());
      }
}

// Large sizes that fit in 64 bits are legal (validation only: nothing is run).
TEST(Validation, LargeButRepresentableSizesAreAccepted) {
  msda::Problem p = base_problem();
  p.levels = {{65536, 65536}};  // S = 2^32 rows: offsets beyond 32 bits
  p.level_start_index = {0};
  p.value_len = kP2_32;
  EXPECT_NO_THROW(msda::validate(p)) << describe(p);

  p.levels = {{kP2_30, kP2_30}};  // 2^60 elements of f32: 2^62 bytes
  p.value_len = kP2_60;
  p.batch = 1, p.heads = 1, p.channels = 1, p.queries = 1, p.points = 1;
  EXPECT_NO_THROW(msda::validate(p)) << describe(p);

  p = base_problem();
  p.queries = std::int64_t{1} << 40;  // 2^40 queries
  EXPECT_NO_THROW(msda::validate(p)) << describe(p);
}

TEST(Validation, LevelStarts) {
  EXPECT_EQ(msda::level_starts({{2, 3}, {4, 5}, {1, 1}}), (std::vector<std::int64_t>{0, 6, 26}));
  EXPECT_EQ(msda::level_starts({{7, 1}}), (std::vector<std::int64_t>{0}));
}

TEST(Validation, DTypeNamesAndSizes) {
  EXPECT_EQ(msda::size_of(DType::f32), 4u);
  EXPECT_EQ(msda::size_of(DType::f64), 8u);
  EXPECT_EQ(msda::size_of(DType::bf16), 2u);
  EXPECT_EQ(msda::size_of(DType::f16), 2u);
  const std::string names[] = {std::string(msda::name(DType::f32)), std::string(msda::name(DType::f64)),
                               std::string(msda::name(DType::bf16)), std::string(msda::name(DType::f16))};
  for (int i = 0; i < 4; ++i) {
    EXPECT_FALSE(names[i].empty());
    for (int j = 0; j < i; ++j) EXPECT_NE(names[i], names[j]);
  }
  EXPECT_NE(msda::name(Backend::cpu), msda::name(Backend::reference));
  EXPECT_FALSE(msda::name(Backend::automatic).empty());
}

// ---- describe ----

struct Described {
  msda::TensorSizes sizes;
  std::vector<std::int64_t> shapes;  // spatial_shapes contents, row-major
  std::vector<std::int64_t> starts;  // level_start_index contents
  DType value = DType::f32, location = DType::f32, weight = DType::f32;
};

// The tensors of base_problem(): value [2,16,2,4], spatial_shapes [2,2] = (3,4),(2,2),
// level_start_index [2] = 0,12, sampling_locations [2,3,2,2,2,2], attention_weights [2,3,2,2,2].
Described base_described() {
  Described d;
  d.sizes.value = {2, 16, 2, 4};
  d.sizes.spatial_shapes = {2, 2};
  d.sizes.level_start_index = {2};
  d.sizes.sampling_locations = {2, 3, 2, 2, 2, 2};
  d.sizes.attention_weights = {2, 3, 2, 2, 2};
  d.shapes = {3, 4, 2, 2};
  d.starts = {0, 12};
  return d;
}

msda::Problem call_describe(const Described& d) {
  // contents padded so that a wrongly sized tensor is never read out of bounds by the test itself
  std::vector<std::int64_t> shapes = d.shapes, starts = d.starts;
  shapes.resize(shapes.size() + 16, 1);
  starts.resize(starts.size() + 16, 0);
  return msda::describe(d.sizes, shapes.data(), starts.data(), d.value, d.location, d.weight);
}

TEST(Describe, ValidTensorsGiveTheProblem) {
  const Described d = base_described();
  msda::Problem p;
  ASSERT_NO_THROW(p = call_describe(d));
  EXPECT_EQ(p.batch, 2);
  EXPECT_EQ(p.value_len, 16);
  EXPECT_EQ(p.heads, 2);
  EXPECT_EQ(p.channels, 4);
  EXPECT_EQ(p.queries, 3);
  EXPECT_EQ(p.points, 2);
  ASSERT_EQ(p.levels.size(), 2u);
  EXPECT_EQ(p.levels[0].height, 3);
  EXPECT_EQ(p.levels[0].width, 4);
  EXPECT_EQ(p.levels[1].height, 2);
  EXPECT_EQ(p.levels[1].width, 2);
  EXPECT_EQ(p.level_start_index, (std::vector<std::int64_t>{0, 12}));
  EXPECT_EQ(p.value_dtype, DType::f32);

  Described mixed = base_described();
  mixed.value = DType::bf16;
  ASSERT_NO_THROW(p = call_describe(mixed));
  EXPECT_EQ(p.value_dtype, DType::bf16);
  EXPECT_EQ(p.location_dtype, DType::f32);
  EXPECT_EQ(p.weight_dtype, DType::f32);

  Described empty = base_described();  // N = 0 and Q = 0 are legal
  empty.sizes.value[0] = 0, empty.sizes.sampling_locations[0] = 0, empty.sizes.attention_weights[0] = 0;
  ASSERT_NO_THROW(p = call_describe(empty));
  EXPECT_EQ(p.batch, 0);
  empty = base_described();
  empty.sizes.sampling_locations[1] = 0, empty.sizes.attention_weights[1] = 0;
  ASSERT_NO_THROW(p = call_describe(empty));
  EXPECT_EQ(p.queries, 0);
}

// With points per level the per-sample tensors are [N, Q, M, K, 2] and [N, Q, M, K].
TEST(Describe, PointsPerLevel) {
  Described d = base_described();
  d.sizes.sampling_locations = {2, 3, 2, 5, 2};
  d.sizes.attention_weights = {2, 3, 2, 5};
  const std::vector<std::int64_t> points = {3, 2};
  msda::Problem p;
  ASSERT_NO_THROW(p = msda::describe(d.sizes, d.shapes.data(), d.starts.data(), d.value, d.location, d.weight, points,
                                     msda::Sampling::discrete));
  EXPECT_EQ(p.level_points, points);
  EXPECT_EQ(p.total_points(), 5);
  EXPECT_EQ(p.points_of(1), 2);
  EXPECT_EQ(p.sampling, msda::Sampling::discrete);
  EXPECT_EQ(p.queries, 3);

  struct Bad {
    std::string what;
    std::vector<std::int64_t> locations, weights, points;
    std::string name;
  };
  const Bad bad[] = {
      {"the [L, P] layout with points", {2, 3, 2, 2, 2, 2}, {2, 3, 2, 2, 2}, {3, 2}, "sampling_locations"},
      {"K disagrees with the points", {2, 3, 2, 4, 2}, {2, 3, 2, 4}, {3, 2}, "sampling_locations"},
      {"weights' K disagrees", {2, 3, 2, 5, 2}, {2, 3, 2, 4}, {3, 2}, "attention_weights"},
      {"weights of rank 5", {2, 3, 2, 5, 2}, {2, 3, 2, 5, 1}, {3, 2}, "attention_weights"},
      {"three points for two levels", {2, 3, 2, 6, 2}, {2, 3, 2, 6}, {3, 2, 1}, "points"},
      {"a level with no point", {2, 3, 2, 3, 2}, {2, 3, 2, 3}, {3, 0}, "points[1]"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    Described t = base_described();
    t.sizes.sampling_locations = b.locations;
    t.sizes.attention_weights = b.weights;
    try {
      msda::describe(t.sizes, t.shapes.data(), t.starts.data(), t.value, t.location, t.weight, b.points);
      ADD_FAILURE() << "no error";
    } catch (const msda::Error& e) {
      EXPECT_EQ(e.argument(), b.name) << e.what();
    }
  }
}

TEST(Describe, BadTensorsThrowNamingTheTensor) {
  struct Bad {
    std::string what;
    Described d;
    std::vector<std::string> names;
  };
  std::vector<Bad> bad;
  auto add = [&](std::string what, auto mutate, std::vector<std::string> names) {
    Described d = base_described();
    mutate(d);
    bad.push_back({std::move(what), d, std::move(names)});
  };
  const std::vector<std::string> locs = {"sampling_locations"};
  const std::vector<std::string> weights = {"attention_weights"};
  // ranks
  add("value rank 3", [](Described& d) { d.sizes.value = {2, 16, 8}; }, {"value"});
  add("value rank 5", [](Described& d) { d.sizes.value = {2, 16, 2, 4, 1}; }, {"value"});
  add("spatial_shapes rank 1", [](Described& d) { d.sizes.spatial_shapes = {4}; }, {"spatial_shapes"});
  add("spatial_shapes [L, 3]", [](Described& d) { d.sizes.spatial_shapes = {2, 3}; }, {"spatial_shapes"});
  add("spatial_shapes rank 3", [](Described& d) { d.sizes.spatial_shapes = {2, 2, 1}; }, {"spatial_shapes"});
  add("level_start_index rank 2", [](Described& d) { d.sizes.level_start_index = {2, 1}; },
      {"level_start_index"});
  add("level_start_index rank 0", [](Described& d) { d.sizes.level_start_index = {}; },
      {"level_start_index"});
  add("sampling_locations rank 5", [](Described& d) { d.sizes.sampling_locations = {2, 3, 2, 2, 4}; }, locs);
  add("sampling_locations rank 7",
      [](Described& d) { d.sizes.sampling_locations = {2, 3, 2, 2, 2, 2, 1}; }, locs);
  add("sampling_locations last dim 3", [](Described& d) { d.sizes.sampling_locations[5] = 3; }, locs);
  add("sampling_locations last dim 1", [](Described& d) { d.sizes.sampling_locations[5] = 1; }, locs);
  add("attention_weights rank 4", [](Described& d) { d.sizes.attention_weights = {2, 3, 2, 4}; }, weights);
  add("attention_weights rank 6",
      [](Described& d) { d.sizes.attention_weights = {2, 3, 2, 2, 2, 1}; }, weights);
  // sizes that disagree between tensors
  add("level_start_index size L+1", [](Described& d) {
        d.sizes.level_start_index = {3}, d.starts = {0, 12, 16};
      }, {"level_start_index"});
  add("sampling_locations N", [](Described& d) { d.sizes.sampling_locations[0] = 3; },
      {"sampling_locations", "value"});
  add("sampling_locations M", [](Described& d) { d.sizes.sampling_locations[2] = 1; },
      {"sampling_locations", "value"});
  add("sampling_locations L", [](Described& d) { d.sizes.sampling_locations[3] = 3; },
      {"sampling_locations", "spatial_shapes"});
  add("attention_weights N", [](Described& d) { d.sizes.attention_weights[0] = 1; },
      {"attention_weights", "value", "sampling_locations"});
  add("attention_weights Q", [](Described& d) { d.sizes.attention_weights[1] = 4; },
      {"attention_weights", "sampling_locations"});
  add("attention_weights M", [](Described& d) { d.sizes.attention_weights[2] = 3; },
      {"attention_weights", "sampling_locations", "value"});
  add("attention_weights L", [](Described& d) { d.sizes.attention_weights[3] = 1; },
      {"attention_weights", "sampling_locations", "spatial_shapes"});
  add("attention_weights P", [](Described& d) { d.sizes.attention_weights[4] = 3; },
      {"attention_weights", "sampling_locations"});
  add("S inconsistent", [](Described& d) { d.sizes.value[1] = 17; },
      {"value", "spatial_shapes", "value_len"});
  // zero or negative sizes
  add("L = 0", [](Described& d) {
        d.sizes.spatial_shapes = {0, 2}, d.sizes.level_start_index = {0};
        d.sizes.sampling_locations[3] = 0, d.sizes.attention_weights[3] = 0;
        d.sizes.value[1] = 0, d.shapes.clear(), d.starts.clear();
      }, {"spatial_shapes", "levels", "L"});
  add("P = 0", [](Described& d) {
        d.sizes.sampling_locations[4] = 0, d.sizes.attention_weights[4] = 0;
      }, {"sampling_locations", "attention_weights", "points", "P"});
  add("D = 0", [](Described& d) { d.sizes.value[3] = 0; }, {"value", "channels", "D"});
  add("negative N", [](Described& d) {
        d.sizes.value[0] = -2, d.sizes.sampling_locations[0] = -2, d.sizes.attention_weights[0] = -2;
      }, {"value", "sampling_locations", "attention_weights", "batch", "N"});
  add("negative M", [](Described& d) {
        d.sizes.value[2] = -2, d.sizes.sampling_locations[2] = -2, d.sizes.attention_weights[2] = -2;
      }, {"value", "sampling_locations", "attention_weights", "heads", "M"});
  // contents
  add("H = 0", [](Described& d) { d.shapes = {3, 4, 0, 2}, d.sizes.value[1] = 12; }, {"spatial_shapes"});
  add("W < 0", [](Described& d) { d.shapes = {3, 4, 2, -2}, d.sizes.value[1] = 8; }, {"spatial_shapes"});
  add("H < 0 and W < 0", [](Described& d) { d.shapes = {3, 4, -2, -2}; }, {"spatial_shapes"});
  add("level_start_index contents", [](Described& d) { d.starts = {0, 11}; }, {"level_start_index"});
  add("level_start_index first not 0", [](Described& d) { d.starts = {4, 16}; }, {"level_start_index"});
  add("level_start_index only first wrong", [](Described& d) { d.starts = {4, 12}; }, {"level_start_index"});
  // dtypes
  add("f32 value, f64 locations", [](Described& d) { d.location = DType::f64; }, {"location"});
  add("bf16 value, f16 locations", [](Described& d) { d.value = DType::bf16, d.location = DType::f16; },
      {"location"});
  add("f16 value, bf16 weights", [](Described& d) { d.value = DType::f16, d.weight = DType::bf16; },
      {"weight"});
  add("f64 value, f16 weights", [](Described& d) { d.value = DType::f64, d.weight = DType::f16; },
      {"weight"});
  // overflow
  add("value element count overflows", [](Described& d) {
        d.sizes.value = {1, kP2_60, 2, 8};
        d.sizes.sampling_locations = {1, 1, 2, 1, 1, 2};
        d.sizes.attention_weights = {1, 1, 2, 1, 1};
        d.sizes.spatial_shapes = {1, 2}, d.sizes.level_start_index = {1};
        d.shapes = {kP2_30, kP2_30}, d.starts = {0};
      }, {});
  add("H*W overflows", [](Described& d) {
        d.sizes.value = {1, kMax, 1, 1};
        d.sizes.sampling_locations = {1, 1, 1, 1, 1, 2};
        d.sizes.attention_weights = {1, 1, 1, 1, 1};
        d.sizes.spatial_shapes = {1, 2}, d.sizes.level_start_index = {1};
        d.shapes = {kP2_32, kP2_32}, d.starts = {0};
      }, {});
  add("location element count overflows", [](Described& d) {
        d.sizes.sampling_locations = {2, kP2_61, 2, 2, 2, 2};
        d.sizes.attention_weights = {2, kP2_61, 2, 2, 2};
      }, {});

  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    EXPECT_TRUE(throws_error_naming([&] { call_describe(b.d); }, b.names));
  }
}

TEST(Describe, CheckGradOutputSizes) {
  const msda::Problem p = base_problem();  // output [2, 3, 8]
  EXPECT_NO_THROW(msda::check_grad_output_sizes(p, {2, 3, 8}));
  const std::vector<std::vector<std::int64_t>> bad = {
      {2, 3, 2, 4}, {2, 24}, {2, 3, 9}, {1, 3, 8}, {2, 2, 8}, {3, 3, 8}, {}, {2, 3, 8, 1}, {2, 3, 4}};
  for (const auto& sizes : bad) {
    SCOPED_TRACE("grad_output rank " + std::to_string(sizes.size()));
    EXPECT_TRUE(throws_error_naming([&] { msda::check_grad_output_sizes(p, sizes); },
                                    {"grad_output", "grad"}));
  }
}

// ---- empty problems ----

class EmptyProblems : public ::testing::TestWithParam<std::tuple<DType, Backend>> {};

TEST_P(EmptyProblems, BatchZeroWritesNothing) {
  const auto [dtype, backend] = GetParam();
  msda::Problem p = base_problem(dtype, dtype, dtype);
  p.batch = 0;
  SCOPED_TRACE(describe(p));
  ASSERT_NO_THROW(msda::validate(p));
  Sentinels s;
  EXPECT_NO_THROW(msda::forward(p, s.in(), s.output.data(), {0, backend}));
  EXPECT_NO_THROW(msda::backward(p, s.in(), s.grad_output.data(), s.grads(), {0, backend}));
  EXPECT_TRUE(s.untouched());
}

TEST_P(EmptyProblems, QueriesZeroGiveZeroValueGradient) {
  const auto [dtype, backend] = GetParam();
  msda::Problem p = base_problem(dtype, dtype, dtype);
  p.queries = 0;
  SCOPED_TRACE(describe(p));
  ASSERT_NO_THROW(msda::validate(p));
  Sentinels s;
  EXPECT_NO_THROW(msda::forward(p, s.in(), s.output.data(), {0, backend}));
  Results r(p);
  ASSERT_EQ(r.grad_value.size(), 2 * 16 * 2 * 4);
  r.poison();
  // the empty location and weight gradients get sentinel buffers: nothing may be written there
  msda::Gradients g{r.grad_value.data(), s.grad_locations.data(), s.grad_weights.data()};
  EXPECT_NO_THROW(msda::backward(p, s.in(), s.grad_output.data(), g, {0, backend}));
  for (std::int64_t i = 0; i < r.grad_value.size(); ++i)
    ASSERT_EQ(r.grad_value.get(i), 0.0) << "grad_value element " << i;
  EXPECT_TRUE(r.guards_intact());
  EXPECT_TRUE(s.untouched());
}

INSTANTIATE_TEST_SUITE_P(
    DTypesAndBackends, EmptyProblems,
    ::testing::Combine(::testing::Values(DType::f32, DType::f64, DType::bf16, DType::f16),
                       ::testing::Values(Backend::automatic, Backend::cpu, Backend::reference)),
    [](const ::testing::TestParamInfo<EmptyProblems::ParamType>& info) {
      return std::string(msda::name(std::get<0>(info.param))) + "_" +
             std::string(msda::name(std::get<1>(info.param)));
    });

}  // namespace
}  // namespace msda_test
