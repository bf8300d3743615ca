// The cuda backend on a GPU, through the C++ API over device memory: against the reference
// backend (double) on the same inputs for every dtype mix, bitwise repeatability of the backward,
// the caller's stream and workspace, and pointers it must refuse. Skipped, saying so, where no
// CUDA device is visible. Built only with the cuda backend (CMake found nvcc).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "test_support.h"

namespace {

using namespace msda_test;

#define REQUIRE_GPU() \
  if (!msda::cuda_available()) GTEST_SKIP() << "no CUDA device visible: the cuda backend's GPU tests did not run"

// A device copy of a host Buffer (or device memory of a buffer's size), freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes_) EXPECT_EQ(cudaMalloc(&data_, bytes_), cudaSuccess);
  }
  explicit DeviceBuffer(const Buffer& host) : DeviceBuffer(host.bytes()) {
    if (bytes_) EXPECT_EQ(cudaMemcpy(data_, host.data(), bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return data_; }
  // NaN bits in every element, so an element the backend does not write shows.
  void poison() {
    if (bytes_) EXPECT_EQ(cudaMemset(data_, 0xFF, bytes_), cudaSuccess);
  }
  void copy_to(Buffer& host) const {
    ASSERT_EQ(host.bytes(), bytes_);
    if (bytes_) ASSERT_EQ(cudaMemcpy(host.data(), data_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  void* data_ = nullptr;
  std::size_t bytes_;
};

// Device copies of a case's inputs and poisoned device results; `run` does forward and backward
// (every gradient) with the cuda backend and brings the results back.
struct DeviceCase {
  DeviceBuffer value, locations, weights, grad_output;
  DeviceBuffer output, grad_value, grad_locations, grad_weights;
  explicit DeviceCase(const msda::Problem& pr, const Tensors& t)
      : value(t.value),
        locations(t.locations),
        weights(t.weights),
        grad_output(t.grad_output),
        output(t.grad_output.bytes()),
        grad_value(t.value.bytes()),
        grad_locations(t.locations.bytes()),
        grad_weights(t.weights.bytes()) {
    (void)pr;
  }
  void run(const msda::Problem& pr, Results& results, const msda::Options& options) {
    for (DeviceBuffer* b : {&output, &grad_value, &grad_locations, &grad_weights}) b->poison();
    const msda::Inputs inputs{value.data(), locations.data(), weights.data()};
    msda::forward(pr, inputs, output.data(), options);
    msda::backward(pr, inputs, grad_output.data(), {grad_value.data(), grad_locations.data(), grad_weights.data()},
                   options);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    output.copy_to(results.output);
    grad_value.copy_to(results.grad_value);
    grad_locations.copy_to(results.grad_locations);
    grad_weights.copy_to(results.grad_weights);
  }
};

msda::Options cuda_options(bool deterministic = true) {
  msda::Options o;
  o.backend = msda::Backend::cuda;
  o.cuda.deterministic = deterministic;
  return o;
}

TEST(CudaDevice, EveryDtypeMixMatchesTheReference) {
  REQUIRE_GPU();
  const Shape shapes[] = {{2, 3, 32, 17, 4, {{9, 11}, {5, 6}, {3, 3}, {1, 2}}},
                          {1, 1, 3, 5, 1, {{1, 1}}},
                          {1, 2, 257, 4, 2, {{4, 4}, {2, 2}}},
                          {2, 8, 8, 33, 8, {{16, 16}, {8, 8}}}};
  std::uint64_t index = 0;
  for (const Shape& shape : shapes)
    for (const DTypes& mix : dtype_mixes())
      for (Locations kind : {Locations::mixed, Locations::cluster}) {
        const Case c = make_case(shape, mix, kind, case_seed(index++));
        SCOPED_TRACE(c.label);
        const msda::Problem f64 = as_f64(c.problem);
        const Tensors wide = c.tensors.converted(DType::f64, DType::f64, DType::f64);
        Results expected(f64), actual(c.problem);
        msda::Options reference;
        reference.backend = msda::Backend::reference;
        run_all(f64, wide, expected, reference);
        DeviceCase device(c.problem, c.tensors);
        device.run(c.problem, actual, cuda_options());
        const double tol = tolerance(mix.value);
        EXPECT_TRUE(close(actual.output.to_double(), expected.output.to_double(), tol));
        EXPECT_TRUE(close(actual.grad_value.to_double(), expected.grad_value.to_double(), tol));
        // Location gradients jump at pixel borders: compare them where no border is near
        // (the `mixed` kind puts samples on them on purpose).
        if (kind == Locations::cluster) {
          EXPECT_TRUE(close(actual.grad_locations.to_double(), expected.grad_locations.to_double(), tol));
        }
        EXPECT_TRUE(close(actual.grad_weights.to_double(), expected.grad_weights.to_double(), tol));
      }
}

TEST(CudaDevice, BackwardIsBitwiseRepeatableAndAtomicsAgree) {
  REQUIRE_GPU();
  for (const DTypes& mix : {DTypes{DType::f32, DType::f32, DType::f32}, DTypes{DType::bf16, DType::f32, DType::f32}}) {
    const Case c = make_case({2, 4, 32, 2000, 4, {{4, 4}, {2, 2}}}, mix, Locations::cluster, case_seed(0));
    SCOPED_TRACE(c.label);
    DeviceCase device(c.problem, c.tensors);
    Results first(c.problem), again(c.problem), atomic(c.problem);
    device.run(c.problem, first, cuda_options());
    device.run(c.problem, again, cuda_options());
    EXPECT_TRUE(first.grad_value.same_bytes(again.grad_value));
    EXPECT_TRUE(first.grad_locations.same_bytes(again.grad_locations));
    EXPECT_TRUE(first.grad_weights.same_bytes(again.grad_weights));
    EXPECT_TRUE(first.output.same_bytes(again.output));
    device.run(c.problem, atomic, cuda_options(false));
    EXPECT_TRUE(close(atomic.grad_value.to_double(), first.grad_value.to_double(), tolerance(mix.value)));
  }
}

TEST(CudaDevice, CallersStreamAndWorkspace) {
  REQUIRE_GPU();
  const Case c = make_case({1, 2, 8, 50, 4, {{8, 8}, {4, 4}}}, {}, Locations::unit, case_seed(0));
  DeviceCase device(c.problem, c.tensors);
  Results own(c.problem), given(c.problem);
  device.run(c.problem, own, cuda_options());

  msda::Options options = cuda_options();
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const std::size_t bytes = msda::workspace_size(c.problem, msda::Pass::backward, options);
  EXPECT_GT(bytes, 0u);
  DeviceBuffer workspace(bytes);
  options.cuda.stream = stream;
  options.cuda.workspace = workspace.data();
  options.cuda.workspace_bytes = bytes;
  device.run(c.problem, given, options);
  EXPECT_TRUE(own.grad_value.same_bytes(given.grad_value));
  EXPECT_TRUE(own.output.same_bytes(given.output));

  options.cuda.workspace_bytes = bytes - 1;
  try {
    msda::backward(c.problem, {device.value.data(), device.locations.data(), device.weights.data()},
                   device.grad_output.data(), {device.grad_value.data(), nullptr, nullptr}, options);
    FAIL() << "expected an Error";
  } catch (const msda::Error& e) {
    EXPECT_EQ(e.argument(), "options.cuda.workspace_bytes");
  }
  cudaStreamDestroy(stream);
}

TEST(CudaDevice, HostPointersAreAnErrorNamingTheArgument) {
  REQUIRE_GPU();
  const Case c = make_case({1, 2, 4, 3, 2, {{3, 3}}}, {}, Locations::unit, case_seed(0));
  DeviceCase device(c.problem, c.tensors);
  Results host(c.problem);
  try {
    msda::forward(c.problem, {device.value.data(), c.tensors.locations.data(), device.weights.data()},
                  device.output.data(), cuda_options());
    FAIL() << "expected an Error";
  } catch (const msda::Error& e) {
    EXPECT_EQ(e.argument(), "sampling_locations");
  }
}

TEST(CudaDevice, EmptyProblemsZeroTheGradients) {
  REQUIRE_GPU();
  Shape shape{1, 2, 4, 3, 2, {{3, 3}}};
  shape.queries = 0;
  const Case c = make_case(shape, {}, Locations::unit, case_seed(0));
  DeviceCase device(c.problem, c.tensors);
  Results r(c.problem);
  device.run(c.problem, r, cuda_options());
  for (double x : r.grad_value.to_double()) EXPECT_EQ(x, 0.0);
}

// A forward and a deterministic backward captured in a CUDA graph (stream capture, as
// torch.cuda.graph does), replayed after the inputs are overwritten in place: the replay must give
// the bits an eager call gives on the new inputs. A call that read host memory after returning,
// synchronised, or allocated outside the stream's order would fail the capture or the replay.
TEST(CudaDevice, CapturedGraphsReplayWithNewInputs) {
  REQUIRE_GPU();
  for (bool fused_shapes : {false, true}) {
    const Case c = make_case(fused_shapes ? with_v2({2, 4, 32, 300, 1, {{16, 16}, {8, 8}, {4, 4}}}, {4, 2, 6})
                                          : Shape{2, 4, 32, 300, 4, {{16, 16}, {8, 8}}},
                             {}, Locations::mixed, case_seed(1));
    const Case fresh = make_case(fused_shapes ? with_v2({2, 4, 32, 300, 1, {{16, 16}, {8, 8}, {4, 4}}}, {4, 2, 6})
                                              : Shape{2, 4, 32, 300, 4, {{16, 16}, {8, 8}}},
                                 {}, Locations::cluster, case_seed(2));
    SCOPED_TRACE(c.label);
    DeviceCase device(c.problem, c.tensors);
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    msda::Options options = cuda_options();
    options.cuda.stream = stream;
    const std::size_t bytes = msda::workspace_size(c.problem, msda::Pass::backward, options);
    DeviceBuffer workspace(bytes);
    options.cuda.workspace = workspace.data();
    options.cuda.workspace_bytes = bytes;
    const msda::Inputs inputs{device.value.data(), device.locations.data(), device.weights.data()};
    const msda::Gradients gradients{device.grad_value.data(), device.grad_locations.data(),
                                    device.grad_weights.data()};

    cudaGraph_t graph;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    msda::forward(c.problem, inputs, device.output.data(), options);
    msda::backward(c.problem, inputs, device.grad_output.data(), gradients, options);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    // New inputs in the same memory, then the replay.
    for (auto [to, from] : {std::pair{&device.value, &fresh.tensors.value}, {&device.locations, &fresh.tensors.locations},
                            {&device.weights, &fresh.tensors.weights}, {&device.grad_output, &fresh.tensors.grad_output}})
      ASSERT_EQ(cudaMemcpy(to->data(), from->data(), from->bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    for (DeviceBuffer* b : {&device.output, &device.grad_value, &device.grad_locations, &device.grad_weights})
      b->poison();
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    Results replayed(c.problem), eager(c.problem);
    device.output.copy_to(replayed.output);
    device.grad_value.copy_to(replayed.grad_value);
    device.grad_locations.copy_to(replayed.grad_locations);
    device.grad_weights.copy_to(replayed.grad_weights);
    device.run(c.problem, eager, options);
    EXPECT_TRUE(replayed.output.same_bytes(eager.output));
    EXPECT_TRUE(replayed.grad_value.same_bytes(eager.grad_value));
    EXPECT_TRUE(replayed.grad_locations.same_bytes(eager.grad_locations));
    EXPECT_TRUE(replayed.grad_weights.same_bytes(eager.grad_weights));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

// A failed call (here a workspace no device can hold) is an exception, and the next call works:
// msda clears the error it reported instead of leaving it for every later launch to find.
TEST(CudaDevice, AFailedCallLeavesTheNextOneWorking) {
  REQUIRE_GPU();
  const Case c = make_case({1, 2, 8, 50, 4, {{8, 8}, {4, 4}}}, {}, Locations::unit, case_seed(0));
  DeviceCase device(c.problem, c.tensors);
  Results before(c.problem), after(c.problem);
  device.run(c.problem, before, cuda_options());
  // A problem whose workspace (sorted records of 2^33 samples) no GPU holds: cudaMallocAsync fails.
  msda::Problem huge = c.problem;
  huge.queries = std::int64_t(1) << 31;
  EXPECT_ANY_THROW(msda::backward(huge, {device.value.data(), device.locations.data(), device.weights.data()},
                                  device.grad_output.data(), {device.grad_value.data(), nullptr, nullptr},
                                  cuda_options()));
  device.run(c.problem, after, cuda_options());
  EXPECT_TRUE(before.output.same_bytes(after.output));
  EXPECT_TRUE(before.grad_value.same_bytes(after.grad_value));
}

}  // namespace
