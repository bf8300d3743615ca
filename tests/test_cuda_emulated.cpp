// The cuda backend's kernels and host side (src/cuda/backend.inl), run on the CPU over the
// emulated runtime of tests/cuda_emulation/ (every warp's 32 lanes in lockstep, shuffles checked
// for divergence, fresh workspace full of NaN bytes, CUB's sort replaced by a stable sort that
// leaves its result in the other buffer as CUB's does), against the reference backend in double.
// This is what a machine without a GPU can say about the kernels; tests/cuda/ runs the same
// questions on a GPU.
#include <gtest/gtest.h>

#include <vector>

#include "cuda_emulation/emulated_backend.h"
#include "cuda_emulation/runtime.h"
#include "test_support.h"

namespace {

using namespace msda_test;
namespace emulated = msda::cuda_emulation;

struct Run {
  bool deterministic = true;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

msda::Params with_inputs(const msda::Problem& pr, const Tensors& t, const Run& how) {
  msda::Params p = emulated::params_for(pr);
  p.value = t.value.data();
  p.locations = t.locations.data();
  p.weights = t.weights.data();
  p.cuda.deterministic = how.deterministic;
  p.cuda.workspace = how.workspace;
  p.cuda.workspace_bytes = how.workspace_bytes;
  return p;
}

void run_emulated(const msda::Problem& pr, const Tensors& t, Results& r, const Run& how = {}) {
  r.poison();
  msda::Params forward = with_inputs(pr, t, how);
  forward.output = r.output.data();
  emulated::forward(forward);
  msda::Params backward = with_inputs(pr, t, how);
  backward.grad_output = t.grad_output.data();
  backward.grad_value = r.grad_value.data();
  backward.grad_locations = r.grad_locations.data();
  backward.grad_weights = r.grad_weights.data();
  emulated::backward(backward);
}

Results truth_of(const Case& c) {
  const msda::Problem f64 = as_f64(c.problem);
  Results truth(f64);
  msda::Options reference;
  reference.backend = msda::Backend::reference;
  run_all(f64, c.tensors.converted(DType::f64, DType::f64, DType::f64), truth, reference);
  return truth;
}

void expect_matches_reference(const Case& c, const Results& got) {
  const Results truth = truth_of(c);
  // Each result to the bound of its own dtype (an f32 gradient of an f64 problem to f32's).
  for (auto [member, name] : {std::pair{&Results::output, "output"}, std::pair{&Results::grad_value, "grad_value"},
                              std::pair{&Results::grad_locations, "grad_locations"},
                              std::pair{&Results::grad_weights, "grad_weights"}}) {
    const Buffer& g = got.*member;
    EXPECT_TRUE(close(g.to_double(), (truth.*member).to_double(), tolerance(g.dtype()))) << name;
  }
  EXPECT_TRUE(got.guards_intact()) << "a result was written outside its buffer";
}

class CudaEmulated : public ::testing::Test {
 protected:
  void SetUp() override { msda_emulator::reset_faults(); }
  void TearDown() override { EXPECT_EQ(msda_emulator::faults(), 0) << "a warp shuffle some lanes did not reach"; }
};

TEST_F(CudaEmulated, EveryDtypeMixMatchesTheReference) {
  std::uint64_t index = 0;
  for (const DTypes& mix : dtype_mixes())
    for (Locations kind : {Locations::mixed, Locations::cluster, Locations::centres}) {
      const Case c = make_case({2, 3, 32, 9, 4, {{8, 4}, {4, 2}, {1, 2}}}, mix, kind, case_seed(index++));
      SCOPED_TRACE(c.label);
      Results got(c.problem);
      run_emulated(c.problem, c.tensors, got);
      expect_matches_reference(c, got);
    }
}

TEST_F(CudaEmulated, ChannelCountsAroundTheLaneGroups) {
  // D = 1 and 3: groups of 1 and 4 lanes, several heads per warp; 33: lanes with one or two
  // channels; 130: two passes of 32 lanes x 4 channels.
  std::uint64_t index = 0;
  for (std::int64_t d : {1, 3, 33, 130})
    for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::bf16, DType::f32, DType::f32}}) {
      const Case c = make_case({1, 3, d, 5, 2, {{3, 5}, {2, 2}}}, mix, Locations::mixed, case_seed(index++));
      SCOPED_TRACE(c.label);
      Results got(c.problem);
      run_emulated(c.problem, c.tensors, got);
      expect_matches_reference(c, got);
    }
}

TEST_F(CudaEmulated, ManyLevelsAndPoints) {
  std::vector<msda::Level> levels;
  for (int l = 0; l < 9; ++l) levels.push_back({1 + l % 3, 2 + l % 4});
  const Case c = make_case({1, 2, 8, 3, 9, levels}, {}, Locations::wide, case_seed(0));
  Results got(c.problem);
  run_emulated(c.problem, c.tensors, got);
  expect_matches_reference(c, got);
}

TEST_F(CudaEmulated, DeterministicBackwardRepeatsItsBitsAndAtomicsAgree) {
  for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::f16, DType::f32, DType::f32}}) {
    const Case c = make_case({2, 2, 16, 40, 4, {{3, 3}, {2, 2}}}, mix, Locations::cluster, case_seed(0));
    SCOPED_TRACE(c.label);
    Results first(c.problem), again(c.problem), atomic(c.problem);
    run_emulated(c.problem, c.tensors, first);
    run_emulated(c.problem, c.tensors, again);
    for (auto member : {&Results::output, &Results::grad_value, &Results::grad_locations, &Results::grad_weights})
      EXPECT_TRUE((first.*member).same_bytes(again.*member));
    run_emulated(c.problem, c.tensors, atomic, {.deterministic = false});
    expect_matches_reference(c, atomic);
  }
}

TEST_F(CudaEmulated, OnlyTheRequestedGradients) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  const Results truth = truth_of(c);
  Results got(c.problem);
  got.poison();
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  p.grad_output = c.tensors.grad_output.data();
  p.grad_weights = got.grad_weights.data();  // weights only: no grad_value pipeline at all
  emulated::backward(p);
  EXPECT_TRUE(close(got.grad_weights.to_double(), truth.grad_weights.to_double(), 1e-5));
  for (double x : got.grad_value.to_double()) EXPECT_TRUE(std::isnan(x));  // untouched
  p.grad_weights = nullptr;
  p.grad_value = got.grad_value.data();  // grad_value only
  emulated::backward(p);
  EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(), 1e-5));
}

TEST_F(CudaEmulated, WorkspaceFollowsTheWantedGradients) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  char wanted;
  p.grad_weights = &wanted;
  const std::size_t samples_only = emulated::workspace_size(p, true);
  p.grad_value = &wanted;
  const std::size_t with_value = emulated::workspace_size(p, true);
  p.cuda.deterministic = false;  // f32 atomics add into grad_value itself
  const std::size_t atomic = emulated::workspace_size(p, true);
  EXPECT_EQ(samples_only, 256u);  // the level table alone
  EXPECT_EQ(atomic, 256u);
  EXPECT_GT(with_value, samples_only + 12u * 2 * 6 * 2 * 4);  // places, keys and ids of 24 samples
}

TEST_F(CudaEmulated, CallersWorkspaceIsCheckedBeforeUse) {
  const Case c = make_case({1, 2, 4, 6, 2, {{4, 4}}}, {}, Locations::unit, case_seed(0));
  msda::Params p = with_inputs(c.problem, c.tensors, {});
  Results got(c.problem);
  p.grad_output = c.tensors.grad_output.data();
  p.grad_value = got.grad_value.data();
  const std::size_t bytes = emulated::workspace_size(p, true);
  std::vector<std::uint64_t> storage(bytes / 8 + 64);
  auto* aligned = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 255) / 256 * 256);
  for (const auto& [pointer, size, what] :
       {std::tuple{aligned + 8, bytes, "options.cuda.workspace"}, std::tuple{aligned, bytes - 1, "options.cuda.workspace_bytes"}}) {
    p.cuda.workspace = pointer;
    p.cuda.workspace_bytes = size;
    try {
      emulated::backward(p);
      ADD_FAILURE() << "expected an Error naming " << what;
    } catch (const msda::Error& e) {
      EXPECT_EQ(e.argument(), what);
    }
  }
  p.cuda.workspace = aligned;
  p.cuda.workspace_bytes = bytes;
  emulated::backward(p);
  const Results truth = truth_of(c);
  EXPECT_TRUE(close(got.grad_value.to_double(), truth.grad_value.to_double(), 1e-5));
}

}  // namespace
