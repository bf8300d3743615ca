// The CPU backend: OpenMP threads, SIMD kernels compiled for several instruction sets and picked
// at run time, 64-bit offsets, deterministic at any thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace msda::cpu {

// Parallel over (n, q): each output row is written by one thread, summed in a fixed order.
void forward(const Params& params);

// Parallel over the N*M*L parts (batch, head, level): a part owns the grad_value rows of its
// level and head, and the location and weight gradients of its samples, so no two threads ever
// add into the same element and the sums run in the same order whatever the thread count.
void backward(const Params& params);

// The fused op's backward: backward() in fused mode, whose kernel applies the chain rule through
// the softmax and the location arithmetic row by row, then the sum over heads of the
// reference-point gradients (fused_epilogue in kernels.inl).
void backward_fused(const Params& params);

// Where a backward part sums a level's grad_value rows (CpuTuning::Scatter, plan_scatter).
enum class RowSum : char { copy, in_place, owner };

// Bytes of one owner-computes corner record, at most (kernels.inl, CornerRecord).
inline constexpr std::size_t kCornerRecordBytes = 16;

// Bytes rounded up to a whole number of 64-byte cache lines: every array of a thread's slice starts
// on a line of its own.
inline constexpr std::size_t round_up_to_line(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

// Where the owner-computes area's arrays start within it, and its size (Scratch::owner_at).
struct OwnerLayout {
  std::size_t records, bucketed, ends, bytes;  // the grad_output rows start at 0
};
inline OwnerLayout owner_layout(std::int64_t queries, std::int64_t D, std::size_t compute_bytes,
                                std::int64_t records, std::int64_t rows) {
  constexpr auto round_up = round_up_to_line;
  OwnerLayout o;
  o.records = round_up(static_cast<std::size_t>(queries * D) * compute_bytes);
  o.bucketed = o.records + round_up(static_cast<std::size_t>(records) * kCornerRecordBytes);
  o.ends = o.bucketed + round_up(static_cast<std::size_t>(records) * kCornerRecordBytes);
  o.bytes = o.ends + round_up(static_cast<std::size_t>(rows + 1) * sizeof(std::int32_t));
  return o;
}

// The geometry groups of a thread (kernels.inl): a row's samples are loaded two rows ahead of its
// sum and located one row ahead, each row in its own group. The location step's vector reads then
// find the loads' stores long since in the cache: read at once, the lanes written one at a time
// (a K that is not a whole number of vectors: 12 on m2f-enc and rtdetr-dec) could not be
// forwarded from the store buffer and stalled the core until the stores had drained.
constexpr int kGroups = 3;

// The most lanes of any target's vectors (f32 on AVX-512): the padding that lets kernels read and
// write whole vectors of a query's samples.
inline constexpr std::int64_t kMaxLanes = 16;

// The backward's gradients of one query's K samples, in a thread's scratch: grads_stride(K) weight
// gradients, then 2 grads_stride(K) location gradients (x, y interleaved). K rounded up to
// kMaxLanes, so that whole vectors of gradients can be stored: lanes past the last sample land in
// the padding.
constexpr std::int64_t grads_stride(std::int64_t K) { return (K + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }

// Per-thread working memory, allocated by the dispatcher before any parallel region (so that a
// bad_alloc reaches the caller) and handed to the kernels. Each thread's slice is laid out as
// [channels | kGroups groups | grads | extra | zero row | head rows | owner]: one row of D
// channels (runtime D), the geometry of kGroups groups of samples (kernels.inl), the backward's
// gradients of one query with its spare row at their end (grads_bytes), kernel-specific arrays,
// then (staged) a row of zeros and the copy of one head's value rows, then (backward,
// owner-computes) OwnerLayout's arrays.
struct Scratch {
  std::byte* base = nullptr;
  std::size_t stride = 0;          // bytes per thread, a multiple of 64 (no false sharing)
  std::size_t channels_bytes = 0;  // D elements of the widest compute type
  std::size_t group_bytes = 0;     // kGroupBytesPerSample per sample of a group (kGroups per thread)
  std::size_t grads_bytes = 0;     // backward: 3 grads_stride(K) gradients of one query, then the spare row
  std::int64_t group_capacity = 0; // samples per geometry group, a multiple of 8, K + kMaxLanes or more
  std::int64_t levels_per_part = 0; // backward: levels of one part (all of them, or 1)
  std::int64_t query_parts = 1;     // backward without grad_value: query ranges per part
  std::int64_t band_rows = 0;       // backward scatter: rows per band of a level (0: no bands)
  std::int64_t bands = 1;
  // Backward: per level, where its grad_value rows are summed (cpu.cpp, plan_scatter); L
  // entries, or null when every level is summed in the copy.
  const RowSum* row_sums = nullptr;
  // Owner-computes levels: where in a thread's slice its area starts (0: no such level), laid out
  // as [grad_output rows of the part's queries, [Q, D] of the compute type | corner records |
  // the records bucketed by row | bucket ends, one int32 per row of a part + 1].
  std::size_t owner_at = 0;
  std::int64_t owner_records = 0;  // records a part may make (its owner levels' in-range corners)
  std::int64_t owner_rows = 0;     // rows of a part (or band)
  // Staged gathers (CpuTuning::staging): where in a thread's slice the copy of the value rows of
  // the head it works on starts, [rows, D] of the value type, with room for one row before it
  // (the backward's zero row); 0: the gathers read value directly.
  std::size_t head_rows_at = 0;
  // Backward and staged forward: the order a part walks its queries, Q entries (a permutation
  // of [0, Q)), or null: 0, 1, ... (cpu.cpp, query_walk).
  const std::int64_t* query_order = nullptr;
  std::byte* for_thread(int thread) const { return base + static_cast<std::size_t>(thread) * stride; }
};

// Upper bound of the geometry arrays per sample (kernels.inl, Group): 22 doubles (16 of them for
// the fused op: 8 are softmax rows computed ahead), 6 int64 and 6 values of the compute type.
inline constexpr std::size_t kGroupBytesPerSample = 22 * 8 + 6 * 8 + 6 * 8;

// The kernels of each instruction set (src/cpu/targets/*.cpp).
#define MSDA_DECLARE_TARGET(target)                              \
  namespace target {                                             \
  void forward(const Params& params, const Scratch& scratch);    \
  void backward(const Params& params, const Scratch& scratch);   \
  void fused_epilogue(const Params& params, const Scratch& scratch); \
  }
MSDA_DECLARE_TARGET(baseline)
MSDA_DECLARE_TARGET(avx2)
MSDA_DECLARE_TARGET(avx512)
MSDA_DECLARE_TARGET(neon)
MSDA_DECLARE_TARGET(sve256)
#undef MSDA_DECLARE_TARGET

}  // namespace msda::cpu
