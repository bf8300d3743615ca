#include "plan.h"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <limits>

namespace msda::cuda {

namespace {

// A positive integer from the environment, or `fallback`.
std::int64_t from_environment(const char* name, std::int64_t fallback) {
  const char* text = std::getenv(name);
  if (!text) return fallback;
  const long long asked = std::atoll(text);
  return asked >= 1 ? std::min<std::int64_t>(asked, fallback) : fallback;
}

}  // namespace

std::int64_t max_blocks() {
  static const std::int64_t cap = from_environment("MSDA_CUDA_MAX_BLOCKS", kMaxBlocks);
  return cap;
}

std::int64_t chunk_records() {
  static const std::int64_t chunk = from_environment("MSDA_CUDA_CHUNK_RECORDS", kChunkRecords);
  return chunk;
}

ChannelMap channel_map(std::int64_t channels, std::size_t element_bytes, bool aligned) {
  ChannelMap map;
  // f64 stays scalar: two channels a lane would halve its lanes for no fewer memory transactions.
  const int vector = static_cast<int>(16 / element_bytes);
  if (aligned && element_bytes < 8 && channels % vector == 0) map.vector = vector;
  const std::int64_t slots = channels / map.vector;
  while (map.lanes < kWarpLanes && map.lanes < slots) map.lanes *= 2;
  return map;
}

Launch launch_for(std::int64_t items, int lanes) {
  Launch launch;
  launch.lanes = lanes;
  if (items <= 0) return launch;
  const std::int64_t per_block = kBlockThreads / lanes;
  launch.blocks = std::min(max_blocks(), (items + per_block - 1) / per_block);
  return launch;
}

Launch launch_flat(std::int64_t items) { return launch_for(items, 1); }

bool narrow_indexing(const Params& p) {
  constexpr std::int64_t kLimit = std::numeric_limits<std::int32_t>::max();
  const std::int64_t samples = p.N * p.Q * p.M * p.K;
  // Records (4 per sample) and box coordinates (4 per sample) bound every per-sample offset.
  return p.N * p.S * p.M * p.D < kLimit && p.N * p.Q * p.M * p.D < kLimit && samples < kLimit / 4 &&
         p.N * p.S * p.M < kLimit;
}

std::vector<LevelGeometry> level_geometry(const Params& params) {
  std::vector<LevelGeometry> levels;
  for (std::int64_t l = 0; l < params.L; ++l)
    levels.push_back({params.height[l], params.width[l], params.level_start[l], params.points[l],
                      params.point_start[l]});
  return levels;
}

RecordPlan plan_records(const Params& params) {
  RecordPlan plan;
  plan.samples = params.N * params.Q * params.M * params.K;  // validated: fits, and so does 4x (16 B per sample)
  plan.corners = params.discrete ? 1 : 4;
  plan.records = plan.samples * plan.corners;
  plan.rows = params.N * params.S * params.M;  // validated: N*S*M*D fits
  plan.chunk = chunk_records();
  plan.chunks = (plan.records + plan.chunk - 1) / plan.chunk;
  // The sentinel key `rows` must be representable too.
  plan.key_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(plan.rows))));
  constexpr std::int64_t kNarrow = std::numeric_limits<std::uint32_t>::max();
  plan.wide = plan.rows >= kNarrow || plan.records >= kNarrow;
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
  const std::int64_t samples = params.N * params.Q * params.M * params.K;
  Carver carve;
  Workspace w;
  w.levels = carve.take(count(params.L) * sizeof(LevelGeometry));
  if (!backward) {
    w.total = carve.total();
    return w;
  }
  if (params.grad_value) {
    if (params.cuda.deterministic) {
      const RecordPlan plan = plan_records(params);
      const std::size_t index = plan.wide ? 8 : 4;
      for (int b = 0; b < 2; ++b) {
        w.keys[b] = carve.take(count(plan.records) * index);
        w.ids[b] = carve.take(count(plan.records) * index);
      }
      w.coefficients = carve.take(count(plan.records) * real);
      w.partials = carve.take(count(plan.chunks) * 2 * count(params.D) * real);
      w.sort_scratch = carve.take(sort_scratch_bytes);
    } else if (params.problem->value_dtype == DType::bf16 || params.problem->value_dtype == DType::f16) {
      w.accumulator = carve.take(count(params.N * params.S * params.M * params.D) * sizeof(float));
    }
  }
  if (params.fused && params.wants_sample_gradients()) {
    w.weight_gradients = carve.take(count(samples) * real);
    if (params.grad_reference_points)
      w.reference_partials = carve.take(count(samples * params.reference_coords) * real);
  }
  w.total = carve.total();
  return w;
}

}  // namespace msda::cuda
