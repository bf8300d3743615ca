// Coverage feedback for libFuzzer when msda is built with GCC (whose kernels use GCC vector
// extensions clang does not accept). GCC's -fsanitize-coverage=trace-pc calls
// __sanitizer_cov_trace_pc() at every basic block; this file turns those calls into AFL-style edge
// counters (previous block ^ current block) in libFuzzer's "extra counters" section, which
// libFuzzer clears before and reads after every input. -fsanitize-coverage=trace-cmp calls go to
// libFuzzer's own __sanitizer_cov_trace_cmp* (value profile, compare-guided mutations); GCC's
// floating-point variants, which libFuzzer lacks, are no-ops here. This file itself is built
// without coverage instrumentation (fuzz/CMakeLists.txt).
#include <cstddef>
#include <cstdint>

namespace {

constexpr std::size_t kCounters = std::size_t(1) << 16;

__attribute__((section("__libfuzzer_extra_counters"), used)) std::uint8_t counters[kCounters];
thread_local std::uintptr_t previous = 0;

}  // namespace

extern "C" {

void __sanitizer_cov_trace_pc() {
  std::uintptr_t pc = reinterpret_cast<std::uintptr_t>(__builtin_return_address(0));
  pc = (pc ^ (pc >> 17)) * 0x9E3779B97F4A7C15ull;
  const std::uintptr_t block = pc >> 40;
  ++counters[(block ^ previous) & (kCounters - 1)];
  previous = block >> 1;
}

void __sanitizer_cov_trace_cmpf(float, float) {}
void __sanitizer_cov_trace_cmpd(double, double) {}

}  // extern "C"
