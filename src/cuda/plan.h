// The cuda backend's host-side arithmetic: how work maps onto thread groups, how samples map onto
// buckets for the deterministic backward, and how one workspace is carved into regions. Pure C++,
// built in every configuration (with or without nvcc), so the CPU test suite checks it on
// machines that have no GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../params.h"
#include "bilinear.h"

namespace msda::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpLanes = 32;
// Grids are capped and kernels loop over their items (64-bit) in grid strides, so no size of N,
// Q, S or M turns into a launch dimension that overflows.
constexpr std::int64_t kMaxBlocks = std::int64_t(1) << 20;

// The lanes that share one item (a query's head, or one row of value): the channels of that head
// are spread over them, so neighbouring lanes read neighbouring channels (one coalesced access
// per corner). A power of two that divides the warp: the smallest that covers D, at most 32.
int group_lanes(std::int64_t channels);

struct Launch {
  std::int64_t blocks = 0;  // 0: nothing to launch
  int threads = kBlockThreads;
  int lanes = 1;  // per item
};
// Blocks for `items` items of `lanes` threads each, capped at kMaxBlocks.
Launch launch_for(std::int64_t items, int lanes);
// Blocks for `items` single-thread items.
Launch launch_flat(std::int64_t items);

// A level as the kernels see it (copied to the device once per call). cell_start: the level's
// first bucket among the cells of one (n, m) (see BucketPlan). points and point_start: its P_l
// samples per head, at k in [point_start, point_start + points) of the head's K.
struct LevelGeometry {
  std::int64_t height, width, start, cell_start, points, point_start;
};

// The deterministic backward buckets every in-range sample by its top-left corner (h0, w0),
// which runs from (-1, -1) to (H-1, W-1): (H+1) x (W+1) cells per level, per (n, m). The pixel
// (h, w) is a corner of the samples in exactly four cells: (h, w) (as their bottom-right corner),
// (h, w+1), (h+1, w) and (h+1, w+1) in cell coordinates (h0+1, w0+1). A sample zeroed by the
// range rule gets the key `buckets`, which sorts after every real bucket. A discrete sample's
// pixel is its top-left corner, so it goes in cell (h0+1, w0+1) like any other; the gather of a
// discrete problem reads a pixel's own cell alone, since the samples in its other three cells
// read other pixels.
struct BucketPlan {
  std::int64_t samples = 0;         // N*Q*M*K
  std::int64_t cells_per_head = 0;  // sum over levels of (H+1)*(W+1)
  std::int64_t buckets = 0;         // N*M*cells_per_head
  int key_bits = 0;                 // bits the radix sort must look at: enough for `buckets`
  bool wide = false;                // keys or sample ids (up to `samples`) need 64 bits
};
BucketPlan plan_buckets(const Params& params);
// The levels with their cell_start filled in.
std::vector<LevelGeometry> level_geometry(const Params& params);

// The bucket of a sample of head (n, m) on `level`: the cell of its top-left corner, or
// `buckets` (sorted last, never gathered) when the range rule zeroes it.
template <class A>
MSDA_HD std::int64_t sample_bucket(const Corners<A>& c, const LevelGeometry& level, std::int64_t n, std::int64_t m,
                                   std::int64_t M, std::int64_t cells_per_head, std::int64_t buckets) {
  if (!c.inside) return buckets;
  return (n * M + m) * cells_per_head + level.cell_start + (c.h0 + 1) * (level.width + 1) + (c.w0 + 1);
}

// The bucket holding the samples of which pixel (h, w) of `level` is corner (dh, dw): those
// whose top-left corner is (h - dh, w - dw).
MSDA_HD std::int64_t pixel_bucket(const LevelGeometry& level, std::int64_t n, std::int64_t m, std::int64_t M,
                                  std::int64_t cells_per_head, std::int64_t h, std::int64_t w, int dh, int dw) {
  return (n * M + m) * cells_per_head + level.cell_start + (h - dh + 1) * (level.width + 1) + (w - dw + 1);
}

struct Region {
  std::size_t offset = 0, bytes = 0;
};

// One call's workspace, every region aligned to 256 bytes. Regions a pass does not use are empty.
struct Workspace {
  Region levels;              // LevelGeometry[L]
  Region softmax;             // fused: per (n, q, m) {max logit, 1 / sum of exp} in the math type
  Region samples;             // deterministic grad_value: a Place per sample (bilinear.h)
  Region keys[2], ids[2];     // deterministic grad_value: the radix sort's double buffers
  Region segments;            // deterministic grad_value: buckets + 1 sample positions
  Region sort_scratch;        // deterministic grad_value: the sort's own scratch
  Region accumulator;         // atomic grad_value of bf16/f16 value: an f32 copy to add into
  Region weight_gradients;    // fused: per sample dL/da in the math type, for the softmax's backward
  Region reference_partials;  // fused: [N, Q, M, L, coords] in the math type, summed over m after
  std::size_t total = 0;
};

// Bytes of the math type: double for f64 value, float for the others (SPEC "Precision").
std::size_t math_bytes(const Params& params);

// The workspace of a pass; sort_scratch_bytes is what the sort asked for (a device query, made by
// the caller). `backward` tells the deterministic grad_value's regions from the atomic one's.
Workspace plan_workspace(const Params& params, bool backward, std::size_t sort_scratch_bytes);

}  // namespace msda::cuda
