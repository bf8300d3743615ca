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

#include "test_cuda_emulated_support.h"

namespace {

using namespace msda_test;
namespace emulated = msda::cuda_emulation;

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
        expect_both_grad_values_match(c);
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
        expect_both_grad_values_match(c);
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


// ---- the kernels compiled for D = 32 and K = 16 ----

// D = 32 and K = L*P = 16 (4 levels of 4 points, 2 of 8, and points per level [3, 6, 3, 4]) run
// the kernels compiled for those sizes (backend.inl, with_fixed_sizes) wherever value's rows are
// 16-byte aligned and offsets fit 32 bits: the plain op for every dtype mix (f64 runs the general
// kernels beside them), the fused op with 2 and 4 coordinates, the deterministic and the atomic
// grad_value (the atomic variant keeps the general kernels: the comparison covers both).
TEST_F(CudaEmulated, KernelsCompiledForD32AndK16MatchTheReference) {
  const Shape shapes[] = {Shape{2, 3, 32, 7, 4, {{8, 4}, {4, 2}, {2, 2}, {1, 2}}},
                          Shape{1, 2, 32, 9, 8, {{8, 8}, {2, 4}}},
                          with_v2({1, 2, 32, 6, 1, {{8, 4}, {4, 2}, {2, 2}, {1, 1}}}, {3, 6, 3, 4})};
  const FusedDTypes fused_mixes[] = {{DType::f32, DType::f32, DType::f32, DType::f32},
                                     {DType::bf16, DType::f32, DType::f32, DType::f32},
                                     {DType::f16, DType::f16, DType::f16, DType::f16}};
  const DTypes few[] = {{DType::f32, DType::f32, DType::f32}, {DType::bf16, DType::f32, DType::f32},
                        {DType::f16, DType::f16, DType::f16}};
  std::uint64_t index = 0;
  for (const Shape& shape : shapes) {
    // Every mix on the first shape; the others vary the layout, a few mixes suffice there.
    const std::vector<DTypes> mixes = &shape == &shapes[0] ? dtype_mixes() : std::vector<DTypes>(std::begin(few), std::end(few));
    for (const DTypes& mix : mixes) {
      const Case c = make_case(shape, mix, Locations::mixed, case_seed(index++));
      SCOPED_TRACE(c.label);
      expect_both_grad_values_match(c);
    }
    for (std::int64_t coords : {2, 4})
      for (const FusedDTypes& mix : fused_mixes) {
        const FusedCase c = make_fused_case(shape, coords, 0.5, mix, Draw::local, case_seed(index++));
        SCOPED_TRACE(c.label);
        FusedResults got(c.problem);
        run_fused_emulated(c, got);
        expect_fused_matches_reference(c, got);
      }
  }
}

// ---- the fused op: points per level, offset_scale and discrete sampling ----

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
              run_fused_emulated(c, got, {.deterministic = deterministic});
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
          run_fused_emulated(c, got);
          expect_fused_matches_reference(c, got);
        }
}

// Every fused dtype mix SPEC allows, 2 and 4 coordinates, local, non-finite and pixel-boundary
// draws on maps that are not powers of two (moved here from tests/test_fused.cpp with the emulated
// backend; every result finite and within bounds, as there).
class FusedCudaEmulated : public CudaEmulated {};

TEST_F(FusedCudaEmulated, EveryMixCoordinateCountAndDrawMatchesTheReference) {
  std::uint64_t index = 0;
  for (const FusedDTypes& mix : fused_mixes())
    for (std::int64_t coords : {2, 4})
      for (Draw draw : {Draw::local, Draw::nonfinite, Draw::boundaries}) {
        if (draw == Draw::boundaries && coords == 4) continue;
        const FusedCase c = make_fused_case({2, 2, 8, 5, 3, {{4, 6}, {2, 3}}}, coords, 0.5, mix, draw, case_seed(index++));
        SCOPED_TRACE(c.label + " " + to_string(mix));
        FusedResults got(c.problem);
        run_fused_emulated(c, got);
        expect_fused_matches_reference(c, got, /*strict=*/true);
      }
}

}  // namespace
