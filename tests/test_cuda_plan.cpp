// The cuda backend, as far as a machine without a GPU can check it: its launch and workspace
// planning, its overflow rules, and the deterministic grad_value's bucketing, run on the host
// with the very functions the kernels call (src/cuda/bilinear.h, plan.h) and compared with the
// reference backend. Tests that need a device are in tests/cuda/.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "cuda/plan.h"
#include "cuda_emulation/emulated_backend.h"
#include "params.h"
#include "test_support.h"

namespace {

using msda::cuda::BucketPlan;
using msda::cuda::LevelGeometry;
using msda::cuda::Region;
using msda::cuda::Workspace;
using namespace msda_test;

msda::Params params_of(const msda::Problem& problem) { return msda::cuda_emulation::params_for(problem); }

TEST(CudaPlan, GroupLanesCoverTheChannelsUpToAWarp) {
  EXPECT_EQ(msda::cuda::group_lanes(1), 1);
  EXPECT_EQ(msda::cuda::group_lanes(2), 2);
  EXPECT_EQ(msda::cuda::group_lanes(3), 4);
  EXPECT_EQ(msda::cuda::group_lanes(32), 32);
  EXPECT_EQ(msda::cuda::group_lanes(33), 32);
  EXPECT_EQ(msda::cuda::group_lanes(std::int64_t(1) << 40), 32);
  for (std::int64_t d = 1; d < 100; ++d) {
    const int lanes = msda::cuda::group_lanes(d);
    EXPECT_EQ(32 % lanes, 0) << d;  // groups never straddle a warp
  }
}

TEST(CudaPlan, LaunchesCoverEveryItemWithinTheGridLimit) {
  EXPECT_EQ(msda::cuda::launch_for(0, 32).blocks, 0);
  const msda::cuda::Launch small = msda::cuda::launch_for(10, 32);  // 8 groups of 32 per block
  EXPECT_EQ(small.blocks, 2);
  EXPECT_EQ(small.threads, msda::cuda::kBlockThreads);
  EXPECT_EQ(msda::cuda::launch_flat(257).blocks, 2);
  // Past the cap the kernels loop: the grid stays within CUDA's x limit (2^31 - 1).
  const msda::cuda::Launch huge = msda::cuda::launch_for(std::int64_t(1) << 50, 1);
  EXPECT_EQ(huge.blocks, msda::cuda::kMaxBlocks);
  EXPECT_LT(huge.blocks, std::int64_t(1) << 31);
}

TEST(CudaPlan, BucketsAreTheCellsOfTopLeftCorners) {
  const msda::Problem pr = make_problem({2, 3, 4, 5, 2, {{3, 4}, {1, 1}}}, {});
  const msda::Params p = params_of(pr);
  const BucketPlan plan = msda::cuda::plan_buckets(p);
  EXPECT_EQ(plan.samples, 2 * 5 * 3 * 2 * 2);
  EXPECT_EQ(plan.cells_per_head, 4 * 5 + 2 * 2);
  EXPECT_EQ(plan.buckets, 2 * 3 * plan.cells_per_head);
  EXPECT_FALSE(plan.wide);
  EXPECT_GE(std::uint64_t(1) << plan.key_bits, std::uint64_t(plan.buckets) + 1);  // the sentinel fits
  const std::vector<LevelGeometry> levels = msda::cuda::level_geometry(p);
  ASSERT_EQ(levels.size(), 2u);
  EXPECT_EQ(levels[1].cell_start, 20);
  EXPECT_EQ(levels[1].start, 12);
}

TEST(CudaPlan, SixtyFourBitKeysAndIdsWhenThirtyTwoDoNotHold) {
  // 2^32 samples: ids need 64 bits though the buckets are few.
  msda::Problem pr = make_problem({1, 1, 1, std::int64_t(1) << 28, 16, {{2, 2}}}, {});
  EXPECT_TRUE(msda::cuda::plan_buckets(params_of(pr)).wide);
  pr.queries = (std::int64_t(1) << 28) - 1;
  EXPECT_FALSE(msda::cuda::plan_buckets(params_of(pr)).wide);
  // Many buckets: 2^33 cells.
  const std::int64_t side = (std::int64_t(1) << 16) - 1;
  const msda::Problem maps = make_problem({1, 2, 1, 1, 1, {{side, side}}}, {});
  const BucketPlan plan = msda::cuda::plan_buckets(params_of(maps));
  EXPECT_TRUE(plan.wide);
  EXPECT_EQ(plan.key_bits, 34);
}

TEST(CudaPlan, BucketCountsThatOverflowAreAnError) {
  const std::int64_t big = std::int64_t(1) << 31;
  const msda::Problem pr = make_problem({1 << 10, 1 << 10, 1, 1, 1, {{big, big}}}, {});
  try {
    msda::cuda::plan_buckets(params_of(pr));
    FAIL() << "expected an Error";
  } catch (const msda::Error& e) {
    EXPECT_EQ(e.argument(), "spatial_shapes");
  }
}

void expect_well_formed(const Workspace& w) {
  const Region all[] = {w.levels,       w.softmax,     w.samples,          w.keys[0],
                        w.keys[1],      w.ids[0],      w.ids[1],           w.segments,
                        w.sort_scratch, w.accumulator, w.weight_gradients, w.reference_partials};
  for (const Region& a : all) {
    if (a.bytes == 0) continue;
    EXPECT_EQ(a.offset % 256, 0u);
    EXPECT_LE(a.offset + a.bytes, w.total);
    for (const Region& b : all)
      if (&a != &b && b.bytes != 0) EXPECT_TRUE(a.offset + a.bytes <= b.offset || b.offset + b.bytes <= a.offset);
  }
}

TEST(CudaPlan, WorkspaceHoldsWhatEachPassNeedsAndNothingElse) {
  const msda::Problem pr = make_problem({2, 3, 5, 7, 4, {{6, 5}, {3, 3}}}, {});
  msda::Params p = params_of(pr);
  const std::int64_t samples = 2 * 7 * 3 * 2 * 4;

  const Workspace forward = msda::cuda::plan_workspace(p, false, 0);
  expect_well_formed(forward);
  EXPECT_EQ(forward.levels.bytes, 2 * sizeof(LevelGeometry));
  EXPECT_EQ(forward.samples.bytes + forward.softmax.bytes + forward.keys[0].bytes, 0u);

  char wanted;
  p.grad_value = &wanted;
  p.grad_locations = &wanted;
  const Workspace deterministic = msda::cuda::plan_workspace(p, true, 1000);
  expect_well_formed(deterministic);
  EXPECT_EQ(deterministic.samples.bytes, std::size_t(samples) * sizeof(msda::cuda::Place<float>));
  EXPECT_EQ(deterministic.keys[1].bytes, std::size_t(samples) * 4);
  EXPECT_EQ(deterministic.segments.bytes, std::size_t(msda::cuda::plan_buckets(p).buckets + 1) * 4);
  EXPECT_EQ(deterministic.sort_scratch.bytes, 1000u);
  EXPECT_EQ(deterministic.accumulator.bytes, 0u);

  p.cuda.deterministic = false;  // f32 atomics add into grad_value itself
  const Workspace atomic = msda::cuda::plan_workspace(p, true, 0);
  expect_well_formed(atomic);
  EXPECT_EQ(atomic.samples.bytes + atomic.keys[0].bytes + atomic.accumulator.bytes, 0u);

  msda::Problem half = pr;
  half.value_dtype = DType::bf16;
  msda::Params ph = params_of(half);
  ph.grad_value = &wanted;
  ph.cuda.deterministic = false;  // bf16 atomics add into an f32 copy, rounded once
  EXPECT_EQ(msda::cuda::plan_workspace(ph, true, 0).accumulator.bytes, std::size_t(2 * 30 + 2 * 9) * 3 * 5 * 4);

  msda::Problem f64 = pr;
  f64.value_dtype = DType::f64;
  msda::Params pf = params_of(f64);
  pf.fused = true;
  pf.reference_coords = 4;
  pf.grad_value = pf.grad_reference_points = pf.grad_logits = &wanted;
  const Workspace fused = msda::cuda::plan_workspace(pf, true, 64);
  expect_well_formed(fused);
  EXPECT_EQ(fused.softmax.bytes, std::size_t(2 * 7 * 3) * 2 * 8);  // per head, in double
  EXPECT_EQ(fused.samples.bytes, std::size_t(samples) * sizeof(msda::cuda::Place<double>));
  EXPECT_EQ(fused.weight_gradients.bytes, std::size_t(samples) * 8);
  EXPECT_EQ(fused.reference_partials.bytes, std::size_t(2 * 7 * 3 * 2 * 4) * 8);

  // Points per level: every per-sample region has K = 3 + 6 + 3 samples per head.
  msda::Problem v2 = make_problem(with_v2({2, 3, 5, 7, 1, {{6, 5}, {3, 3}, {2, 2}}}, {3, 6, 3}), {});
  msda::Params pv = params_of(v2);
  pv.fused = true;
  pv.grad_value = pv.grad_logits = &wanted;
  const Workspace per_level = msda::cuda::plan_workspace(pv, true, 64);
  expect_well_formed(per_level);
  const std::size_t v2_samples = 2 * 7 * 3 * 12;
  EXPECT_EQ(per_level.samples.bytes, v2_samples * sizeof(msda::cuda::Place<float>));
  EXPECT_EQ(per_level.keys[0].bytes, v2_samples * 4);
  EXPECT_EQ(per_level.weight_gradients.bytes, v2_samples * 4);
}

TEST(CudaPlan, SegmentStartsAndLevelLookups) {
  const std::vector<std::uint32_t> keys = {0, 0, 2, 2, 2, 5, 7, 7};  // 7 = sentinel of 7 buckets
  const std::int64_t expected[] = {0, 2, 2, 5, 5, 5, 6, 6};
  for (std::int64_t k = 0; k <= 7; ++k) EXPECT_EQ(msda::cuda::segment_start(keys.data(), 8, k), expected[k]) << k;
  const LevelGeometry levels[] = {{2, 3, 0, 0, 1, 0}, {1, 1, 6, 12, 4, 1}, {2, 2, 7, 16, 2, 5}};
  const std::int64_t level_of[] = {0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2};
  for (std::int64_t row = 0; row < 11; ++row) EXPECT_EQ(msda::cuda::level_of_row(levels, 3, row), level_of[row]);
}

// Points per level [1, 4, 2, 3]: a head's K = 10 samples are level 0's one, level 1's four, and
// so on; the level table carries each level's count and where its samples start in a head.
TEST(CudaPlan, SampleSitesFollowThePointsPerLevel) {
  const msda::Problem pr = make_problem(with_v2({2, 3, 4, 5, 1, {{3, 4}, {2, 2}, {1, 3}, {2, 1}}}, {1, 4, 2, 3}), {});
  const msda::Params p = params_of(pr);
  ASSERT_EQ(p.K, 10);
  const std::vector<LevelGeometry> levels = msda::cuda::level_geometry(p);
  const std::int64_t points[] = {1, 4, 2, 3}, starts[] = {0, 1, 5, 7};
  for (std::size_t l = 0; l < 4; ++l) {
    EXPECT_EQ(levels[l].points, points[l]);
    EXPECT_EQ(levels[l].point_start, starts[l]);
  }
  const std::int64_t level_of[] = {0, 1, 1, 1, 1, 2, 2, 3, 3, 3};
  const std::int64_t samples = 2 * 5 * 3 * 10;
  EXPECT_EQ(msda::cuda::plan_buckets(p).samples, samples);
  for (std::int64_t i = 0; i < samples; ++i) {
    const msda::cuda::SampleSite site = msda::cuda::site_of(i, levels.data(), p.L, p.K);
    EXPECT_EQ(site.head, i / 10) << i;
    EXPECT_EQ(site.level, level_of[i % 10]) << i;
  }
  // Equal points: the [L, P] layout's (head*L + l)*P + p.
  const msda::Params equal = params_of(make_problem({1, 2, 1, 3, 3, {{2, 2}, {1, 1}}}, {}));
  const std::vector<LevelGeometry> equal_levels = msda::cuda::level_geometry(equal);
  for (std::int64_t i = 0; i < 2 * 3 * 2 * 3; ++i) {
    const msda::cuda::SampleSite site = msda::cuda::site_of(i, equal_levels.data(), equal.L, equal.K);
    EXPECT_EQ(site.head, i / 3 / 2);
    EXPECT_EQ(site.level, i / 3 % 2);
  }
}

// SPEC's discrete pixel: clamp(trunc(t), 0, size - 1) of t = x*size + 0.5, clamped as a double.
TEST(CudaPlan, DiscretePixelIndices) {
  const double inf = std::numeric_limits<double>::infinity();
  const std::pair<double, std::int64_t> cases[] = {
      {0.5, 0},  {0.0, 0},  {0.999, 0}, {1.0, 1}, {1.5, 1},      {2.0, 2},  {3.0, 3}, {3.999, 3},
      {4.0, 3},  {4.5, 3},  {-0.0, 0},  {-0.5, 0}, {-0.999, 0}, {-1.0, 0}, {-7.5, 0}, {inf, 3},
      {-inf, 0}, {1e300, 3}, {-1e300, 0}, {0x1p63, 3}, {-0x1p63, 0}, {std::nextafter(2.0, 0.0), 1}};
  for (const auto& [t, pixel] : cases) EXPECT_EQ(msda::cuda::discrete_index(t, 4), pixel) << t;
  EXPECT_EQ(msda::cuda::discrete_index(0.7, 1), 0);
  EXPECT_EQ(msda::cuda::discrete_index(inf, 1), 0);

  // A sample: the pixel is its top-left corner with weight 1; NaN (only) reads nothing.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto c = msda::cuda::pixel_at<float>(2.5, inf, 5, 3);  // column 2.5 -> 2, row inf -> 4
  EXPECT_TRUE(c.inside);
  EXPECT_EQ(c.h0, 4);
  EXPECT_EQ(c.w0, 2);
  EXPECT_EQ(c.hh * c.hw, 1.0f);
  EXPECT_EQ(c.lh, 0.0f);
  EXPECT_EQ(c.lw, 0.0f);
  EXPECT_FALSE((msda::cuda::pixel_at<float>(nan, 0.5, 5, 3).inside));
  EXPECT_FALSE((msda::cuda::pixel_at<float>(0.5, nan, 5, 3).inside));
  EXPECT_TRUE((msda::cuda::pixel_at<float>(-inf, -inf, 5, 3).inside));
}

// The deterministic grad_value on the host: keys, a stable sort, segment starts and the per-row
// gather, with the kernels' own functions. It must equal the reference backend's grad_value.
std::vector<double> bucketed_grad_value(const msda::Problem& problem, const Tensors& t) {
  const msda::Params p = params_of(problem);
  const std::vector<LevelGeometry> levels = msda::cuda::level_geometry(p);
  const BucketPlan plan = msda::cuda::plan_buckets(p);
  std::vector<double> u(plan.samples), v(plan.samples), a(plan.samples);
  std::vector<std::int64_t> keys(plan.samples);
  // The sample's corners as the kernels place it: u, v are x*W - 0.5 and y*H - 0.5, or for
  // discrete sampling x*W + 0.5 and y*H + 0.5.
  const double shift = p.discrete ? 0.5 : -0.5;
  auto corners = [&](std::int64_t i, const LevelGeometry& g) {
    return p.discrete ? msda::cuda::pixel_at<double>(u[i], v[i], g.height, g.width)
                      : msda::cuda::corners_at<double>(u[i], v[i], g.height, g.width);
  };
  for (std::int64_t i = 0; i < plan.samples; ++i) {
    const msda::cuda::SampleSite site = msda::cuda::site_of(i, levels.data(), p.L, p.K);
    const LevelGeometry& g = levels[site.level];
    u[i] = t.locations.get(2 * i) * double(g.width) + shift;
    v[i] = t.locations.get(2 * i + 1) * double(g.height) + shift;
    a[i] = t.weights.get(i);
    const auto c = corners(i, g);
    keys[i] = msda::cuda::sample_bucket(c, g, site.head / p.M / p.Q, site.head % p.M, p.M, plan.cells_per_head,
                                        plan.buckets);
  }
  std::vector<std::int64_t> order(plan.samples);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) { return keys[x] < keys[y]; });
  std::vector<std::int64_t> sorted(plan.samples);
  for (std::int64_t i = 0; i < plan.samples; ++i) sorted[i] = keys[order[i]];
  std::vector<std::int64_t> segments(plan.buckets + 1);
  for (std::int64_t k = 0; k <= plan.buckets; ++k)
    segments[k] = msda::cuda::segment_start(sorted.data(), plan.samples, k);

  std::vector<double> grad(static_cast<std::size_t>(p.N * p.S * p.M * p.D), 0.0);
  for (std::int64_t item = 0; item < p.N * p.S * p.M; ++item) {
    const std::int64_t m = item % p.M, row = item / p.M % p.S, n = item / p.M / p.S;
    const LevelGeometry& g = levels[msda::cuda::level_of_row(levels.data(), p.L, row)];
    const std::int64_t h = (row - g.start) / g.width, w = (row - g.start) % g.width;
    for (int corner = 0; corner < (p.discrete ? 1 : 4); ++corner) {  // discrete: the pixel alone
      const int dh = corner >> 1, dw = corner & 1;
      const std::int64_t bucket = msda::cuda::pixel_bucket(g, n, m, p.M, plan.cells_per_head, h, w, dh, dw);
      for (std::int64_t i = segments[bucket]; i < segments[bucket + 1]; ++i) {
        const std::int64_t id = order[i];
        const auto c = corners(id, g);
        EXPECT_TRUE(c.inside);
        EXPECT_EQ(c.h0 + dh, h);
        EXPECT_EQ(c.w0 + dw, w);
        const double weight = a[id] * msda::cuda::corner_weight(c, dh, dw);
        const std::int64_t head = msda::cuda::site_of(id, levels.data(), p.L, p.K).head;
        for (std::int64_t d = 0; d < p.D; ++d) grad[item * p.D + d] += weight * t.grad_output.get(head * p.D + d);
      }
    }
  }
  return grad;
}

TEST(CudaBucketing, GatheredGradValueEqualsTheReference) {
  struct Setup {
    Shape shape;
    Locations kind;
  };
  const Setup setups[] = {
      {{2, 3, 5, 11, 4, {{7, 9}, {4, 5}, {1, 1}}}, Locations::mixed},
      {{1, 2, 3, 40, 3, {{3, 3}}}, Locations::cluster},       // heavy collisions
      {{1, 1, 2, 9, 2, {{8, 8}, {4, 4}}}, Locations::edges},  // the range rule's borders
      {{3, 2, 1, 5, 1, {{1, 1}, {2, 1}}}, Locations::wide},   // tiny maps, samples fully outside
      {{1, 2, 4, 30, 5, {{16, 8}}}, Locations::centres},      // integer corners
      {with_v2({2, 3, 5, 11, 1, {{7, 9}, {4, 5}, {1, 1}}}, {3, 6, 3}), Locations::mixed},
      {with_v2({1, 2, 3, 9, 1, {{8, 8}, {4, 4}, {2, 2}, {1, 2}}}, {1, 4, 2, 3}), Locations::edges},
      // Discrete: one pixel per sample, on boundaries (centres and edges are whole t = x*W + 0.5
      // on power-of-two maps), clamped from far outside, and NaN.
      {with_v2({2, 3, 5, 11, 1, {{8, 4}, {4, 2}, {1, 2}}}, {3, 6, 3}, msda::Sampling::discrete), Locations::mixed},
      {with_v2({1, 2, 3, 20, 1, {{8, 8}, {2, 4}}}, {2, 3}, msda::Sampling::discrete), Locations::centres},
      {with_v2({1, 2, 3, 20, 1, {{8, 8}, {2, 4}}}, {4, 1}, msda::Sampling::discrete), Locations::edges},
      {with_v2({1, 2, 3, 20, 4, {{3, 5}}}, {}, msda::Sampling::discrete), Locations::nonfinite},
      {with_v2({1, 2, 3, 40, 3, {{3, 3}}}, {}, msda::Sampling::discrete), Locations::cluster},
  };
  std::uint64_t index = 0;
  for (const Setup& s : setups) {
    const Case c = make_case(s.shape, {DType::f64, DType::f64, DType::f64}, s.kind, case_seed(index++));
    SCOPED_TRACE(c.label);
    Results expected(c.problem);
    msda::Options options;
    options.backend = msda::Backend::reference;
    msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(),
                   {expected.grad_value.data(), nullptr, nullptr}, options);
    EXPECT_TRUE(close(bucketed_grad_value(c.problem, c.tensors), expected.grad_value.to_double(), 1e-12));
  }
}

TEST(CudaBucketing, OutOfRangeSamplesSortLastAndAreNeverGathered) {
  const msda::Problem pr = make_problem({1, 1, 1, 1, 3, {{2, 2}}}, {});
  const msda::Params p = params_of(pr);
  const BucketPlan plan = msda::cuda::plan_buckets(p);
  const LevelGeometry g = msda::cuda::level_geometry(p)[0];
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const auto& [u, v] : {std::pair{nan, 0.5}, std::pair{-1.0, 0.0}, std::pair{0.0, 2.0}, std::pair{1e300, 0.0}}) {
    const auto c = msda::cuda::corners_at<double>(u, v, 2, 2);
    EXPECT_FALSE(c.inside);
    EXPECT_EQ(msda::cuda::sample_bucket(c, g, 0, 0, 1, plan.cells_per_head, plan.buckets), plan.buckets);
  }
  // Just inside the range rule: the top-left corner is (-1, -1), bucket 0.
  const auto c = msda::cuda::corners_at<double>(-0.5, -0.5, 2, 2);
  EXPECT_TRUE(c.inside);
  EXPECT_EQ(msda::cuda::sample_bucket(c, g, 0, 0, 1, plan.cells_per_head, plan.buckets), 0);
}

// What a build or machine without the cuda backend says when asked for it.
TEST(CudaApi, AskingForCudaWhereItCannotRunIsAnErrorNotACrash) {
  const Case c = make_case({1, 2, 2, 3, 2, {{3, 3}}}, {}, Locations::unit, case_seed(0));
  Results r(c.problem);
  msda::Options options;
  options.backend = msda::Backend::cuda;
  if (msda::cuda_available()) GTEST_SKIP() << "a CUDA device is visible: tests/cuda/ covers the backend";
  if (!msda::cuda_built()) {
    try {
      msda::forward(c.problem, c.tensors.inputs(), r.output.data(), options);
      FAIL() << "expected an Error";
    } catch (const msda::Error& e) {
      EXPECT_EQ(e.argument(), "options.backend");
    }
    return;
  }
  // Built with CUDA, but no device: the runtime's error, as an exception.
  EXPECT_THROW(msda::forward(c.problem, c.tensors.inputs(), r.output.data(), options), std::runtime_error);
  EXPECT_THROW(msda::backward(c.problem, c.tensors.inputs(), c.tensors.grad_output.data(), r.gradients(), options),
               std::runtime_error);
}

TEST(CudaApi, WorkspaceSizeIsZeroOffTheCudaBackendAndValidates) {
  const msda::Problem pr = make_problem({1, 2, 3, 2, 2, {{3, 3}}}, {});
  EXPECT_EQ(msda::workspace_size(pr, msda::Pass::backward), 0u);
  msda::Problem bad = pr;
  bad.points = 0;
  EXPECT_THROW(msda::workspace_size(bad, msda::Pass::forward), msda::Error);
  if (!msda::cuda_built()) return;
  msda::Options options;
  options.backend = msda::Backend::cuda;
  // The forward's workspace is the level table alone (one aligned region): no device needed to size it.
  EXPECT_EQ(msda::workspace_size(pr, msda::Pass::forward, options), 256u);
}

}  // namespace
