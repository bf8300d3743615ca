// The cuda backend's host-side arithmetic: how a head's channels map onto lanes, how many items a
// launch covers, how the deterministic grad_value's records are sized and chunked, and how one
// workspace is carved into regions. Pure C++, built in every configuration (with or without
// nvcc), so the CPU test suite checks it on machines that have no GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../params.h"
#include "bilinear.h"

namespace msda::cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarpLanes = 32;
// Grids are capped and kernels loop over their items (64-bit) in grid strides, so no size of N,
// Q, S or M turns into a launch dimension that overflows. The environment variable
// MSDA_CUDA_MAX_BLOCKS lowers the cap (read once): the tests set it to 1 so that every
// grid-stride loop takes many strides at test sizes.
constexpr std::int64_t kMaxBlocks = std::int64_t(1) << 20;
std::int64_t max_blocks();

// How a head's D channels map onto the lanes of the group that owns the head (or a chunk of
// grad_value records): each lane holds `vector` neighbouring channels, loaded as one 16-byte
// access (vector = 16 / element bytes) where every row is 16-byte aligned, else one channel
// (vector = 1, scalar loads); `lanes`, a power of two dividing the warp, the smallest that
// covers D / vector (at most 32: wider heads take several passes of 32 * vector channels). A
// warp holds 32 / lanes groups, so several heads share it: D = 32 in f32 is 8 lanes of float4,
// four heads per warp.
struct ChannelMap {
  int vector = 1;
  int lanes = 1;
};
// `aligned`: every tensor whose rows the kernels read or write by channel starts 16-byte aligned.
ChannelMap channel_map(std::int64_t channels, std::size_t element_bytes, bool aligned);

struct Launch {
  std::int64_t blocks = 0;  // 0: nothing to launch
  int threads = kBlockThreads;
  int lanes = 1;  // per item
};
// Blocks for `items` items of `lanes` threads each, capped at max_blocks().
Launch launch_for(std::int64_t items, int lanes);
// Blocks for `items` single-thread items.
Launch launch_flat(std::int64_t items);

// Whether every element offset of the problem (value, output, per-sample tensors, records) fits
// in int32: the kernels then index in 32 bits (fewer registers, cheaper address math), else in
// 64 (tensors over 2^31 elements, SPEC "Bad input").
bool narrow_indexing(const Params& params);

// A level as the kernels see it (written to the device by a kernel whose arguments carry it, so a
// captured CUDA graph replays with the table baked in, and no host buffer is read after the call
// returns). points and point_start: its P_l samples per head, at k in [point_start, point_start +
// points) of the head's K.
struct LevelGeometry {
  std::int64_t height, width, start, points, point_start;
};
std::vector<LevelGeometry> level_geometry(const Params& params);
// Levels per upload kernel's argument (48 bytes each, well inside the 4 KB argument space).
constexpr int kLevelsPerUpload = 16;
struct LevelUpload {
  LevelGeometry levels[kLevelsPerUpload];
  int count;
};

// Deterministic grad_value. The sample-gradient kernel writes one record per (sample, corner) it
// reads: a key, the grad_value row it adds to ((n*S + row)*M + m, in units of D), and a
// coefficient (a * the corner's bilinear weight); a corner the sample does not read gets the key
// `rows`, which sorts after every real row. A stable radix sort by key puts each row's records
// together in record order; fixed-size chunks of the sorted list are summed by one group each
// (a row wholly inside a chunk is written there), and a row that spans chunks is the sum of its
// pieces' partials in chunk order. Every element is written by one group in an order fixed by the
// records, so the result is the same bits on every run, and the time follows the number of
// samples: a row shared by a thousand samples is a few chunks, not a thousand serial steps.
constexpr std::int64_t kChunkRecords = 128;
// kChunkRecords, or MSDA_CUDA_CHUNK_RECORDS where set (read once): the tests set a few records,
// so that rows span many chunks at test sizes.
std::int64_t chunk_records();
struct RecordPlan {
  std::int64_t samples = 0;   // N*Q*M*K
  int corners = 4;            // records per sample: 4, or 1 for discrete sampling (its pixel)
  std::int64_t records = 0;   // samples * corners
  std::int64_t rows = 0;      // N*S*M: grad_value's rows, and the key of an unread corner
  std::int64_t chunk = 0;     // records per chunk: chunk_records()
  std::int64_t chunks = 0;    // ceil(records / chunk)
  int key_bits = 0;           // bits the radix sort must look at: enough for `rows`
  bool wide = false;          // keys or record ids need 64 bits
};
RecordPlan plan_records(const Params& params);

struct Region {
  std::size_t offset = 0, bytes = 0;
};

// One call's workspace, every region aligned to 256 bytes. Regions a pass does not use are empty.
struct Workspace {
  Region levels;              // LevelGeometry[L]
  Region keys[2], ids[2];     // deterministic grad_value: the radix sort's double buffers
  Region coefficients;        // deterministic grad_value: per record, in the math type
  Region partials;            // deterministic grad_value: per chunk, its first and last piece [2][D]
  Region sort_scratch;        // deterministic grad_value: the sort's own scratch
  Region accumulator;         // atomic grad_value of bf16/f16 value: an f32 copy to add into
  Region weight_gradients;    // fused: per sample dL/da in the math type, for the softmax's backward
  Region reference_partials;  // fused: per sample [coords] in the math type, summed over m and p after
  std::size_t total = 0;
};

// Bytes of the math type: double for f64 value, float for the others (SPEC "Precision").
std::size_t math_bytes(const Params& params);

// The workspace of a pass; sort_scratch_bytes is what the sort asked for (a device query, made by
// the caller). `backward` tells the deterministic grad_value's regions from the atomic one's.
Workspace plan_workspace(const Params& params, bool backward, std::size_t sort_scratch_bytes);

}  // namespace msda::cuda
