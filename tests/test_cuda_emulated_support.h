// What the emulated cuda backend's tests share (tests/test_cuda_emulated*.cpp): calls of the plain
// and the fused op through the backend's entry points as dispatch.cpp makes them, their float64
// reference results, the comparisons, and a fixture that checks after every test what a GPU run
// would show: no divergent warp shuffle, no CUDA error left pending, no workspace left allocated.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_emulation/emulated_backend.h"
#include "cuda_emulation/runtime.h"
#include "test_support.h"

namespace msda_test {

class CudaEmulated : public ::testing::Test {
 protected:
  void SetUp() override {
    msda_emulator::reset_faults();
    allocations_ = msda_emulator::live_allocations();
  }
  void TearDown() override {
    EXPECT_EQ(msda_emulator::faults(), 0) << "a warp shuffle some lanes did not reach";
    EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess) << "the backend left a CUDA error pending";
    (void)cudaGetLastError();
    EXPECT_EQ(msda_emulator::live_allocations(), allocations_) << "device memory allocated and not freed";
  }

 private:
  std::int64_t allocations_ = 0;
};

// ---- the plain op ----

// How a call runs: the deterministic or the atomic grad_value, the caller's workspace or none (the
// backend allocates), the stream.
struct Run {
  bool deterministic = true;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

msda::Params with_inputs(const msda::Problem& problem, const Tensors& tensors, const Run& how);

// Forward into r.output, then backward into the three gradients, r poisoned first.
void run_emulated(const msda::Problem& problem, const Tensors& tensors, Results& r, const Run& how = {});

// The case run with each grad_value (deterministic, then atomic), each against the reference.
void expect_both_grad_values_match(const Case& c);

// The reference backend in float64 on the widened inputs.
Results truth_of(const Case& c);

// close(), for results that may hold NaN or inf where the reference does too (an infinite value
// or grad_output): the same elements non-finite, each the same kind (NaN, +inf or -inf), and the
// finite rest within `tol`.
::testing::AssertionResult matches(const std::vector<double>& actual, const std::vector<double>& expected,
                                   double tol);

// Each result within SPEC's bound for its dtype, and nothing written outside the buffers.
void expect_matches_reference(const Case& c, const Results& got);

// ---- the fused op ----


// How reference points, offsets and logits are drawn.
enum class Draw {
  local,       // offsets of a few pixels (2 coordinates) or within the box (4): mostly in range
  nonfinite,   // local, with NaN, +-inf and huge offsets, -inf logits and (4 coordinates) infinite box sizes
  boundaries,  // 2 coordinates: reference points at pixel centres and whole-pixel offsets, so x*W - 0.5
               // (bilinear) and x*W + 0.5 (discrete) are whole numbers on power-of-two maps
};
const char* name(Draw d);

struct FusedCase {
  msda::Problem problem;
  Buffer value, reference, offsets, logits, grad_output;
  std::string label;
  msda::FusedInputs inputs() const { return {value.data(), reference.data(), offsets.data(), logits.data()}; }
};

std::int64_t reference_size(const msda::Problem& p);

FusedCase make_fused_case(const Shape& shape, std::int64_t coords, double offset_scale, const FusedDTypes& d,
                          Draw draw, std::uint64_t seed);

struct FusedResults {
  Buffer output, grad_value, grad_reference, grad_offsets, grad_logits;
  explicit FusedResults(const msda::Problem& p);
  std::vector<const Buffer*> all() const { return {&output, &grad_value, &grad_reference, &grad_offsets, &grad_logits}; }
  void poison();
};

extern const char* const kFusedResultNames[5];

FusedResults fused_truth_of(const FusedCase& c);

// The fused forward into r.output, then the backward into its four gradients, r poisoned first.
void run_fused_emulated(const FusedCase& c, FusedResults& r, const Run& how = {});

// `strict`: every result finite, as close() requires; else matches() (the same non-finite elements).
void expect_fused_matches_reference(const FusedCase& c, const FusedResults& got, bool strict = false);

}  // namespace msda_test
