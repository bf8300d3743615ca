// SPEC "Precision": results do not depend on the number of threads, and repeated runs give
// bitwise identical outputs and gradients (no floating-point atomics whose order varies).
// The cpu backend is checked for each instruction set this machine runs (each on its own: the
// header promises reproducibility "for a given choice").
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>

#include "test_support.h"

namespace msda_test {
namespace {

using msda::Backend;
using msda::DType;

// Runs the case with threads = 1 as the baseline, then with every count in `threads`, `repeats`
// times each, and requires every result to be bitwise identical to the baseline.
void expect_deterministic(const Case& c, std::initializer_list<int> threads, int repeats) {
  SCOPED_TRACE(c.label);
  for (msda::Isa isa : cpu_isas()) {
    SCOPED_TRACE("isa " + std::string(msda::name(isa)));
    Results first(c.problem);
    run_all(c.problem, c.tensors, first, {1, Backend::cpu, isa});
    // the baseline itself must be a real answer (no NaN left from the poison, not all zero)
    for (const Buffer* b : {&first.output, &first.grad_value, &first.grad_locations, &first.grad_weights}) {
      // Discrete sampling's location gradient is zero by definition (SPEC).
      if (b == &first.grad_locations && c.problem.sampling == msda::Sampling::discrete) continue;
      double norm = 0;
      for (double x : b->to_double()) norm += x * x;
      ASSERT_TRUE(std::isfinite(norm) && norm > 0) << "baseline result with norm " << norm;
    }
    for (int t : threads) {
      for (int rep = 0; rep < repeats; ++rep) {
        SCOPED_TRACE("threads=" + std::to_string(t) + " run " + std::to_string(rep));
        Results again(c.problem);
        run_all(c.problem, c.tensors, again, {t, Backend::cpu, isa});
        EXPECT_TRUE(again.output.same_bytes(first.output)) << "output";
        EXPECT_TRUE(again.grad_value.same_bytes(first.grad_value)) << "grad_value";
        EXPECT_TRUE(again.grad_locations.same_bytes(first.grad_locations)) << "grad_sampling_locations";
        EXPECT_TRUE(again.grad_weights.same_bytes(first.grad_weights)) << "grad_attention_weights";
      }
    }
  }
}

class Determinism : public ::testing::TestWithParam<std::tuple<DType, Locations>> {};

// A medium problem: 2 levels, M = 4, D = 32, Q = 500, P = 4, N = 2. `cluster` puts every sample
// in the middle tenth of the maps, so many samples share grad_value rows.
TEST_P(Determinism, BitwiseIdenticalAcrossThreadCountsAndRuns) {
  const auto [dtype, kind] = GetParam();
  Shape s;
  s.batch = 2, s.heads = 4, s.channels = 32, s.queries = 500, s.points = 4;
  s.levels = {{24, 30}, {12, 15}};
  expect_deterministic(make_case(s, {dtype, dtype, dtype}, kind, case_seed(0)), {1, 2, 3, 8, 0}, 3);
}

INSTANTIATE_TEST_SUITE_P(
    DTypes, Determinism,
    ::testing::Combine(::testing::Values(DType::f32, DType::bf16, DType::f16, DType::f64),
                       ::testing::Values(Locations::unit, Locations::cluster)),
    [](const ::testing::TestParamInfo<Determinism::ParamType>& info) {
      return std::string(msda::name(std::get<0>(info.param))) + "_" + name(std::get<1>(info.param));
    });

// The mixed-precision path (bf16 value, f32 locations and weights) and a channel count without a
// specialised kernel (D = 20) are deterministic too.
TEST(DeterminismMixed, Bf16ValueWithF32LocationsAndWeights) {
  Shape s;
  s.batch = 2, s.heads = 4, s.channels = 32, s.queries = 300, s.points = 4;
  s.levels = {{16, 20}, {8, 10}};
  expect_deterministic(make_case(s, {DType::bf16, DType::f32, DType::f32}, Locations::cluster, case_seed(0)),
                       {2, 3, 8}, 1);
}

TEST(DeterminismMixed, OddChannelCount) {
  Shape s;
  s.batch = 2, s.heads = 3, s.channels = 20, s.queries = 300, s.points = 4;
  s.levels = {{16, 20}, {8, 10}, {4, 5}};
  for (DType dtype : {DType::f32, DType::bf16}) {
    expect_deterministic(make_case(s, {dtype, dtype, dtype}, Locations::mixed, case_seed(0)), {2, 3, 8}, 1);
  }
}

// The v2 attention: points per level (D-FINE's [3, 6, 3]), bilinear and discrete, with as many
// threads as parts, more (per-level parts, then the two-pass backward) and the default.
TEST(DeterminismV2, PointsPerLevelAndDiscrete) {
  Shape s;
  s.batch = 1, s.heads = 2, s.channels = 32, s.queries = 300;
  s.levels = {{16, 20}, {8, 10}, {4, 5}};
  for (msda::Sampling sampling : {msda::Sampling::bilinear, msda::Sampling::discrete})
    for (DType dtype : {DType::f32, DType::bf16}) {
      const Shape v2 = with_v2(s, {3, 6, 3}, sampling);
      expect_deterministic(make_case(v2, {dtype, dtype, dtype}, Locations::cluster, case_seed(0)), {2, 3, 5, 16}, 2);
    }
}

// More threads than parts: with N*M = 2 (batch, head) pairs and N*M*L = 4 per-level parts, 3
// threads use per-level parts and 5 or 16 threads the two-pass backward (location and weight
// gradients over query ranges, then the grad_value scatter); the bits must not change.
TEST(DeterminismManyThreads, MoreThreadsThanParts) {
  Shape s;
  s.batch = 1, s.heads = 2, s.channels = 32, s.queries = 400, s.points = 4;
  s.levels = {{16, 20}, {8, 10}};
  for (DType dtype : {DType::f32, DType::bf16}) {
    expect_deterministic(make_case(s, {dtype, dtype, dtype}, Locations::cluster, case_seed(0)), {3, 5, 16}, 2);
  }
}

// Only the location and weight gradients (no grad_value): parts split by query range.
TEST(DeterminismManyThreads, LocationAndWeightGradientsOnly) {
  Shape s;
  s.batch = 1, s.heads = 2, s.channels = 32, s.queries = 400, s.points = 4;
  s.levels = {{16, 20}, {8, 10}};
  const Case c = make_case(s, {DType::f32, DType::f32, DType::f32}, Locations::unit, case_seed(0));
  for (msda::Isa isa : cpu_isas()) {
    SCOPED_TRACE("isa " + std::string(msda::name(isa)));
    Results first(c.problem), full(c.problem);
    first.poison();
    msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(),
                   {nullptr, first.grad_locations.data(), first.grad_weights.data()}, {1, Backend::cpu, isa});
    run_all(c.problem, c.tensors, full, {1, Backend::cpu, isa});
    EXPECT_TRUE(first.grad_locations.same_bytes(full.grad_locations));
    EXPECT_TRUE(first.grad_weights.same_bytes(full.grad_weights));
    for (int t : {2, 5, 16}) {
      SCOPED_TRACE("threads=" + std::to_string(t));
      Results again(c.problem);
      again.poison();
      msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(),
                     {nullptr, again.grad_locations.data(), again.grad_weights.data()}, {t, Backend::cpu, isa});
      EXPECT_TRUE(again.grad_locations.same_bytes(first.grad_locations)) << "grad_sampling_locations";
      EXPECT_TRUE(again.grad_weights.same_bytes(first.grad_weights)) << "grad_attention_weights";
    }
  }
}

// The three gradients of two runs, bit for bit.
void expect_same_gradients(const Results& got, const Results& want) {
  EXPECT_TRUE(got.grad_value.same_bytes(want.grad_value)) << "grad_value";
  EXPECT_TRUE(got.grad_locations.same_bytes(want.grad_locations)) << "grad_sampling_locations";
  EXPECT_TRUE(got.grad_weights.same_bytes(want.grad_weights)) << "grad_attention_weights";
}

// Maps too large for the per-thread accumulator are cut into bands of rows (a tiny budget forces
// it here): the bits must equal the unbanded result's, at any thread count.
TEST(DeterminismManyThreads, BandedAccumulatorGivesTheSameBits) {
  Shape s;
  s.batch = 2, s.heads = 2, s.channels = 32, s.queries = 300, s.points = 4;
  s.levels = {{24, 30}, {12, 15}};
  for (DType dtype : {DType::f32, DType::bf16}) {
    const Case c = make_case(s, {dtype, dtype, dtype}, Locations::unit, case_seed(0));
    for (msda::Isa isa : cpu_isas()) {
      SCOPED_TRACE("isa " + std::string(msda::name(isa)) + " " + c.label);
      Results whole(c.problem);
      run_all(c.problem, c.tensors, whole, {1, Backend::cpu, isa});
      for (std::int64_t budget : {std::int64_t(4096), std::int64_t(100 * 32 * 4 + 1)}) {
        for (int t : {1, 3}) {
          SCOPED_TRACE("budget=" + std::to_string(budget) + " threads=" + std::to_string(t));
          msda::Options o{t, Backend::cpu, isa};
          o.tuning.accumulator_budget = budget;
          Results banded(c.problem);
          run_all(c.problem, c.tensors, banded, o);
          expect_same_gradients(banded, whole);
        }
      }
    }
  }
}

// Runs `c` with `reference`, then with `vary(options, k)` for k < count at 1, 3, 5 and 9 threads
// (on top of the reference's other settings): the output and every gradient must keep the
// reference's bits, and so must the location and weight gradients asked for alone (no
// grad_value: the backward's other plan of parts).
template <class Vary>
void expect_switch_keeps_bits(const Case& c, const msda::Options& reference, int count, Vary vary) {
  Results want(c.problem);
  run_all(c.problem, c.tensors, want, reference);
  for (int k = 0; k < count; ++k)
    for (int t : {1, 3, 5, 9}) {
      msda::Options o = reference;
      o.threads = t;
      vary(o, k);
      SCOPED_TRACE("variant " + std::to_string(k) + " threads=" + std::to_string(t));
      Results got(c.problem);
      run_all(c.problem, c.tensors, got, o);
      EXPECT_TRUE(got.output.same_bytes(want.output)) << "output";
      expect_same_gradients(got, want);
      Results dots(c.problem);
      dots.poison();
      msda::Gradients only_dots = dots.gradients();
      only_dots.value = nullptr;
      msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(), only_dots, o);
      EXPECT_TRUE(dots.grad_locations.same_bytes(want.grad_locations)) << "grad_sampling_locations alone";
      EXPECT_TRUE(dots.grad_weights.same_bytes(want.grad_weights)) << "grad_attention_weights alone";
    }
}

// A part's grad_value rows summed in a per-thread copy, in grad_value itself (f32, f64) or by
// owner-computes (records bucketed by row): the same terms in the same order, so the same bits,
// at any thread count and with either plan of parts; bf16 never sums in place, so there that
// switch must change nothing either. Decoder-like (40 queries: automatic sums the finest level,
// 1 corner per row, in place and the coarser ones, 4 and 32, in the copy) and
// encoder-like (many corners per row: the copy everywhere under automatic) problems; a tiny
// accumulator budget cuts the copy's levels into bands of rows, and then every level's parts,
// owner-computes ones too, into bands that record only their own rows.
TEST(DeterminismManyThreads, ScatterInPlaceCopyOrOwnerGivesTheSameBits) {
  for (std::int64_t queries : {40, 600}) {
    Shape s;
    s.batch = 2, s.heads = 2, s.channels = 32, s.queries = queries, s.points = 3;
    s.levels = {{20, 24}, {10, 12}, {3, 5}};
    for (DType dtype : {DType::f32, DType::f64, DType::bf16}) {
      const Case c = make_case(s, {dtype, dtype, dtype}, Locations::mixed, case_seed(static_cast<int>(queries)));
      for (msda::Isa isa : cpu_isas()) {
        SCOPED_TRACE("isa " + std::string(msda::name(isa)) + " " + c.label);
        msda::Options copy{1, Backend::cpu, isa};
        copy.tuning.scatter = msda::CpuTuning::Scatter::copy;
        expect_switch_keeps_bits(c, copy, 5, [](msda::Options& o, int k) {
          constexpr msda::CpuTuning::Scatter kHow[] = {msda::CpuTuning::Scatter::in_place, msda::CpuTuning::Scatter::automatic,
                                                       msda::CpuTuning::Scatter::owner, msda::CpuTuning::Scatter::owner,
                                                       msda::CpuTuning::Scatter::automatic};
          o.tuning.scatter = kHow[k];
          if (k >= 3) o.tuning.accumulator_budget = 64 * 32 * 4;  // bands of 64 rows (f32)
        });
      }
    }
  }
}

// Staged gathers read each head's rows from a contiguous copy instead of value: the same rows,
// the same arithmetic in the same order, so the same bits as direct gathers, forward and
// backward, at any thread count (more threads than (batch, head) pairs split heads into query
// ranges, parts of one level and the two-pass backward), with parts of one level, for a
// compile-time D (32) and a runtime one (20), and for the sparse problem automatic leaves direct.
TEST(DeterminismManyThreads, StagedOrDirectGathersGiveTheSameBits) {
  for (std::int64_t queries : {30, 500})
    for (std::int64_t channels : {32, 20}) {
      Shape s;
      s.batch = 2, s.heads = 2, s.channels = channels, s.queries = queries, s.points = 3;
      s.levels = {{20, 24}, {10, 12}, {3, 5}};
      for (DType dtype : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
        const Case c = make_case(s, {dtype, dtype, dtype}, Locations::mixed, case_seed(static_cast<int>(queries + channels)));
        for (msda::Isa isa : cpu_isas()) {
          SCOPED_TRACE("isa " + std::string(msda::name(isa)) + " " + c.label);
          msda::Options direct{1, Backend::cpu, isa};
          direct.tuning.staging = msda::CpuTuning::Staging::direct;
          // copy and automatic, each with whole parts and with parts of one level
          expect_switch_keeps_bits(c, direct, 4, [](msda::Options& o, int k) {
            o.tuning.staging = k % 2 == 0 ? msda::CpuTuning::Staging::copy : msda::CpuTuning::Staging::automatic;
            o.tuning.level_parts = k >= 2;
          });
        }
      }
    }
}

// Off-map corners of staged gathers read the copy's row of zeros (kernels.inl, kZeroRow), whose
// dot product with grad_output must be the +0 that direct gathers give by skipping the corner. It
// is not with an infinite grad_output element (0 * inf is NaN) nor when a grad_output row is all
// negative (a sum of -0s is -0, visible where value's rows are zero): the kernel then skips the
// corner as direct gathers do. Every element of the result, NaN and signed zeros included, must
// have the direct gathers' bits. Infinities in every third query's row only, so that queries of
// one part take either path; 3 points, so that parts of one level end inside a block of samples.
TEST(DeterminismManyThreads, StagedOffMapCornersGiveTheDirectGathersBits) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int variant = 0; variant < 2; ++variant) {
    Shape s;
    s.batch = 1, s.heads = 2, s.channels = 32, s.queries = 60, s.points = 3;
    s.levels = {{6, 9}, {3, 4}};
    Case c = make_case(s, {DType::f32, DType::f32, DType::f32}, Locations::borders, case_seed(variant));
    const char* what[] = {"every 7th grad_output element of every 3rd query infinite",
                          "grad_output all negative, value zero"};
    const std::int64_t row = s.heads * s.channels;  // grad_output is [N, Q, M * D]
    for (std::int64_t e = 0; e < c.tensors.grad_output.size(); ++e) {
      const double g = c.tensors.grad_output.get(e);
      if (variant == 0 && e / row % 3 == 0 && e % 7 == 0) c.tensors.grad_output.set(e, e % 2 ? inf : -inf);
      if (variant == 1) c.tensors.grad_output.set(e, -std::abs(g) - 0.25);
    }
    if (variant == 1)
      for (std::int64_t i = 0; i < c.tensors.value.size(); ++i) c.tensors.value.set(i, 0.0);
    for (msda::Isa isa : cpu_isas()) {
      SCOPED_TRACE("isa " + std::string(msda::name(isa)) + " " + what[variant] + " " + c.label);
      msda::Options direct{1, Backend::cpu, isa};
      direct.tuning.staging = msda::CpuTuning::Staging::direct;
      expect_switch_keeps_bits(c, direct, 2, [](msda::Options& o, int k) {
        o.tuning.staging = msda::CpuTuning::Staging::copy;
        o.tuning.level_parts = k == 1;
      });
    }
  }
}

// An encoder's queries (as many as value's rows) walked in stripes of image rows: each stripe
// height sums every grad_value row in its own fixed order, so its bits are the same at any
// thread count and partition (parts of one level, bands of rows, rows summed in place or by
// owner-computes, the two-pass backward), for stripes of one row (raster), of 3 (dividing no
// level's height), 8 (the default) and taller than every level.
TEST(DeterminismManyThreads, EncoderQueriesWalkedInStripesKeepTheirBits) {
  for (std::int64_t channels : {32, 20}) {
    Shape s;
    s.batch = 2, s.heads = 2, s.channels = channels, s.queries = 222, s.points = 3;
    s.levels = {{12, 14}, {6, 7}, {3, 4}};
    for (DType dtype : {DType::f32, DType::bf16}) {
      const Case c = make_case(s, {dtype, dtype, dtype}, Locations::mixed, case_seed(static_cast<int>(channels)));
      for (msda::Isa isa : cpu_isas())
        for (std::int64_t stripe : {1, 3, 0, 100}) {
          SCOPED_TRACE("isa " + std::string(msda::name(isa)) + " stripe " + std::to_string(stripe) + " " + c.label);
          msda::Options walk{1, Backend::cpu, isa};
          walk.tuning.query_stripe = stripe;
          expect_switch_keeps_bits(c, walk, 4, [](msda::Options& o, int k) {
            o.tuning.level_parts = k == 1;
            if (k == 2) o.tuning.accumulator_budget = 64 * 32 * 4;  // bands of 64 rows (f32)
            if (k == 3) o.tuning.scatter = msda::CpuTuning::Scatter::owner;
          });
        }
    }
  }
}

}  // namespace
}  // namespace msda_test
