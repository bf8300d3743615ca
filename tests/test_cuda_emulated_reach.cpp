// The emulated cuda backend where the rest of the suite does not reach: element offsets past 2^31
// and 2^32, attention logits far from zero, the atomic grad_value of every dtype mix and of lane
// tails, a failed allocation or launch in the middle of a call, and calls captured in a graph and
// replayed on new inputs (tests/cuda_emulation/runtime.h: errors, failure injection and capture
// as CUDA's). Every result is poisoned (NaN) before the call and compared with the float64
// reference, with values the test computes itself, or bitwise with an eager call.
#include <sys/mman.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_cuda_emulated_support.h"

namespace {

using namespace msda_test;
namespace emulated = msda::cuda_emulation;

class CudaEmulatedReach : public CudaEmulated {};

// ---- 64-bit indexing ----

// Memory that costs nothing until a page is touched: a value tensor of gigabytes of which the
// test writes and the kernels read a few pixels.
class Mapping {
 public:
  explicit Mapping(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~Mapping() {
    if (data_) munmap(data_, bytes_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  void* data() const { return data_; }

 private:
  std::size_t bytes_;
  void* data_;
};

// One level of 32771 x 65539 pixels (S = 2147778569 > 2^31), M = 2 heads of D = 1 channel, bf16:
// 4.3e9 elements (8.6 GB of address space). Samples at the first pixels, around pixel 2^30 (element
// offsets crossing 2^31) and at the last pixels (offsets past 2^32), partly and wholly outside the
// map. An offset computed in 32 bits anywhere reads another pixel (or faults); the expected values
// come from SPEC's formulas over the pixels the test wrote.
TEST_F(CudaEmulatedReach, ValueOfMoreThanTwoToThe32ElementsIndexesIn64Bits) {
  constexpr std::int64_t H = 32771, W = 65539, M = 2, D = 1, Q = 2, P = 4;
  Shape shape{1, M, D, Q, P, {{H, W}}};
  const msda::Problem problem = make_problem(shape, {DType::bf16, DType::f32, DType::f32});
  ASSERT_NO_THROW(msda::validate(problem)) << "SPEC: tensors over 2^31 elements work";
  const std::int64_t elements = value_size(problem);
  ASSERT_GT(elements, std::int64_t(1) << 32);
  Mapping value(static_cast<std::size_t>(elements) * 2);
  if (!value.data()) GTEST_SKIP() << "mmap of " << elements * 2 << " bytes (MAP_NORESERVE) failed here";

  // (u, v) = (x*W - 0.5, y*H - 0.5) of each sample, per query; the heads share them.
  const double first_pixel = (std::int64_t(1) << 30) - 1;  // row index of a pixel where offsets cross 2^31
  const double mid_h = std::floor(first_pixel / W), mid_w = first_pixel - mid_h * W;
  const double uv[Q][P][2] = {
      {{0.3, 0.7}, {W - 1.75, H - 1.6}, {W - 0.7, H - 0.4}, {-0.5, 0.25}},  // first, last, last edge, left edge
      {{mid_w + 0.4, mid_h + 0.9}, {W - 2.5, H - 1.25}, {1.5 * W, 0.5}, {W - 1.0 + 0.125, 0.5}},
  };
  Tensors t;
  t.value = Buffer(DType::f32, 0);  // the mapping stands in for it
  t.locations = Buffer(DType::f32, location_size(problem));
  t.weights = Buffer(DType::f32, weight_size(problem));
  t.grad_output = Buffer(DType::bf16, output_size(problem));
  std::mt19937_64 rng(case_seed(0));
  std::uniform_real_distribution<double> sym(-1.0, 1.0);
  void* base = value.data();
  const auto at = [&](std::int64_t h, std::int64_t w, std::int64_t m) { return ((h * W + w) * M + m) * D; };
  for (std::int64_t q = 0; q < Q; ++q)
    for (std::int64_t m = 0; m < M; ++m)
      for (std::int64_t p = 0; p < P; ++p) {
        const std::int64_t sample = (q * M + m) * P + p;
        t.locations.set(2 * sample, (uv[q][p][0] + 0.5) / W);
        t.locations.set(2 * sample + 1, (uv[q][p][1] + 0.5) / H);
        t.weights.set(sample, 0.25 + sym(rng));
        // The pixels the sample reads (from the stored, rounded location), given values.
        const double u = t.locations.get(2 * sample) * W - 0.5, v = t.locations.get(2 * sample + 1) * H - 0.5;
        for (std::int64_t dh = 0; dh < 2; ++dh)
          for (std::int64_t dw = 0; dw < 2; ++dw) {
            const std::int64_t h = static_cast<std::int64_t>(std::floor(v)) + dh;
            const std::int64_t w = static_cast<std::int64_t>(std::floor(u)) + dw;
            if (h >= 0 && h < H && w >= 0 && w < W) store_from_double(DType::bf16, base, at(h, w, m), sym(rng));
          }
      }
  for (std::int64_t i = 0; i < t.grad_output.size(); ++i) t.grad_output.set(i, sym(rng));

  // SPEC "Forward" and "Backward", in double, over the mapping.
  std::vector<double> output(static_cast<std::size_t>(output_size(problem)), 0.0);
  std::vector<double> grad_locations(static_cast<std::size_t>(location_size(problem)), 0.0);
  std::vector<double> grad_weights(static_cast<std::size_t>(weight_size(problem)), 0.0);
  for (std::int64_t q = 0; q < Q; ++q)
    for (std::int64_t m = 0; m < M; ++m)
      for (std::int64_t p = 0; p < P; ++p) {
        const std::int64_t sample = (q * M + m) * P + p;
        const double a = t.weights.get(sample);
        const double u = t.locations.get(2 * sample) * W - 0.5, v = t.locations.get(2 * sample + 1) * H - 0.5;
        if (!(v > -1 && u > -1 && v < H && u < W)) continue;
        const double h0 = std::floor(v), w0 = std::floor(u), lh = v - h0, lw = u - w0, hh = 1 - lh, hw = 1 - lw;
        const auto pixel = [&](double h, double w, std::int64_t d) {
          if (h < 0 || h >= H || w < 0 || w >= W) return 0.0;
          return load_as_double(DType::bf16, base, at(std::int64_t(h), std::int64_t(w), m) + d);
        };
        double ga = 0, du = 0, dv = 0;
        for (std::int64_t d = 0; d < D; ++d) {
          const double v00 = pixel(h0, w0, d), v01 = pixel(h0, w0 + 1, d), v10 = pixel(h0 + 1, w0, d),
                       v11 = pixel(h0 + 1, w0 + 1, d);
          const double g = t.grad_output.get((q * M + m) * D + d);
          const double sampled = hh * hw * v00 + hh * lw * v01 + lh * hw * v10 + lh * lw * v11;
          output[static_cast<std::size_t>((q * M + m) * D + d)] += a * sampled;
          ga += g * sampled;
          du += g * (hh * (v01 - v00) + lh * (v11 - v10));
          dv += g * (hw * (v10 - v00) + lw * (v11 - v01));
        }
        grad_weights[static_cast<std::size_t>(sample)] = ga;
        grad_locations[static_cast<std::size_t>(2 * sample)] = a * W * du;
        grad_locations[static_cast<std::size_t>(2 * sample + 1)] = a * H * dv;
      }

  for (bool deterministic : {true, false}) {
    SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
    // Not Results: its grad_value would be 8.6 GB, written when poisoned.
    struct {
      Buffer output, grad_locations, grad_weights;
    } got{Buffer(DType::bf16, output_size(problem)), Buffer(DType::f32, location_size(problem)),
          Buffer(DType::f32, weight_size(problem))};
    for (Buffer* b : {&got.output, &got.grad_locations, &got.grad_weights}) b->poison();
    msda::Params p = emulated::params_for(problem);
    p.value = base;
    p.locations = t.locations.data();
    p.weights = t.weights.data();
    p.cuda.deterministic = deterministic;
    msda::Params forward = p;
    forward.output = got.output.data();
    emulated::forward(forward);
    // Sample gradients only: a grad_value would be zeroed, all 8.6 GB of it.
    p.grad_output = t.grad_output.data();
    p.grad_locations = got.grad_locations.data();
    p.grad_weights = got.grad_weights.data();
    emulated::backward(p);
    EXPECT_TRUE(close(got.output.to_double(), output, tolerance(DType::bf16))) << "output";
    EXPECT_TRUE(close(got.grad_weights.to_double(), grad_weights, tolerance(DType::f32))) << "grad_weights";
    EXPECT_TRUE(close(got.grad_locations.to_double(), grad_locations, tolerance(DType::f32))) << "grad_locations";
    // Element by element too: a wrong pixel in one sample hides in a norm of several.
    for (std::size_t i = 0; i < grad_weights.size(); ++i)
      EXPECT_NEAR(got.grad_weights.get(static_cast<std::int64_t>(i)), grad_weights[i],
                  1e-5 * (1 + std::abs(grad_weights[i])))
          << "sample " << i;
  }
}

// ---- the fused op's softmax far from zero ----

// Attention logits around +1000, around -1000, and both in one head: exp(1000) overflows even
// double, so a softmax that does not subtract the head's largest logit gives inf / inf = NaN (or
// 0 / 0). Forward and both backwards against the reference, every result finite.
TEST_F(CudaEmulatedReach, FusedSoftmaxOfLogitsNearPlusAndMinusAThousand) {
  const FusedDTypes mixes[] = {{DType::f32, DType::f32, DType::f32, DType::f32},
                               {DType::f64, DType::f64, DType::f64, DType::f64},
                               {DType::bf16, DType::f32, DType::f32, DType::f32},
                               {DType::f16, DType::f16, DType::f16, DType::f16},
                               {DType::bf16, DType::bf16, DType::bf16, DType::bf16}};
  enum class Offset { plus, minus, mixed };
  std::uint64_t index = 0;
  for (const FusedDTypes& mix : mixes)
    for (std::int64_t coords : {2, 4})
      for (Offset offset : {Offset::plus, Offset::minus, Offset::mixed}) {
        FusedCase c = make_fused_case({2, 3, 8, 4, 3, {{8, 4}, {4, 2}}}, coords, 0.5, mix, Draw::local,
                                      case_seed(index++));
        std::mt19937_64 rng(case_seed(index++));
        std::normal_distribution<double> normal(0.0, 1.0);
        const std::int64_t K = c.problem.total_points();
        for (std::int64_t i = 0; i < c.logits.size(); ++i) {
          // mixed: the first half of each head's logits near +1000, the rest near -1000 (their
          // weights underflow to exactly 0).
          const bool high = offset == Offset::plus || (offset == Offset::mixed && i % K < K / 2);
          c.logits.set(i, (high ? 1000.0 : -1000.0) + 3.0 * normal(rng));
        }
        SCOPED_TRACE(c.label + " " + to_string(mix) +
                     (offset == Offset::plus ? " logits ~ +1000" : offset == Offset::minus ? " logits ~ -1000" : " logits ~ +-1000"));
        for (bool deterministic : {true, false}) {
          SCOPED_TRACE(deterministic ? "deterministic" : "atomic");
          FusedResults got(c.problem);
          run_fused_emulated(c, got, {.deterministic = deterministic});
          expect_fused_matches_reference(c, got, /*strict=*/true);
        }
      }
}

// ---- the atomic grad_value ----

// options.cuda.deterministic = false for every dtype mix of the plain op, with lane tails: D = 3
// (a group of 4 lanes, one idle; scalar loads), 12 (f32: three float4 per head in 4 lanes; bf16
// and f16: no 16-byte vector, scalar), 40 (f32: 10 float4 in 16 lanes; bf16/f16: 5 vectors of 8 in
// 8 lanes), and 15 heads (groups of a head cross warp boundaries unevenly). Clustered locations, so
// that many samples add into the same rows; grad_value included.
TEST_F(CudaEmulatedReach, AtomicBackwardEveryDtypeMixAndLaneTails) {
  std::uint64_t index = 0;
  for (const DTypes& mix : dtype_mixes())
    for (std::int64_t d : {3, 12, 40}) {
      const Case c = make_case({2, 15, d, 3, 2, {{6, 5}, {3, 2}}}, mix, index % 2 ? Locations::mixed : Locations::cluster,
                               case_seed(index));
      ++index;
      SCOPED_TRACE(c.label);
      Results got(c.problem);
      run_emulated(c.problem, c.tensors, got, {.deterministic = false});
      expect_matches_reference(c, got);
    }
}

// The fused op's atomic grad_value, every one of its 25 dtype mixes, 2 and 4 coordinates.
TEST_F(CudaEmulatedReach, FusedAtomicBackwardEveryDtypeMix) {
  std::uint64_t index = 0;
  for (const FusedDTypes& mix : fused_mixes())
    for (std::int64_t coords : {2, 4}) {
      const FusedCase c = make_fused_case({2, 5, 12, 3, 2, {{6, 5}, {3, 2}}}, coords, 0.5, mix,
                                          index % 3 == 2 ? Draw::nonfinite : Draw::local, case_seed(index));
      ++index;
      SCOPED_TRACE(c.label + " " + to_string(mix));
      FusedResults got(c.problem);
      run_fused_emulated(c, got, {.deterministic = false});
      expect_fused_matches_reference(c, got);
    }
}

// ---- a failed allocation or launch ----

// One call of the plain or the fused op, forward or backward, with no caller workspace (the
// backend allocates its own), into `r`.
struct Call {
  std::string what;
  std::function<void()> run;
};

// Runs `call` with the failure armed and expects: an exception whose message names the CUDA
// error, no error left pending (msda clears what it reported), nothing left allocated.
void expect_failure_reported(const Call& call, const char* message) {
  const std::int64_t allocations = msda_emulator::live_allocations();
  try {
    call.run();
    ADD_FAILURE() << call.what << ": returned normally";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << call.what << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find("msda"), std::string::npos) << call.what << ": " << e.what();
  }
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess) << call.what << ": the error was left pending";
  (void)cudaGetLastError();
  EXPECT_EQ(msda_emulator::live_allocations(), allocations) << call.what << ": the workspace was not freed";
}

// A failed cudaMallocAsync of the workspace, then each kernel launch of the call failing in turn
// (as a launch of too many registers fails): each an exception naming the error, with nothing
// left pending or allocated, and the next call gives the bits of a call before any failure.
TEST_F(CudaEmulatedReach, AFailedAllocationOrLaunchIsAnErrorAndTheNextCallWorks) {
  const Case plain = make_case(with_v2({2, 3, 8, 6, 1, {{4, 4}, {2, 2}}}, {3, 2}), {}, Locations::cluster, case_seed(0));
  const Case half = make_case({2, 3, 8, 6, 2, {{4, 4}, {2, 2}}}, {DType::bf16, DType::f32, DType::f32},
                              Locations::cluster, case_seed(1));
  const FusedCase fused = make_fused_case({2, 3, 8, 6, 2, {{4, 4}, {2, 2}}}, 4, 0.5, {}, Draw::local, case_seed(2));

  struct Subject {
    std::string name;
    std::function<void(bool deterministic)> run;  // forward and backward, into this subject's results
    std::function<std::vector<const Buffer*>()> results;
  };
  Results plain_results(plain.problem), half_results(half.problem);
  FusedResults fused_results(fused.problem);
  const std::vector<Subject> subjects = {
      {"plain f32", [&](bool det) { run_emulated(plain.problem, plain.tensors, plain_results, {.deterministic = det}); },
       [&] { return std::vector<const Buffer*>{&plain_results.output, &plain_results.grad_value,
                                               &plain_results.grad_locations, &plain_results.grad_weights}; }},
      {"plain bf16", [&](bool det) { run_emulated(half.problem, half.tensors, half_results, {.deterministic = det}); },
       [&] { return std::vector<const Buffer*>{&half_results.output, &half_results.grad_value,
                                               &half_results.grad_locations, &half_results.grad_weights}; }},
      {"fused f32, 4 coordinates", [&](bool det) { run_fused_emulated(fused, fused_results, {.deterministic = det}); },
       [&] { return fused_results.all(); }},
  };
  for (const Subject& subject : subjects)
    for (bool deterministic : {true, false}) {
      const std::string label = subject.name + (deterministic ? ", deterministic" : ", atomic");
      SCOPED_TRACE(label);
      const std::int64_t before = msda_emulator::launches();
      subject.run(deterministic);
      const std::int64_t launches = msda_emulator::launches() - before;
      ASSERT_GT(launches, 1);
      std::vector<Buffer> clean;
      for (const Buffer* b : subject.results()) clean.push_back(*b);
      const auto expect_clean_results = [&](const std::string& after) {
        subject.run(deterministic);
        const auto now = subject.results();
        for (std::size_t k = 0; k < now.size(); ++k)
          EXPECT_TRUE(now[k]->same_bytes(clean[k])) << "after " << after << ": result " << k << " differs";
      };
      const Call call{label, [&] { subject.run(deterministic); }};
      for (int skip : {0, 1}) {  // the forward's workspace, the backward's
        msda_emulator::fail_next_malloc(skip);
        expect_failure_reported(call, "out of memory");
        expect_clean_results("a failed allocation");
      }
      for (std::int64_t k = 0; k < launches; ++k) {
        SCOPED_TRACE("launch " + std::to_string(k) + " of " + std::to_string(launches) + " fails");
        msda_emulator::fail_next_launch(static_cast<int>(k));
        expect_failure_reported(call, "too many resources requested for launch");
        expect_clean_results("a failed launch");
      }
    }
  msda_emulator::fail_next_malloc(-1);
  msda_emulator::fail_next_launch(-1);
}

// ---- graph capture ----

// Caller-owned device memory, aligned as cudaMalloc's and a framework's caching allocator's is.
class Workspace {
 public:
  explicit Workspace(std::size_t bytes) : storage_(bytes / 8 + 40) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = reinterpret_cast<void*>((address + 255) / 256 * 256);
    bytes_ = bytes;
  }
  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  std::vector<std::uint64_t> storage_;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

void overwrite(Buffer& to, const Buffer& from) {
  ASSERT_EQ(to.bytes(), from.bytes());
  std::memcpy(to.data(), from.data(), from.bytes());
}

bool all_nan(const Buffer& b) {
  for (double x : b.to_double())
    if (!std::isnan(x)) return false;
  return true;
}

// A stream that is not the default one: work the backend issued elsewhere than the caller's
// stream would run at capture instead of being recorded.
cudaStream_t test_stream() { return reinterpret_cast<cudaStream_t>(std::uintptr_t(0x5712)); }

// A forward and a backward (grad_value included, the deterministic and the atomic one) captured as
// torch.cuda.graph captures them, with the caller's workspace or the backend's own (allocated in
// the capture: graph memory), then replayed after the inputs are overwritten in place: the replay
// must give the bits of an eager call on the new inputs, twice over (the second time on the first
// inputs again: nothing may carry over from one replay to the next). Nothing may run at capture.
// A call that read host memory after it returned (a host-to-device copy of a table), synchronised,
// or issued work on another stream fails here.
TEST_F(CudaEmulatedReach, CapturedCallsReplayWithNewInputsBitwise) {
  const Shape plain_shape = with_v2({2, 4, 32, 20, 1, {{16, 16}, {8, 8}, {4, 4}}}, {4, 2, 6});
  for (bool callers_workspace : {true, false})
    for (bool deterministic : {true, false}) {
      SCOPED_TRACE(std::string(callers_workspace ? "caller's workspace" : "the backend's own workspace") +
                   (deterministic ? ", deterministic" : ", atomic"));
      // The plain op.
      {
        const Case first = make_case(plain_shape, {}, Locations::mixed, case_seed(1));
        const Case second = make_case(plain_shape, {}, Locations::cluster, case_seed(2));
        SCOPED_TRACE("plain: " + first.label);
        Tensors device = first.tensors;  // the inputs' memory, overwritten between replays
        Results captured(first.problem);
        captured.poison();
        msda::Params sizing = with_inputs(first.problem, device, {.deterministic = deterministic});
        sizing.grad_value = captured.grad_value.data();
        sizing.grad_locations = captured.grad_locations.data();
        sizing.grad_weights = captured.grad_weights.data();
        Workspace workspace(std::max(emulated::workspace_size(sizing, true), emulated::workspace_size(sizing, false)));
        msda_test::Run how{.deterministic = deterministic, .stream = test_stream()};
        if (callers_workspace) how.workspace = workspace.data(), how.workspace_bytes = workspace.bytes();

        ASSERT_EQ(msda_emulator::begin_capture(test_stream()), cudaSuccess);
        cudaStreamCaptureStatus status{};
        ASSERT_EQ(cudaStreamIsCapturing(test_stream(), &status), cudaSuccess);
        EXPECT_EQ(status, cudaStreamCaptureStatusActive);
        try {
          run_emulated(first.problem, device, captured, how);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "the captured calls threw: " << e.what();
        }
        const msda_emulator::Graph graph = msda_emulator::end_capture();
        ASSERT_EQ(graph.status(), cudaSuccess) << cudaGetErrorString(graph.status());
        EXPECT_GT(graph.nodes(), 0u);
        for (const Buffer* b : {&captured.output, &captured.grad_value, &captured.grad_locations, &captured.grad_weights})
          EXPECT_TRUE(all_nan(*b)) << "a captured call ran at capture";

        for (const Case* inputs : {&second, &first}) {
          overwrite(device.value, inputs->tensors.value);
          overwrite(device.locations, inputs->tensors.locations);
          overwrite(device.weights, inputs->tensors.weights);
          overwrite(device.grad_output, inputs->tensors.grad_output);
          captured.poison();
          ASSERT_EQ(graph.replay(), cudaSuccess);
          Results eager(first.problem);
          run_emulated(first.problem, device, eager, how);
          for (auto member : {&Results::output, &Results::grad_value, &Results::grad_locations, &Results::grad_weights})
            EXPECT_TRUE((captured.*member).same_bytes(eager.*member))
                << (inputs == &second ? "new inputs" : "the first inputs again");
        }
      }
      // The fused op.
      {
        const FusedCase first = make_fused_case({2, 4, 32, 20, 3, {{16, 16}, {8, 8}}}, 4, 0.5, {}, Draw::local, case_seed(3));
        const FusedCase second = make_fused_case({2, 4, 32, 20, 3, {{16, 16}, {8, 8}}}, 4, 0.5, {}, Draw::local, case_seed(4));
        SCOPED_TRACE("fused: " + first.label);
        FusedCase device = first;
        FusedResults captured(first.problem);
        captured.poison();
        msda::Params sizing = emulated::params_for(first.problem);
        sizing.fused = true;
        sizing.cuda.deterministic = deterministic;
        sizing.grad_value = captured.grad_value.data();
        sizing.grad_reference_points = captured.grad_reference.data();
        sizing.grad_offsets = captured.grad_offsets.data();
        sizing.grad_logits = captured.grad_logits.data();
        Workspace workspace(std::max(emulated::workspace_size(sizing, true), emulated::workspace_size(sizing, false)));
        msda_test::Run how{.deterministic = deterministic, .stream = test_stream()};
        if (callers_workspace) how.workspace = workspace.data(), how.workspace_bytes = workspace.bytes();

        ASSERT_EQ(msda_emulator::begin_capture(test_stream()), cudaSuccess);
        try {
          run_fused_emulated(device, captured, how);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "the captured calls threw: " << e.what();
        }
        const msda_emulator::Graph graph = msda_emulator::end_capture();
        ASSERT_EQ(graph.status(), cudaSuccess) << cudaGetErrorString(graph.status());
        for (const Buffer* b : captured.all()) EXPECT_TRUE(all_nan(*b)) << "a captured call ran at capture";

        for (const FusedCase* inputs : {&second, &first}) {
          overwrite(device.value, inputs->value);
          overwrite(device.reference, inputs->reference);
          overwrite(device.offsets, inputs->offsets);
          overwrite(device.logits, inputs->logits);
          overwrite(device.grad_output, inputs->grad_output);
          captured.poison();
          ASSERT_EQ(graph.replay(), cudaSuccess);
          FusedResults eager(first.problem);
          run_fused_emulated(device, eager, how);
          const auto c = captured.all(), e = eager.all();
          for (std::size_t k = 0; k < c.size(); ++k)
            EXPECT_TRUE(c[k]->same_bytes(*e[k]))
                << kFusedResultNames[k] << (inputs == &second ? ", new inputs" : ", the first inputs again");
        }
      }
    }
}

// ---- the emulated runtime itself: what the tests above rely on ----

class CudaEmulatedRuntime : public CudaEmulated {};

TEST_F(CudaEmulatedRuntime, ErrorsAreKeptUntilRead) {
  EXPECT_EQ(cudaSetDevice(3), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  void* p = nullptr;
  msda_emulator::fail_next_malloc();
  EXPECT_EQ(cudaMallocAsync(&p, 64, nullptr), cudaErrorMemoryAllocation);
  EXPECT_EQ(cudaGetLastError(), cudaErrorMemoryAllocation);
  ASSERT_EQ(cudaMallocAsync(&p, 64, nullptr), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(p, nullptr), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(p, nullptr), cudaErrorInvalidValue) << "a second free";
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  bool ran = false;
  msda_emulator::fail_next_launch();
  msda_emulator::launch(1, 32, nullptr, [&] { ran = true; });
  EXPECT_FALSE(ran);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchOutOfResources);
  msda_emulator::launch(std::int64_t(1) << 31, 32, nullptr, [&] { ran = true; });
  EXPECT_FALSE(ran);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration) << "a grid of 2^31 blocks";
  msda_emulator::launch(1, 32, nullptr, [&] { ran = true; });
  EXPECT_TRUE(ran);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST_F(CudaEmulatedRuntime, CaptureRecordsWorkAndRefusesWhatAGraphCannotHold) {
  cudaStream_t stream = test_stream();
  std::vector<float> device(8, 1.0f), host(8, 2.0f);
  int runs = 0;
  EXPECT_FALSE(msda::cuda_emulation::stream_capturing(stream));
  ASSERT_EQ(msda_emulator::begin_capture(stream), cudaSuccess);
  // What the PyTorch op asks before it would copy an index tensor to the host.
  EXPECT_TRUE(msda::cuda_emulation::stream_capturing(stream));
  EXPECT_FALSE(msda::cuda_emulation::stream_capturing(nullptr)) << "another stream";
  EXPECT_EQ(msda_emulator::begin_capture(stream), cudaErrorIllegalState);
  (void)cudaGetLastError();
  msda_emulator::launch(1, 32, stream, [&runs] {
    if (threadIdx.x == 0) ++runs;
  });
  EXPECT_EQ(cudaMemsetAsync(device.data(), 0, 4 * sizeof(float), stream), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(device.data() + 4, device.data() + 6, 2 * sizeof(float), cudaMemcpyDeviceToDevice, stream),
            cudaSuccess);
  void* memory = nullptr;
  EXPECT_EQ(cudaMallocAsync(&memory, 256, stream), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(memory, stream), cudaSuccess);
  // Other streams run now.
  msda_emulator::launch(1, 32, nullptr, [&runs] {
    if (threadIdx.x == 0) runs += 100;
  });
  EXPECT_EQ(runs, 100);
  EXPECT_EQ(device[0], 1.0f) << "a captured memset ran at capture";
  msda_emulator::Graph graph = msda_emulator::end_capture();
  ASSERT_EQ(graph.status(), cudaSuccess);
  EXPECT_FALSE(msda::cuda_emulation::stream_capturing(stream));
  device[6] = 7.0f;
  ASSERT_EQ(graph.replay(), cudaSuccess);
  ASSERT_EQ(graph.replay(), cudaSuccess);
  EXPECT_EQ(runs, 102);
  EXPECT_EQ(device[0], 0.0f);
  EXPECT_EQ(device[4], 7.0f) << "the copy reads the source at replay";

  for (int refused = 0; refused < 3; ++refused) {
    SCOPED_TRACE(refused);
    ASSERT_EQ(msda_emulator::begin_capture(stream), cudaSuccess);
    cudaError_t status = cudaSuccess;
    if (refused == 0) status = cudaMemcpyAsync(device.data(), host.data(), 4, cudaMemcpyHostToDevice, stream);
    if (refused == 1) status = cudaMemcpyAsync(host.data(), device.data(), 4, cudaMemcpyDeviceToHost, stream);
    if (refused == 2) status = cudaStreamSynchronize(stream);
    EXPECT_EQ(status, cudaErrorStreamCaptureUnsupported);
    cudaStreamCaptureStatus capture{};
    EXPECT_EQ(cudaStreamIsCapturing(stream, &capture), cudaSuccess);
    EXPECT_EQ(capture, cudaStreamCaptureStatusInvalidated);
    const msda_emulator::Graph invalid = msda_emulator::end_capture();
    EXPECT_EQ(invalid.status(), cudaErrorStreamCaptureInvalidated);
    EXPECT_EQ(invalid.replay(), cudaErrorStreamCaptureInvalidated);
    (void)cudaGetLastError();
  }
  EXPECT_EQ(host[0], 2.0f);
}

}  // namespace
