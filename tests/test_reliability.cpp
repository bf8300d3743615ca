// Reliability: tensors past 2^31 elements, concurrent callers, calls from inside an OpenMP
// parallel region, and allocation failure.
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "test_support.h"

namespace msda_test {
namespace {

using msda::Backend;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Zeroed memory on transparent huge pages where the kernel allows: a 4 GB tensor then costs
// ~2,000 page faults instead of ~1,000,000 (tens of seconds of system time on a VM).
std::unique_ptr<void, FreeDeleter> huge_zeroed(std::size_t bytes) {
  constexpr std::size_t kHuge = std::size_t(2) << 20;
  bytes = (bytes + kHuge - 1) / kHuge * kHuge;
  std::unique_ptr<void, FreeDeleter> p(std::aligned_alloc(kHuge, bytes));
  if (p) {
#ifdef MADV_HUGEPAGE
    madvise(p.get(), bytes, MADV_HUGEPAGE);
#endif
    std::memset(p.get(), 0, bytes);
  }
  return p;
}

// value of more than 2^31 elements (bf16, 4.3 GB of zeros but for the sampled rows) with
// every sample on the last rows of the map, so every offset the kernels form is past 2^31. The
// result must equal the reference on a crop made of those last rows.
TEST(LargeTensors, ValuePast2To31ElementsAgreesWithTheReferenceOnACrop) {
  constexpr std::int64_t H = 16384, W = 16400, D = 8, crop_rows = 4;
  static_assert(H * W * D > (std::int64_t(1) << 31));
  msda::Problem big;
  big.batch = 1, big.queries = 6, big.heads = 1, big.channels = D, big.points = 2;
  big.levels = {{H, W}};
  big.level_start_index = msda::level_starts(big.levels);
  big.value_len = H * W;
  big.value_dtype = DType::bf16;
  big.location_dtype = big.weight_dtype = DType::f32;
  msda::Problem crop = big;
  crop.levels = {{crop_rows, W}};
  crop.value_len = crop_rows * W;

  const std::int64_t elements = H * W * D, crop_first = (H - crop_rows) * W * D;
  std::unique_ptr<void, FreeDeleter> value = huge_zeroed(static_cast<std::size_t>(elements) * 2);
  ASSERT_TRUE(value) << "could not reserve the 4.3 GB value tensor";
  Buffer crop_value(DType::bf16, crop_rows * W * D);
  std::mt19937_64 rng(case_seed(0));
  std::normal_distribution<double> normal;
  auto* big_bits = static_cast<msda::bf16*>(value.get());
  for (std::int64_t i = 0; i < crop_rows * W * D; ++i) {
    crop_value.set(i, normal(rng));
    std::memcpy(&big_bits[crop_first + i], static_cast<const char*>(crop_value.data()) + 2 * i, 2);
  }

  // Rows H-4 .. H-1 are rows 0..3 of the crop: v_crop = v - (H - 4), exact in f32 for these
  // dyadic y (and x is shared: W is the same).
  const std::int64_t samples = big.queries * big.points;
  Buffer loc_big(DType::f32, 2 * samples), loc_crop(DType::f32, 2 * samples), weights(DType::f32, samples);
  const double v_crop[] = {0.25, 1.5, 2.75, 3.0, -0.5, 2.0};  // 3.0: bottom corners off the map
  for (std::int64_t i = 0; i < samples; ++i) {
    const double x = std::uniform_int_distribution<int>(0, 1 << 20)(rng) / double(1 << 20);
    const double vc = v_crop[i % 6];
    loc_big.set(2 * i, x);
    loc_crop.set(2 * i, x);
    loc_big.set(2 * i + 1, (H - crop_rows + vc + 0.5) / H);
    loc_crop.set(2 * i + 1, (vc + 0.5) / crop_rows);
    weights.set(i, 0.25 + 0.1 * static_cast<double>(i));
  }
  Buffer grad_out(DType::bf16, big.queries * D);
  for (std::int64_t i = 0; i < grad_out.size(); ++i) grad_out.set(i, normal(rng));

  // The cpu backend on the crop does the same arithmetic in the same order: the bits must match.
  // The crop itself is checked against the reference like every other problem.
  Results got(big), want(crop), ref(crop);
  msda::forward(big, {value.get(), loc_big.data(), weights.data()}, got.output.data(), {2});
  msda::forward(crop, {crop_value.data(), loc_crop.data(), weights.data()}, want.output.data(), {1});
  msda::forward(crop, {crop_value.data(), loc_crop.data(), weights.data()}, ref.output.data(), {1, Backend::reference});
  EXPECT_TRUE(got.output.same_bytes(want.output)) << "forward";
  EXPECT_TRUE(close(want.output.to_double(), ref.output.to_double(), 1e-2));

  // The backward writes all 4.3 GB of grad_value: the crop's rows must match, the rest be zero.
  std::unique_ptr<void, FreeDeleter> grad_value = huge_zeroed(static_cast<std::size_t>(elements) * 2);
  ASSERT_TRUE(grad_value);
  std::memset(grad_value.get(), 0xFF, static_cast<std::size_t>(elements) * 2);  // NaN poison
  msda::backward(big, {value.get(), loc_big.data(), weights.data()}, grad_out.data(),
                 {grad_value.get(), got.grad_locations.data(), got.grad_weights.data()}, {2});
  msda::backward(crop, {crop_value.data(), loc_crop.data(), weights.data()}, grad_out.data(),
                 {want.grad_value.data(), want.grad_locations.data(), want.grad_weights.data()}, {1});
  const auto* g = static_cast<const std::uint16_t*>(grad_value.get());
  std::int64_t nonzero_outside = 0;
  for (std::int64_t i = 0; i < crop_first; i += 97) nonzero_outside += g[i] != 0;
  EXPECT_EQ(nonzero_outside, 0) << "grad_value outside the sampled rows";
  EXPECT_EQ(std::memcmp(g + crop_first, want.grad_value.data(), static_cast<std::size_t>(crop_rows * W * D) * 2), 0)
      << "grad_value of the sampled rows";
  // d/dy scales with H: the crop's y-gradients times H / crop_rows (a power of two, exact).
  std::vector<double> want_loc = want.grad_locations.to_double();
  for (std::size_t i = 1; i < want_loc.size(); i += 2) want_loc[i] *= double(H) / crop_rows;
  EXPECT_TRUE(close(got.grad_locations.to_double(), want_loc, 1e-6));
  EXPECT_TRUE(got.grad_weights.same_bytes(want.grad_weights));
}

// The library keeps no global mutable state: many threads calling forward and backward at once
// on different problems get the bits of serial calls.
TEST(Concurrency, ConcurrentCallersGetTheBitsOfSerialCalls) {
  constexpr int kCallers = 6;
  std::vector<Case> cases;
  for (int i = 0; i < kCallers; ++i) {
    Shape s;
    s.batch = 1 + i % 2, s.heads = 2, s.channels = i % 3 == 0 ? 32 : 20, s.queries = 120, s.points = 3;
    s.levels = {{10 + i, 12}, {5, 6}};
    const DType dtype = i % 2 ? DType::bf16 : DType::f32;
    cases.push_back(make_case(s, {dtype, DType::f32, DType::f32}, Locations::mixed, case_seed(i)));
  }
  std::vector<std::unique_ptr<Results>> serial, concurrent;
  for (const Case& c : cases) {
    serial.push_back(std::make_unique<Results>(c.problem));
    run_all(c.problem, c.tensors, *serial.back(), {2});
    concurrent.push_back(std::make_unique<Results>(c.problem));
  }
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i)
    callers.emplace_back([&, i] {
      for (int rep = 0; rep < 3; ++rep) run_all(cases[i].problem, cases[i].tensors, *concurrent[i], {2});
    });
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < kCallers; ++i) {
    SCOPED_TRACE(cases[i].label);
    EXPECT_TRUE(concurrent[i]->output.same_bytes(serial[i]->output));
    EXPECT_TRUE(concurrent[i]->grad_value.same_bytes(serial[i]->grad_value));
    EXPECT_TRUE(concurrent[i]->grad_locations.same_bytes(serial[i]->grad_locations));
    EXPECT_TRUE(concurrent[i]->grad_weights.same_bytes(serial[i]->grad_weights));
  }
}

// Called from inside an OpenMP parallel region (as from a caller's own parallel loop), msda's
// region nests: OpenMP runs it on the calling thread alone (no oversubscription, no deadlock) and
// the bits are those of a plain call.
TEST(Concurrency, CallsFromInsideAnOpenMPParallelRegion) {
  Shape s;
  s.batch = 1, s.heads = 2, s.channels = 32, s.queries = 200, s.points = 4;
  s.levels = {{16, 16}, {8, 8}};
  const Case c = make_case(s, {DType::f32, DType::f32, DType::f32}, Locations::unit, case_seed(0));
  Results plain(c.problem);
  run_all(c.problem, c.tensors, plain, {2});
  std::vector<std::unique_ptr<Results>> inner;
  for (int i = 0; i < 4; ++i) inner.push_back(std::make_unique<Results>(c.problem));
  int max_level = 0;
#pragma omp parallel for num_threads(4) reduction(max : max_level)
  for (int i = 0; i < 4; ++i) {
    run_all(c.problem, c.tensors, *inner[i], {2});
    max_level = std::max(max_level, omp_get_level());
  }
  EXPECT_EQ(max_level, 1);
  for (const auto& r : inner) {
    EXPECT_TRUE(r->output.same_bytes(plain.output));
    EXPECT_TRUE(r->grad_value.same_bytes(plain.grad_value));
    EXPECT_TRUE(r->grad_locations.same_bytes(plain.grad_locations));
  }
}

// An allocation that cannot succeed (a 4 TiB per-thread f32 accumulator of a bf16 value,
// allowed by a huge budget) surfaces as std::bad_alloc before anything is written; nothing leaks
// (LeakSanitizer in the sanitizer build).
TEST(FailurePaths, AllocationFailureIsBadAllocAndWritesNothing) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's operator new reports out-of-memory and aborts instead of throwing";
#endif
  msda::Problem p;
  p.batch = 1, p.queries = 1, p.heads = 1, p.channels = 1, p.points = 1;
  p.levels = {{std::int64_t(1) << 20, std::int64_t(1) << 20}};
  p.level_start_index = msda::level_starts(p.levels);
  p.value_len = std::int64_t(1) << 40;
  p.value_dtype = DType::bf16;
  // One sample; the only allocation that fails is the per-thread accumulator of the 2^40 rows,
  // made before any kernel runs, so the small buffers standing in for the 2 TiB tensors are
  // never read or written.
  const msda::bf16 one = msda::float_to_bf16(1.0f), seven = msda::float_to_bf16(7.0f);
  std::vector<msda::bf16> value(16, one), grad_value(16, seven), grad_out{one};
  std::vector<float> locations{0.5f, 0.5f}, weights{1.0f};
  msda::Options o{1, Backend::cpu};
  o.tuning.accumulator_budget = std::int64_t(1) << 62;
  EXPECT_THROW(msda::backward(p, {value.data(), locations.data(), weights.data()}, grad_out.data(),
                              {grad_value.data(), nullptr, nullptr}, o),
               std::bad_alloc);
  for (msda::bf16 x : grad_value) EXPECT_EQ(msda::bf16_to_float(x), 7.0f);
}

}  // namespace
}  // namespace msda_test
