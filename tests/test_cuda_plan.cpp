// The cuda backend's host-side planning, as far as a machine without a GPU can check it: how
// channels map onto lanes, launches, record and workspace sizes, index widths, and the
// geometry functions the kernels call (src/cuda/bilinear.h, plan.h). The kernels themselves run
// in the emulation (tests/test_cuda_emulated*.cpp); tests that need a device are in tests/cuda/.
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

using msda::cuda::RecordPlan;
using msda::cuda::LevelGeometry;
using msda::cuda::Region;
using msda::cuda::Workspace;
using namespace msda_test;

msda::Params params_of(const msda::Problem& problem) { return msda::cuda_emulation::params_for(problem); }

TEST(CudaPlan, ChannelMapsLoadSixteenBytesALaneWhereRowsAreAligned) {
  using msda::cuda::channel_map;
  // D = 32: 8 lanes of float4, 4 lanes of 8 bf16; scalar where unaligned or D is no multiple.
  EXPECT_EQ(channel_map(32, 4, true).vector, 4);
  EXPECT_EQ(channel_map(32, 4, true).lanes, 8);
  EXPECT_EQ(channel_map(32, 2, true).vector, 8);
  EXPECT_EQ(channel_map(32, 2, true).lanes, 4);
  EXPECT_EQ(channel_map(32, 4, false).vector, 1);
  EXPECT_EQ(channel_map(32, 4, false).lanes, 32);
  EXPECT_EQ(channel_map(30, 4, true).vector, 1);
  EXPECT_EQ(channel_map(32, 8, true).vector, 1);  // f64 stays scalar
  EXPECT_EQ(channel_map(256, 4, true).lanes, 32);  // several passes of 128 channels
  EXPECT_EQ(channel_map(3, 4, true).lanes, 4);
  EXPECT_EQ(channel_map(4, 4, true).lanes, 1);
  for (std::int64_t d = 1; d < 300; ++d)
    for (std::size_t bytes : {2u, 4u, 8u})
      for (bool aligned : {false, true}) {
        const msda::cuda::ChannelMap map = channel_map(d, bytes, aligned);
        EXPECT_EQ(32 % map.lanes, 0) << d;  // groups never straddle a warp
        EXPECT_EQ(d % map.vector, 0) << d;  // no lane's vector crosses the head's end
        // The fewest lanes that cover D (or 32, with passes).
        EXPECT_TRUE(map.lanes == 32 || map.lanes * map.vector >= d) << d;
        EXPECT_TRUE(map.lanes == 1 || (map.lanes / 2) * map.vector < d) << d;
      }
}

TEST(CudaPlan, NarrowIndexingOnlyWhereEveryOffsetFitsThirtyTwoBits) {
  EXPECT_TRUE(msda::cuda::narrow_indexing(params_of(make_problem({2, 3, 8, 7, 4, {{6, 5}, {3, 3}}}, {}))));
  // value of 2^31 elements: 64-bit offsets.
  EXPECT_FALSE(msda::cuda::narrow_indexing(params_of(make_problem({1, 1, 8, 1, 1, {{1 << 14, 1 << 14}}}, {}))));
  // 2^29 samples: 2^31 records.
  EXPECT_FALSE(msda::cuda::narrow_indexing(params_of(make_problem({1, 1, 1, 1 << 25, 16, {{2, 2}}}, {}))));
  EXPECT_TRUE(msda::cuda::narrow_indexing(params_of(make_problem({1, 1, 1, 1 << 20, 16, {{2, 2}}}, {}))));
}

TEST(CudaPlan, LaunchesCoverEveryItemWithinTheGridLimit) {
  EXPECT_EQ(msda::cuda::launch_for(0, 32).blocks, 0);
  const msda::cuda::Launch small = msda::cuda::launch_for(10, 32);  // 8 groups of 32 per block
  EXPECT_EQ(small.blocks, 2);
  EXPECT_EQ(small.threads, msda::cuda::kBlockThreads);
  EXPECT_EQ(msda::cuda::launch_flat(257).blocks, 2);
  // Past the cap the kernels loop: the grid stays within CUDA's x limit (2^31 - 1).
  const msda::cuda::Launch huge = msda::cuda::launch_for(std::int64_t(1) << 50, 1);
  EXPECT_EQ(huge.blocks, msda::cuda::max_blocks());
  EXPECT_LT(huge.blocks, std::int64_t(1) << 31);
}

TEST(CudaPlan, RecordsAreFourCornersASampleOrOneDiscretePixel) {
  const msda::Problem pr = make_problem({2, 3, 4, 5, 2, {{3, 4}, {1, 1}}}, {});
  const msda::Params p = params_of(pr);
  const RecordPlan plan = msda::cuda::plan_records(p);
  EXPECT_EQ(plan.samples, 2 * 5 * 3 * 2 * 2);
  EXPECT_EQ(plan.records, plan.samples * 4);
  EXPECT_EQ(plan.rows, 2 * 13 * 3);
  EXPECT_EQ(plan.chunk, msda::cuda::chunk_records());
  EXPECT_EQ(plan.chunks, (plan.records + plan.chunk - 1) / plan.chunk);
  EXPECT_FALSE(plan.wide);
  EXPECT_GE(std::uint64_t(1) << plan.key_bits, std::uint64_t(plan.rows) + 1);  // the sentinel fits
  const std::vector<LevelGeometry> levels = msda::cuda::level_geometry(p);
  ASSERT_EQ(levels.size(), 2u);
  EXPECT_EQ(levels[1].start, 12);
  const RecordPlan discrete = msda::cuda::plan_records(
      params_of(make_problem(with_v2({2, 3, 4, 5, 2, {{3, 4}, {1, 1}}}, {}, msda::Sampling::discrete), {})));
  EXPECT_EQ(discrete.records, discrete.samples);
}

TEST(CudaPlan, SixtyFourBitKeysAndIdsWhenThirtyTwoDoNotHold) {
  // 2^32 records: ids need 64 bits though the rows are few.
  msda::Problem pr = make_problem({1, 1, 1, std::int64_t(1) << 26, 16, {{2, 2}}}, {});
  EXPECT_TRUE(msda::cuda::plan_records(params_of(pr)).wide);
  pr.queries = (std::int64_t(1) << 26) - 1;
  EXPECT_FALSE(msda::cuda::plan_records(params_of(pr)).wide);
  // Many rows: 2^32 + a few.
  const std::int64_t side = (std::int64_t(1) << 16) + 1;
  const msda::Problem maps = make_problem({1, 1, 1, 1, 1, {{side, side}}}, {});
  const RecordPlan plan = msda::cuda::plan_records(params_of(maps));
  EXPECT_TRUE(plan.wide);
  EXPECT_EQ(plan.key_bits, 33);
}

void expect_well_formed(const Workspace& w) {
  const Region all[] = {w.levels,       w.keys[0],     w.keys[1],          w.ids[0],
                        w.ids[1],       w.coefficients, w.partials,        w.sort_scratch,
                        w.accumulator,  w.weight_gradients, w.reference_partials};
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
  const std::size_t records = samples * 4;
  const std::size_t chunks = (records + msda::cuda::chunk_records() - 1) / msda::cuda::chunk_records();

  const Workspace forward = msda::cuda::plan_workspace(p, false, 0);
  expect_well_formed(forward);
  EXPECT_EQ(forward.levels.bytes, 2 * sizeof(LevelGeometry));
  EXPECT_EQ(forward.total, 256u);  // the level table alone: the fused softmax is the group's

  char wanted;
  p.grad_value = &wanted;
  p.grad_locations = &wanted;
  const Workspace deterministic = msda::cuda::plan_workspace(p, true, 1000);
  expect_well_formed(deterministic);
  EXPECT_EQ(deterministic.keys[1].bytes, records * 4);
  EXPECT_EQ(deterministic.ids[0].bytes, records * 4);
  EXPECT_EQ(deterministic.coefficients.bytes, records * 4);
  EXPECT_EQ(deterministic.partials.bytes, chunks * 2 * 5 * 4);
  EXPECT_EQ(deterministic.sort_scratch.bytes, 1000u);
  EXPECT_EQ(deterministic.accumulator.bytes, 0u);

  p.cuda.deterministic = false;  // f32 atomics add into grad_value itself
  const Workspace atomic = msda::cuda::plan_workspace(p, true, 0);
  expect_well_formed(atomic);
  EXPECT_EQ(atomic.coefficients.bytes + atomic.keys[0].bytes + atomic.accumulator.bytes, 0u);

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
  EXPECT_EQ(fused.coefficients.bytes, records * 8);  // in double
  EXPECT_EQ(fused.partials.bytes, chunks * 2 * 5 * 8);
  EXPECT_EQ(fused.weight_gradients.bytes, std::size_t(samples) * 8);
  EXPECT_EQ(fused.reference_partials.bytes, std::size_t(samples) * 4 * 8);

  // Points per level: every per-sample region has K = 3 + 6 + 3 samples per head.
  msda::Problem v2 = make_problem(with_v2({2, 3, 5, 7, 1, {{6, 5}, {3, 3}, {2, 2}}}, {3, 6, 3}), {});
  msda::Params pv = params_of(v2);
  pv.fused = true;
  pv.grad_value = pv.grad_logits = &wanted;
  const Workspace per_level = msda::cuda::plan_workspace(pv, true, 64);
  expect_well_formed(per_level);
  const std::size_t v2_samples = 2 * 7 * 3 * 12;
  EXPECT_EQ(per_level.keys[0].bytes, v2_samples * 4 * 4);
  EXPECT_EQ(per_level.weight_gradients.bytes, v2_samples * 4);
}

TEST(CudaPlan, LevelLookups) {
  const LevelGeometry levels[] = {{2, 3, 0, 1, 0}, {1, 1, 6, 4, 1}, {2, 2, 7, 2, 5}};
  const std::int64_t level_of_point[] = {0, 1, 1, 1, 1, 2, 2};
  for (std::int64_t k = 0; k < 7; ++k)
    EXPECT_EQ(msda::cuda::last_level_at_or_below(levels, 3, &LevelGeometry::point_start, k), level_of_point[k]);
  const std::int64_t level_of_row[] = {0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2};
  for (std::int64_t row = 0; row < 11; ++row)
    EXPECT_EQ(msda::cuda::last_level_at_or_below(levels, 3, &LevelGeometry::start, row), level_of_row[row]);
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
  EXPECT_EQ(msda::cuda::plan_records(p).samples, samples);
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
