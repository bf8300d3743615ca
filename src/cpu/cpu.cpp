// Runtime dispatch of the CPU backend: picks the instruction set, sizes and allocates scratch.
#include "cpu/cpu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>

namespace msda::cpu {
namespace {

struct Target {
  Isa isa;
  void (*forward)(const Params&, const Scratch&);
  void (*backward)(const Params&, const Scratch&);
};

bool supported(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case Isa::baseline:
    case Isa::best: return true;
  }
  return false;
}

Target target_for(Isa requested) {
  const Target targets[] = {{Isa::avx512, avx512::forward, avx512::backward},
                            {Isa::avx2, avx2::forward, avx2::backward},
                            {Isa::baseline, baseline::forward, baseline::backward}};
  for (const Target& t : targets)
    if ((requested == Isa::best || requested == t.isa) && supported(t.isa)) return t;
  throw Error("options.isa", "an instruction set this CPU supports (best, baseline" +
                                 std::string(supported(Isa::avx2) ? ", avx2" : "") + ")",
              std::string(name(requested)));
}

// 64-byte aligned per-thread scratch; its layout is Scratch's.
struct ScratchBuffer {
  std::unique_ptr<std::byte[]> storage;
  Scratch scratch;

  ScratchBuffer(const Params& p, bool backward) {
    auto round_up = [](std::size_t x) { return (x + 63) / 64 * 64; };
    const auto LP = static_cast<std::size_t>(p.L * p.P);
    scratch.channels_bytes = round_up(static_cast<std::size_t>(p.D) * 8);
    std::size_t extra = 0;
    if (backward) {
      // Parts of (n, m) and all levels read and write each sample's data once, in order; with
      // fewer (n, m) pairs than threads, parts of one level each keep every thread busy.
      scratch.levels_per_part = p.N * p.M >= p.threads && !p.level_parts ? p.L : 1;
      scratch.group_capacity = static_cast<std::int64_t>((LP + 7) / 8 * 8);
      scratch.group_bytes = round_up(static_cast<std::size_t>(scratch.group_capacity) * kGroupBytesPerSample);
      scratch.grads_bytes = round_up(LP * 3 * 8);
      if (p.grad_value) {  // one part's grad_value rows in the compute type
        std::int64_t max_rows = 0;
        for (std::int64_t l = 0; l < p.L; ++l) max_rows = std::max(max_rows, p.height[l] * p.width[l]);
        if (scratch.levels_per_part == p.L) max_rows = p.S;
        const std::size_t compute_bytes = p.problem->value_dtype == DType::f64 ? 8 : 4;
        extra = round_up(static_cast<std::size_t>(max_rows * p.D) * compute_bytes);
      }
    } else {
      scratch.group_capacity = static_cast<std::int64_t>((LP + 7) / 8 * 8);
      scratch.group_bytes = round_up(static_cast<std::size_t>(scratch.group_capacity) * kGroupBytesPerSample);
      // One base pointer per level, then a zero row (grads_bytes is the pointers' share).
      scratch.grads_bytes = round_up(static_cast<std::size_t>(p.L) * sizeof(void*));
      extra = round_up(static_cast<std::size_t>(p.D) * 8);
    }
    scratch.stride = scratch.channels_bytes + scratch.group_bytes + scratch.grads_bytes + extra + 64;
    storage.reset(new std::byte[scratch.stride * static_cast<std::size_t>(p.threads) + 64]);
    const auto address = reinterpret_cast<std::uintptr_t>(storage.get());
    scratch.base = storage.get() + (64 - address % 64) % 64;
  }
};

// The padded head-major copy of value (Params::padded_start), on 2 MiB-aligned memory marked
// for transparent huge pages: the gather touches it at random, and 4 KiB pages would spend the
// TLB. Null when staging is off or the size does not fit in 64 bits.
struct StagedValue {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> memory;

  explicit StagedValue(const Params& p) {
    if (!p.stage_value) return;
    std::size_t bytes;
    if (__builtin_mul_overflow(static_cast<std::size_t>(p.N * p.M), static_cast<std::size_t>(p.padded_rows), &bytes) ||
        __builtin_mul_overflow(bytes, static_cast<std::size_t>(p.D) * size_of(p.problem->value_dtype), &bytes))
      return;
    constexpr std::size_t kHuge = std::size_t(2) << 20;
    bytes = (bytes + kHuge - 1) / kHuge * kHuge;
    memory.reset(std::aligned_alloc(kHuge, bytes));
    if (!memory) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(memory.get(), bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  }
};

}  // namespace

void forward(const Params& params) {
  const Target target = target_for(params.isa);
  ScratchBuffer buffer(params, false);
  StagedValue staged(params);
  buffer.scratch.staged_value = staged.memory.get();
  target.forward(params, buffer.scratch);
}

// The backward's unit of parallel work is a part that owns grad_value rows: a (batch, head),
// or one level of it. With more threads than N*M*L parts, the work is split in two passes that
// both use every thread: first the location and weight gradients (the dot products, about half
// the work), whose parts are (batch, head, query range) because they own no grad_value row; then
// the grad_value scatter alone over N*M*L parts. Each output is computed by the same arithmetic
// in the same order as in one pass, so the bits do not change.
void backward(const Params& params) {
  const Target target = target_for(params.isa);
  const bool wants_dots = params.grad_locations || params.grad_weights;
  if (params.threads <= params.N * params.M * params.L || !params.grad_value || !wants_dots) {
    ScratchBuffer buffer(params, true);
    if (!params.grad_value && params.threads > params.N * params.M) {
      buffer.scratch.levels_per_part = params.L;
      buffer.scratch.query_parts = (params.threads + params.N * params.M - 1) / (params.N * params.M) * 4;
    }
    target.backward(params, buffer.scratch);
    return;
  }
  Params dots = params;
  dots.grad_value = nullptr;
  backward(dots);
  Params scatter = params;
  scatter.grad_locations = scatter.grad_weights = nullptr;
  ScratchBuffer buffer(scatter, true);
  target.backward(scatter, buffer.scratch);
}

}  // namespace msda::cpu
