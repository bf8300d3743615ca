#include "plan.h"

#include <algorithm>
#include <bit>
#include <limits>

namespace msda::cuda {

int group_lanes(std::int64_t channels) {
  int lanes = 1;
  while (lanes < kWarpLanes && lanes < channels) lanes *= 2;
  return lanes;
}

Launch launch_for(std::int64_t items, int lanes) {
  Launch launch;
  launch.lanes = lanes;
  if (items <= 0) return launch;
  const std::int64_t per_block = kBlockThreads / lanes;
  launch.blocks = std::min(kMaxBlocks, (items + per_block - 1) / per_block);
  return launch;
}

Launch launch_flat(std::int64_t items) { return launch_for(items, 1); }

std::vector<LevelGeometry> level_geometry(const Params& params) {
  std::vector<LevelGeometry> levels;
  std::int64_t cells = 0;
  for (std::int64_t l = 0; l < params.L; ++l) {
    levels.push_back({params.height[l], params.width[l], params.level_start[l], cells, params.points[l],
                      params.point_start[l]});
    cells += (params.height[l] + 1) * (params.width[l] + 1);
  }
  return levels;
}

BucketPlan plan_buckets(const Params& params) {
  BucketPlan plan;
  plan.samples = params.N * params.Q * params.M * params.K;  // validated: fits
  // (H+1)*(W+1) can exceed the validated H*W only by H+W+1 per level, and the sum of H*W*M*N*D
  // fits in 64 bits, so these products overflow only for problems no device holds; check anyway.
  bool overflow = false;
  for (std::int64_t l = 0; l < params.L; ++l) {
    std::int64_t cells = 0;
    overflow |= __builtin_mul_overflow(params.height[l] + 1, params.width[l] + 1, &cells);
    overflow |= __builtin_add_overflow(plan.cells_per_head, cells, &plan.cells_per_head);
  }
  overflow |= __builtin_mul_overflow(params.N * params.M, plan.cells_per_head, &plan.buckets);
  // The sentinel key `buckets` must be representable too.
  if (overflow || plan.buckets == std::numeric_limits<std::int64_t>::max())
    throw Error("spatial_shapes", "(H+1)*(W+1) cells per level times N*M to fit in 64 bits", "an overflow");
  plan.key_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(plan.buckets))));
  constexpr std::int64_t kNarrow = std::numeric_limits<std::uint32_t>::max();
  plan.wide = plan.buckets >= kNarrow || plan.samples >= kNarrow;
  return plan;
}

std::size_t math_bytes(const Params& params) { return params.problem->value_dtype == DType::f64 ? 8 : 4; }

namespace {

constexpr std::size_t kAlign = 256;

class Carver {
 public:
  Region take(std::size_t bytes) {
    if (bytes == 0) return {};
    Region r{total_, bytes};
    total_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return r;
  }
  std::size_t total() const { return total_; }

 private:
  std::size_t total_ = 0;
};

}  // namespace

Workspace plan_workspace(const Params& params, bool backward, std::size_t sort_scratch_bytes) {
  const std::size_t real = math_bytes(params);
  const auto count = [](std::int64_t n) { return static_cast<std::size_t>(n); };
  const std::int64_t heads = params.N * params.Q * params.M;
  const std::int64_t samples = heads * params.K;
  Carver carve;
  Workspace w;
  w.levels = carve.take(count(params.L) * sizeof(LevelGeometry));
  if (params.fused) w.softmax = carve.take(count(heads) * 2 * real);
  if (!backward) {
    w.total = carve.total();
    return w;
  }
  if (params.grad_value) {
    if (params.cuda.deterministic) {
      const BucketPlan plan = plan_buckets(params);
      const std::size_t index = plan.wide ? 8 : 4;
      w.samples = carve.take(count(samples) * (real == 8 ? sizeof(Place<double>) : sizeof(Place<float>)));
      for (int b = 0; b < 2; ++b) {
        w.keys[b] = carve.take(count(samples) * index);
        w.ids[b] = carve.take(count(samples) * index);
      }
      w.segments = carve.take(count(plan.buckets + 1) * index);
      w.sort_scratch = carve.take(sort_scratch_bytes);
    } else if (params.problem->value_dtype == DType::bf16 || params.problem->value_dtype == DType::f16) {
      w.accumulator = carve.take(count(params.N * params.S * params.M * params.D) * sizeof(float));
    }
  }
  if (params.fused && params.wants_sample_gradients()) {
    w.weight_gradients = carve.take(count(samples) * real);
    if (params.grad_reference_points)
      w.reference_partials = carve.take(count(heads * params.L * params.reference_coords) * real);
  }
  w.total = carve.total();
  return w;
}

}  // namespace msda::cuda
