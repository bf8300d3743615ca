// Runtime dispatch of the CPU backend: picks the instruction set, sizes and allocates scratch.
#include "cpu/cpu.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the last-level cache's size
#endif

// CMakeLists.txt builds the targets of one architecture and says which; a compiler aimed at
// another one would leave the table below pointing at kernels that were never built.
#if defined(MSDA_CPU_TARGETS_X86) && !defined(__x86_64__)
#error "MSDA_CPU_TARGETS_X86 set for a compiler that does not target x86-64"
#endif
#if defined(MSDA_CPU_TARGETS_ARM64)
#if !defined(__aarch64__)
#error "MSDA_CPU_TARGETS_ARM64 set for a compiler that does not target AArch64"
#endif
#if defined(__linux__)
#include <sys/auxv.h>
#include <sys/prctl.h>
#endif
#endif

namespace msda::cpu {
namespace {

struct Target {
  Isa isa;
  void (*forward)(const Params&, const Scratch&);
  void (*backward)(const Params&, const Scratch&);
  void (*fused_epilogue)(const Params&, const Scratch&);
};

#if defined(MSDA_CPU_TARGETS_ARM64)
// The calling thread's SVE vector length in bytes; 0 without SVE or without a way to ask (other
// systems than Linux: the kernels then stay on NEON). Linux gives each thread its own length,
// inherited from the thread that created it, so OpenMP's workers have the caller's unless the
// program changes it with prctl(PR_SVE_SET_VL) on some threads only, which msda does not support.
// Asked on every call (a system call, small beside the call's allocations), never cached: a
// program may set the length after msda first ran.
unsigned sve_vector_bytes() {
#if defined(__linux__) && defined(HWCAP_SVE) && defined(PR_SVE_GET_VL)
  if (!(getauxval(AT_HWCAP) & HWCAP_SVE)) return 0;
  const int vl = prctl(PR_SVE_GET_VL, 0, 0, 0, 0);
  return vl < 0 ? 0u : static_cast<unsigned>(vl & PR_SVE_VL_LEN_MASK);
#else
  return 0;
#endif
}
#endif

bool supported(Isa isa) {
  switch (isa) {
#if defined(MSDA_CPU_TARGETS_X86)
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
#endif
#if defined(MSDA_CPU_TARGETS_ARM64)
    case Isa::neon: return true;  // Advanced SIMD is part of every AArch64 CPU
    // Built for exactly 256-bit registers (CMakeLists.txt): at another length the lane counts,
    // permutations and whole-register moves of that code are wrong, so it is not used there.
    case Isa::sve256: return sve_vector_bytes() == 32;
#endif
    case Isa::baseline:
    case Isa::best: return true;
    default: return false;  // another architecture's
  }
}

Target target_for(Isa requested) {
  // Widest first: `best` takes the first one this CPU supports.
  const Target targets[] = {
#if defined(MSDA_CPU_TARGETS_X86)
      {Isa::avx512, avx512::forward, avx512::backward, avx512::fused_epilogue},
      {Isa::avx2, avx2::forward, avx2::backward, avx2::fused_epilogue},
#endif
#if defined(MSDA_CPU_TARGETS_ARM64)
      {Isa::sve256, sve256::forward, sve256::backward, sve256::fused_epilogue},
      {Isa::neon, neon::forward, neon::backward, neon::fused_epilogue},
#endif
      {Isa::baseline, baseline::forward, baseline::backward, baseline::fused_epilogue}};
  for (const Target& t : targets)
    if ((requested == Isa::best || requested == t.isa) && supported(t.isa)) return t;
  std::string accepted = "best";
  for (auto t = std::rbegin(targets); t != std::rend(targets); ++t)
    if (supported(t->isa)) accepted += ", " + std::string(name(t->isa));
  throw Error("options.isa", "an instruction set this CPU supports (" + accepted + ")", std::string(name(requested)));
}

// How the backward splits its work into parts (see backward() below). Every field is chosen from
// the problem and the thread count only; none changes the order of any sum.
struct BackwardPlan {
  std::int64_t levels_per_part = 1;  // all levels (a (batch, head) part) or 1
  std::int64_t query_parts = 1;      // > 1 only without grad_value
  std::int64_t band_rows = 0;        // grad_value rows per band of a level; 0: whole levels
  std::int64_t bands = 1;
  // Per level, where its rows are summed; empty without grad_value.
  std::vector<RowSum> row_sums;
  bool any(RowSum how) const { return std::find(row_sums.begin(), row_sums.end(), how) != row_sums.end(); }
  std::int64_t owner_records = 0;  // corner records a part may make (Scratch::owner_records)
};

std::int64_t compute_bytes(const Params& p) { return p.problem->value_dtype == DType::f64 ? 8 : 4; }

std::int64_t max_level_rows(const Params& p) {
  std::int64_t rows = 0;
  for (std::int64_t l = 0; l < p.L; ++l) rows = std::max(rows, p.height[l] * p.width[l]);
  return rows;
}

// The corners a (batch, head)'s samples touch, Q*K*4 (64 bits for any valid problem): against
// k * S, whether its rows of value and grad_value get at least k corners each on average, the
// density that decides where the backward sums (plan_scatter) and whether gathers are staged.
std::int64_t corners_per_head(const Params& p) { return p.Q * p.K * 4; }

// Corners per grad_value row of a level, on average, up to which f32 and f64 sum that level in
// place (plan_scatter): 1, or 2 where value and grad_value together fit in half the last-level
// cache. The in-place read-modify-writes are then cache hits, and the copy's own passes (zeroing
// its rows, storing them out) cost more than they save: Intel Xeon (480 MiB L3), dino-dec, whose
// finest level gets 1.1 corners per row, 4.39-4.64 against 3.68-3.76 ms, ddetr-dec (1.4 on its
// second level) 1.74-1.78 against 1.56-1.63. On an AMD EPYC VM, where the 36 MB of those maps
// did not fit, in place at 1.1 was 12-18% slower (docs/performance.md, "What did not pay").
constexpr std::int64_t kInPlaceCornersPerRow = 1;
constexpr std::int64_t kInPlaceCornersPerRowInCache = 2;

// A thread's owner-computes arrays (OwnerLayout: its grad_output rows, two copies of a part's
// records, the bucket ends of its rows) are at most this large; a problem whose would be larger sums those levels in the copy.
constexpr std::int64_t kOwnerBudgetBytes = std::int64_t(64) << 20;

// The last-level cache's size as the C library reports it; 0 where it does not (the rule above
// then stays at its smaller threshold).
std::int64_t last_level_cache_bytes() {
  static const std::int64_t bytes = [] {
    long size = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    size = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (size <= 0) size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return size > 0 ? static_cast<std::int64_t>(size) : std::int64_t(0);
  }();
  return bytes;
}

// Unless summed in place, a part's grad_value rows are summed in a per-thread copy in the compute
// type; above Params::accumulator_budget bytes (64 MiB by default) a part shrinks to one level,
// then to bands of a level's rows.
BackwardPlan plan_scatter(const Params& p) {
  BackwardPlan plan;
  const std::int64_t row_bytes = p.D * compute_bytes(p);
  // Parts of (n, m) and all levels read and write each sample's data once, in order; with fewer
  // (n, m) pairs than threads, parts of one level each keep every thread busy.
  const std::int64_t budget = p.accumulator_budget;
  // A part's rows are summed in a contiguous copy, zeroed, added into and stored once (three
  // passes over its rows), or, for f32 and f64, in grad_value itself after one contiguous zeroing
  // (a read-modify-write of an M*D-strided row per corner, each likely a cache miss). The copy
  // wins where rows get several corners (encoders: 64 per row on ddetr-enc), in place where they
  // get at most one (two where the maps fit in cache: kInPlaceCornersPerRowInCache). The choice is
  // made per level: a decoder's finest level is sparse (ddetr-dec: 0.36 corners per row) while its
  // coarse levels are dense (1.4 to 22) and small enough for a copy to stay in cache.
  // docs/performance.md, "What did not pay".
  if (p.grad_value) {
    const bool in_place_type = p.problem->value_dtype == DType::f32 || p.problem->value_dtype == DType::f64;
    // value and grad_value: N*S*M*D elements each (64 bits for any valid problem).
    const std::int64_t map_bytes = 2 * p.N * p.S * p.M * p.D * compute_bytes(p);
    const std::int64_t in_place_corners =
        2 * map_bytes <= last_level_cache_bytes() ? kInPlaceCornersPerRowInCache : kInPlaceCornersPerRow;
    plan.row_sums.assign(static_cast<std::size_t>(p.L), RowSum::copy);
    for (std::int64_t l = 0; l < p.L; ++l) {
      const std::int64_t corners = p.Q * p.points[l] * 4, rows = p.height[l] * p.width[l];
      RowSum& how = plan.row_sums[static_cast<std::size_t>(l)];
      switch (p.scatter) {
        case CpuTuning::Scatter::copy: break;
        case CpuTuning::Scatter::in_place: how = in_place_type ? RowSum::in_place : RowSum::copy; break;
        case CpuTuning::Scatter::owner: how = RowSum::owner; break;
        case CpuTuning::Scatter::automatic:  // never owner-computes: it lost in the kernel (docs/performance.md)
          if (in_place_type && corners <= in_place_corners * rows) how = RowSum::in_place;
          break;
      }
    }
    // The records of a part's owner levels, and its grad_output rows, within kOwnerBudgetBytes
    // (records are counted for all such levels: a bound for parts of one level too); else the copy.
    for (std::int64_t l = 0; l < p.L; ++l)
      if (plan.row_sums[static_cast<std::size_t>(l)] == RowSum::owner) plan.owner_records += p.Q * p.points[l] * 4;
    if (plan.owner_records > 0 &&
        (owner_layout(p.Q, p.D, static_cast<std::size_t>(compute_bytes(p)), plan.owner_records, p.S).bytes >
             static_cast<std::size_t>(kOwnerBudgetBytes) ||
         p.Q >= (std::int64_t(1) << 31) || p.S >= (std::int64_t(1) << 31))) {
      for (RowSum& how : plan.row_sums)
        if (how == RowSum::owner) how = RowSum::copy;
      plan.owner_records = 0;
    }
  }
  const bool own_rows = plan.any(RowSum::copy);
  if (p.N * p.M >= p.threads && !p.level_parts && (!own_rows || p.S * row_bytes <= budget))
    plan.levels_per_part = p.L;
  const std::int64_t rows = plan.levels_per_part == p.L ? p.S : max_level_rows(p);
  if (own_rows && rows * row_bytes > budget) {
    plan.band_rows = std::max<std::int64_t>(1, budget / row_bytes);
    plan.bands = (rows + plan.band_rows - 1) / plan.band_rows;
  }
  return plan;
}

// Staged gathers (CpuTuning::staging): each thread copies the value rows of the (batch, head) it
// works on ([rows, D], contiguous) before gathering from them. Worth it where a head's samples
// read each row several times; the copy is one pass over the rows. Crossovers measured on the
// named workloads (README, "How the CPU kernels work"): the forward's taps are cheap, so the copy
// pays from about 4 corners per row (dino-dec, 3.2: even; ddetr-dec, 1.1: 2.6x slower); the
// backward's dot products cost more per corner, so from about 2 (dino-dec: 1.4x faster).
constexpr std::int64_t kStageForwardCornersPerRow = 4;
constexpr std::int64_t kStageBackwardCornersPerRow = 2;
// A thread's copy is at most this large; a head whose rows need more reads value directly.
constexpr std::int64_t kStageBudgetBytes = std::int64_t(64) << 20;

// The rows a staged thread copies at a time, or 0 when the gathers read value directly. `rows`:
// a part's rows (the whole head, or its largest level for parts of one level).
std::int64_t staged_rows(const Params& p, std::int64_t rows, std::int64_t corners_per_row) {
  if (p.staging == CpuTuning::Staging::direct || rows * p.D * static_cast<std::int64_t>(size_of(p.problem->value_dtype)) >
                                                     kStageBudgetBytes)
    return 0;
  return p.staging == CpuTuning::Staging::copy || corners_per_head(p) >= corners_per_row * p.S ? rows : 0;
}

// Memory kept between calls: a fresh allocation of megabytes page-faults on every call (README,
// "What did not pay": ~20 ms for a value-sized buffer). A call leases its slot's cached buffer
// when it is large enough, else allocates its own, and hands it back at the end, where the larger
// of the two stays; concurrent calls never share a buffer, and none above kMaxCachedBytes is kept.
// Slots: the kernels' per-thread scratch, and the fused backward's reference-point partials,
// which are leased while the scratch is.
class Workspace {
 public:
  enum Slot { scratch, partials, slots };
  static constexpr std::size_t kMaxCachedBytes = std::size_t(256) << 20;

  Workspace(std::size_t bytes, Slot slot) : slot_(slot) {
    if (bytes == 0) return;
    {
      const std::lock_guard<std::mutex> lock(mutex());
      Cached& c = cached(slot_);
      if (c.bytes >= bytes && c.memory) {
        memory_ = std::move(c.memory);
        bytes_ = c.bytes;
        c.bytes = 0;
        return;
      }
    }
    memory_.reset(new std::byte[bytes]);
    bytes_ = bytes;
  }
  ~Workspace() {
    if (!memory_ || bytes_ > kMaxCachedBytes) return;
    const std::lock_guard<std::mutex> lock(mutex());
    Cached& c = cached(slot_);
    if (bytes_ > c.bytes) {
      c.memory = std::move(memory_);
      c.bytes = bytes_;
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  std::byte* data() const { return memory_.get(); }

 private:
  struct Cached {
    std::unique_ptr<std::byte[]> memory;
    std::size_t bytes = 0;
  };
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static Cached& cached(Slot slot) {
    static Cached c[slots];
    return c[slot];
  }
  Slot slot_;
  std::unique_ptr<std::byte[]> memory_;
  std::size_t bytes_ = 0;
};

// The query walk (Scratch::query_order) of the backward and the staged forward for an encoder,
// whose queries are the pyramid's pixels (Q == S, query i at pixel i): each level's queries in
// stripes of p.query_stripe image rows, each stripe column by column, top to bottom within a
// column. The raster order's working set, the band of rows around a query's samples on every
// level (about 9 rows of value and of the row sums on each: ~600 KiB on ddetr-enc, one head's
// rows), outgrows a 512 KiB L2; a stripe's is its height plus the offsets' reach, a few columns
// wide. Empty (walk in order) for other problems, and with stripes of one row (the raster order
// itself).
std::vector<std::int64_t> query_walk(const Params& p) {
  std::vector<std::int64_t> order;
  const std::int64_t T = p.query_stripe;
  if (p.Q != p.S || T <= 1) return order;
  order.reserve(static_cast<std::size_t>(p.Q));
  for (std::int64_t l = 0; l < p.L; ++l) {
    const std::int64_t H = p.height[l], W = p.width[l];
    for (std::int64_t y0 = 0; y0 < H; y0 += T)
      for (std::int64_t x = 0; x < W; ++x)
        for (std::int64_t y = y0; y < y0 + T && y < H; ++y) order.push_back(p.level_start[l] + y * W + x);
  }
  return order;
}

// 64-byte aligned per-thread scratch (kept between calls: Workspace); its layout is Scratch's.
struct ScratchBuffer {
  std::optional<Workspace> storage;
  std::vector<std::int64_t> query_order;
  Scratch scratch;

  // `head_rows`: rows of value each thread copies for staged gathers (0: none).
  ScratchBuffer(const Params& p, const BackwardPlan* plan, std::int64_t head_rows) {
    // K samples of one query live in scratch: a K whose arrays cannot exist is a bad_alloc,
    // never a wrapped size (validate() bounds K only by the sampling tensors' byte count).
    if (p.K > (std::int64_t(1) << 40) || p.D > (std::int64_t(1) << 40)) throw std::bad_alloc();
    constexpr auto round_up = round_up_to_line;
    const auto LP = static_cast<std::size_t>(p.K);
    scratch.channels_bytes = round_up(static_cast<std::size_t>(p.D) * 8);
    // kMaxLanes samples more than K: a whole vector of any target's lanes read from any sample of
    // the group stays inside each of its arrays (the backward's block_dot_gradients).
    scratch.group_capacity = static_cast<std::int64_t>((LP + 7) / 8 * 8) + kMaxLanes;
    scratch.group_bytes = round_up(static_cast<std::size_t>(scratch.group_capacity) * kGroupBytesPerSample);
    std::size_t extra = 0, owner_bytes = 0;
    // Only the backward and the staged forward walk an order; a direct forward needs none.
    if (plan || head_rows > 0) query_order = query_walk(p);
    if (!query_order.empty()) scratch.query_order = query_order.data();
    if (plan) {
      scratch.levels_per_part = plan->levels_per_part;
      scratch.query_parts = plan->query_parts;
      scratch.band_rows = plan->band_rows;
      scratch.bands = plan->bands;
      // The gradients of one query's samples (grads_stride), then room for the spare row, where
      // off-map corners' scatter adds: the D elements right before the copy of a part's rows.
      scratch.grads_bytes = round_up(static_cast<std::size_t>(grads_stride(p.K)) * 3 * 8) +
                            round_up(static_cast<std::size_t>(p.D) * 8);
      scratch.row_sums = plan->row_sums.empty() ? nullptr : plan->row_sums.data();
      std::int64_t rows = plan->levels_per_part == p.L ? p.S : max_level_rows(p);
      if (plan->band_rows > 0) rows = std::min(rows, plan->band_rows);
      if (plan->any(RowSum::copy))  // one part's (or band's) rows in the compute type
        extra = round_up(static_cast<std::size_t>(rows * p.D * compute_bytes(p)));
      if (plan->owner_records > 0) {
        scratch.owner_records = plan->owner_records;
        scratch.owner_rows = rows;
        owner_bytes = owner_layout(p.Q, p.D, static_cast<std::size_t>(compute_bytes(p)), plan->owner_records, rows).bytes;
      }
    } else {
      extra = round_up(static_cast<std::size_t>(p.D) * 8);  // a zero row
    }
    // A staged copy of value rows has a row of zeros right before it, its row -1: the backward's
    // dot products read it for off-map corners (kernels.inl, block_dot_gradients).
    const std::size_t row_bytes = static_cast<std::size_t>(p.D) * size_of(p.problem->value_dtype);
    const std::size_t head_rows_bytes = head_rows > 0 ? round_up(static_cast<std::size_t>(head_rows) * row_bytes) : 0;
    const std::size_t head_rows_at = scratch.channels_bytes + kGroups * scratch.group_bytes + scratch.grads_bytes + extra +
                                     (head_rows > 0 ? round_up(row_bytes) : 0);
    if (head_rows > 0) scratch.head_rows_at = head_rows_at;
    if (owner_bytes > 0) scratch.owner_at = head_rows_at + head_rows_bytes;
    scratch.stride = head_rows_at + head_rows_bytes + owner_bytes + 64;
    storage.emplace(scratch.stride * static_cast<std::size_t>(p.threads) + 64, Workspace::scratch);
    const auto address = reinterpret_cast<std::uintptr_t>(storage->data());
    scratch.base = storage->data() + (64 - address % 64) % 64;
  }
};

}  // namespace

void forward(const Params& params) {
  const Target target = target_for(params.isa);
  ScratchBuffer buffer(params, nullptr, staged_rows(params, params.S, kStageForwardCornersPerRow));
  target.forward(params, buffer.scratch);
}

// The backward's unit of parallel work is a part that owns grad_value rows: a (batch, head),
// or one level of it, or (for maps whose rows would not fit the accumulator budget) a band of a
// level's rows. When the parts are fewer than the threads, or banded, the work is split in two
// passes: first the location and weight gradients (the dot products, about half the work), whose
// parts are (batch, head, query range) because they own no grad_value row; then the grad_value
// scatter alone. Each output is computed by the same arithmetic in the same order as in one
// pass, so the bits do not change.
void backward(const Params& params) {
  const Target target = target_for(params.isa);
  const bool wants_dots = params.wants_sample_gradients();
  if (!params.grad_value) {  // the dot products alone: no rows owned, any query split works
    BackwardPlan plan;
    plan.levels_per_part = params.L;
    if (params.threads > params.N * params.M)
      plan.query_parts = (params.threads + params.N * params.M - 1) / (params.N * params.M) * 4;
    ScratchBuffer buffer(params, &plan, staged_rows(params, params.S, kStageBackwardCornersPerRow));
    target.backward(params, buffer.scratch);
    return;
  }
  const BackwardPlan scatter_plan = plan_scatter(params);
  const std::int64_t parts = params.N * params.M * (params.L / scatter_plan.levels_per_part) * scatter_plan.bands;
  Params scatter = params;
  // The fused op's chain rule needs whole rows (all levels of a query and head) in one part.
  const bool whole_rows = !params.fused || scatter_plan.levels_per_part == params.L;
  if (wants_dots && (params.threads > parts || scatter_plan.bands > 1 || !whole_rows)) {
    Params dots = params;
    dots.grad_value = nullptr;
    backward(dots);
    scatter.drop_sample_gradients();
  }
  // The staged copy serves the dot products only (the scatter never reads value).
  const std::int64_t part_rows = scatter_plan.levels_per_part == params.L ? params.S : max_level_rows(params);
  ScratchBuffer buffer(scatter, &scatter_plan,
                       scatter.wants_sample_gradients() ? staged_rows(scatter, part_rows, kStageBackwardCornersPerRow) : 0);
  target.backward(scatter, buffer.scratch);
}

// The kernel applies the chain rule through the softmax and the location arithmetic to each row
// while its per-sample gradients are at hand (kernels.inl, fused_chain), and writes the offset and
// logit gradients itself; the reference points, shared by the M heads of a query, get per-head
// partial sums that fused_epilogue adds up over the heads, in order. grad_value is the plain
// backward's, from the same kernel and plan.
void backward_fused(const Params& params) {
  const Target target = target_for(params.isa);
  Params kernel = params;
  std::size_t bytes = 0;
  if (params.grad_reference_points &&
      __builtin_mul_overflow(static_cast<std::size_t>(params.N * params.M * params.Q * params.L),
                             static_cast<std::size_t>(params.reference_coords) * sizeof(double), &bytes))
    throw std::bad_alloc();
  Workspace workspace(bytes, Workspace::partials);
  kernel.reference_partials = reinterpret_cast<double*>(workspace.data());
  backward(kernel);
  if (params.grad_reference_points) target.fused_epilogue(kernel, Scratch{});
}

}  // namespace msda::cpu
