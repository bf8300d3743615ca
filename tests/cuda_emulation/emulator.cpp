// The lockstep warp of runtime.h, as 32 coroutines (ucontext) on the calling thread: each lane runs
// until it reaches a shuffle (or ends), and once every lane has, they all go on. A shuffle is two
// such barriers: every lane posts its value, then reads its partner's. Coroutines instead of
// threads because a warp synchronises at every shuffle: 32 threads on a 2-core machine spend
// their time in the scheduler.
//
// Below the warps, the runtime API of runtime.h: errors, allocations, and stream capture.
#include <ucontext.h>

#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include "runtime.h"

namespace msda_emulator {

dim3 thread_index;
dim3 block_index;
dim3 block_dim;
dim3 grid_dim;

namespace {

constexpr int kLanes = 32;
// Small stacks: AddressSanitizer clears a coroutine stack's shadow at every switch, so its cost
// grows with the size. The kernels' frames need a few KB (more in sanitizer builds).
constexpr std::size_t kStackBytes = std::size_t(64) << 10;

class Warp {
 public:
  Warp() {
    for (auto& stack : stacks_) stack.resize(kStackBytes);
  }

  // Runs body() on all 32 lanes of warp `w` of block `b` and returns when every lane is done.
  void run(const std::function<void()>& body, std::int64_t b, int w) {
    body_ = &body;
    block_ = b;
    warp_ = w;
    for (int lane = 0; lane < kLanes; ++lane) {
      getcontext(&lanes_[lane]);
      lanes_[lane].uc_stack.ss_sp = stacks_[lane].data();
      lanes_[lane].uc_stack.ss_size = stacks_[lane].size();
      lanes_[lane].uc_link = &scheduler_;
      makecontext(&lanes_[lane], &Warp::entry, 0);
      state_[lane] = State::running;
      shuffles_[lane] = 0;
    }
    for (;;) {
      // One round: every running lane goes on to its next barrier, or to its end.
      for (int lane = 0; lane < kLanes; ++lane) {
        if (state_[lane] != State::running) continue;
        current_ = lane;
        block_index = {static_cast<unsigned>(block_), 0, 0};
        thread_index = {static_cast<unsigned>(warp_ * kLanes + lane), 0, 0};
        swapcontext(&scheduler_, &lanes_[lane]);
      }
      int waiting = 0;
      for (State s : state_) waiting += s == State::at_barrier;
      if (waiting == 0) return;
      if (waiting != kLanes) ++faults;  // some lanes ended while others wait at a shuffle
      for (State& s : state_)
        if (s == State::at_barrier) s = State::running;
    }
  }

  std::uint64_t exchange(std::uint64_t bits, int offset) { return read_lane(bits, current_ ^ offset); }

  // Every lane posts `bits` and reads what lane `partner` posted.
  std::uint64_t read_lane(std::uint64_t bits, int partner) {
    const int lane = current_;
    slots_[lane] = bits;
    sequence_[lane] = ++shuffles_[lane];
    wait();
    if (sequence_[partner] != sequence_[lane]) ++faults;  // lanes at different shuffles
    const std::uint64_t theirs = slots_[partner];
    wait();
    return theirs;
  }

  std::int64_t faults = 0;  // shuffles some lane did not reach (see runtime.h)

 private:
  enum class State { running, at_barrier, done };

  static void entry();

  void wait() {
    const int lane = current_;
    state_[lane] = State::at_barrier;
    swapcontext(&lanes_[lane], &scheduler_);
  }

  const std::function<void()>* body_ = nullptr;
  std::int64_t block_ = 0;
  int warp_ = 0;
  int current_ = 0;
  ucontext_t scheduler_{};
  ucontext_t lanes_[kLanes]{};
  std::vector<char> stacks_[kLanes];
  State state_[kLanes]{};
  std::uint64_t slots_[kLanes] = {}, sequence_[kLanes] = {}, shuffles_[kLanes] = {};

  friend Warp& warp();
};

Warp& warp() {
  static Warp w;
  return w;
}

void Warp::entry() {
  Warp& w = warp();
  (*w.body_)();
  w.state_[w.current_] = State::done;
  // Returning resumes uc_link, the scheduler.
}

}  // namespace

void run(std::int64_t blocks, int threads, const std::function<void()>& body) {
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  for (std::int64_t b = 0; b < blocks; ++b)
    for (int w = 0; w < threads / kLanes; ++w) warp().run(body, b, w);
}

std::uint64_t exchange(std::uint64_t bits, int offset) { return warp().exchange(bits, offset); }
std::uint64_t read_lane(std::uint64_t bits, int lane) { return warp().read_lane(bits, lane & (kLanes - 1)); }

std::int64_t faults() { return warp().faults; }
void reset_faults() { warp().faults = 0; }

std::mutex& atomics() {
  static std::mutex m;
  return m;
}

// ---- the runtime API ----

namespace {

thread_local cudaError_t last_error = cudaSuccess;

struct Runtime {
  std::mutex mutex;  // the bookkeeping below; kernels run one launch at a time anyway
  std::map<void*, std::size_t> allocations;  // live: pointer -> bytes
  std::set<void*> graph_owned;               // freed with the graph that captured their free or allocation
  int malloc_failure = -1;                   // allocations to let through before one fails; -1: none armed
  int launch_failure = -1;
  std::int64_t launches = 0;
  // The capture under way, if any.
  bool capturing = false;
  cudaStream_t captured = nullptr;
  cudaError_t capture_status = cudaSuccess;
  std::vector<std::function<void()>> nodes;
  std::vector<void*> memory;
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

bool capturing(cudaStream_t stream) { return runtime().capturing && runtime().captured == stream; }

// A call the capture cannot hold: the capture is invalid from here on, as in CUDA.
cudaError_t refuse_in_capture() {
  runtime().capture_status = cudaErrorStreamCaptureInvalidated;
  return failed(cudaErrorStreamCaptureUnsupported);
}

// Whether an armed failure fires now (and disarms it).
bool fires(int& armed) {
  if (armed < 0) return false;
  if (armed-- > 0) return false;
  return true;
}

constexpr unsigned char kUndefined = 0xFF;  // NaN in every float type

}  // namespace

cudaError_t failed(cudaError_t error) {
  last_error = error;
  return error;
}

void launch(std::int64_t blocks, int threads, cudaStream_t stream, std::function<void()> body) {
  Runtime& r = runtime();
  if (blocks < 1 || blocks > std::numeric_limits<std::int32_t>::max() || threads < 1 || threads > 1024) {
    if (capturing(stream)) r.capture_status = cudaErrorStreamCaptureInvalidated;
    failed(cudaErrorInvalidConfiguration);
    return;
  }
  if (threads % kLanes != 0) {
    std::fprintf(stderr, "msda_emulator: a block of %d threads: the emulation runs whole warps only\n", threads);
    std::abort();
  }
  if (fires(r.launch_failure)) {
    if (capturing(stream)) r.capture_status = cudaErrorStreamCaptureInvalidated;
    failed(cudaErrorLaunchOutOfResources);
    return;
  }
  ++r.launches;
  if (capturing(stream)) {
    r.nodes.push_back([blocks, threads, body = std::move(body)] { run(blocks, threads, body); });
    return;
  }
  run(blocks, threads, body);
}

void enqueue(cudaStream_t stream, std::function<void()> work) {
  if (capturing(stream))
    runtime().nodes.push_back(std::move(work));
  else
    work();
}

void fail_next_malloc(int skip) { runtime().malloc_failure = skip; }
void fail_next_launch(int skip) { runtime().launch_failure = skip; }
std::int64_t launches() { return runtime().launches; }
std::int64_t live_allocations() {
  const std::lock_guard<std::mutex> lock(runtime().mutex);
  return static_cast<std::int64_t>(runtime().allocations.size());
}

Graph::Graph(Graph&& other) noexcept
    : nodes_(std::move(other.nodes_)), memory_(std::move(other.memory_)), status_(other.status_) {
  other.memory_.clear();
}

Graph& Graph::operator=(Graph&& other) noexcept {
  if (this != &other) {
    Graph old(std::move(*this));
    nodes_ = std::move(other.nodes_);
    memory_ = std::move(other.memory_);
    status_ = other.status_;
    other.memory_.clear();
  }
  return *this;
}

Graph::~Graph() {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  for (void* p : memory_) {
    r.allocations.erase(p);
    r.graph_owned.erase(p);
    std::free(p);
  }
}

cudaError_t Graph::replay() const {
  if (status_ != cudaSuccess) return failed(status_);
  for (const auto& node : nodes_) node();
  return cudaSuccess;
}

cudaError_t begin_capture(cudaStream_t stream) {
  Runtime& r = runtime();
  if (r.capturing) return failed(cudaErrorIllegalState);
  r.capturing = true;
  r.captured = stream;
  r.capture_status = cudaSuccess;
  r.nodes.clear();
  r.memory.clear();
  return cudaSuccess;
}

Graph end_capture() {
  Runtime& r = runtime();
  Graph graph;
  if (!r.capturing) {
    graph.status_ = failed(cudaErrorStreamCaptureUnmatched);
    return graph;
  }
  graph.nodes_ = std::move(r.nodes);
  graph.memory_ = std::move(r.memory);
  graph.status_ = r.capture_status;
  if (graph.status_ != cudaSuccess) failed(graph.status_);
  r.capturing = false;
  r.captured = nullptr;
  r.nodes.clear();
  r.memory.clear();
  return graph;
}

}  // namespace msda_emulator

using msda_emulator::failed;

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureUnmatched: return "cudaErrorStreamCaptureUnmatched";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnmatched: return "operation not permitted on an event last recorded in a capturing stream";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t error = msda_emulator::last_error;
  msda_emulator::last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() { return msda_emulator::last_error; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : failed(cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer) {
  *attributes = {cudaMemoryTypeDevice, 0, const_cast<void*>(pointer), nullptr};
  return cudaSuccess;
}

namespace {

cudaError_t allocate(void** pointer, std::size_t bytes, cudaStream_t stream, bool in_capture) {
  using namespace msda_emulator;
  Runtime& r = runtime();
  *pointer = nullptr;
  if (fires(r.malloc_failure)) {
    if (in_capture) r.capture_status = cudaErrorStreamCaptureInvalidated;
    return failed(cudaErrorMemoryAllocation);
  }
  if (bytes == 0) return cudaSuccess;
  void* p = std::malloc(bytes);
  if (!p) {
    if (in_capture) r.capture_status = cudaErrorStreamCaptureInvalidated;
    return failed(cudaErrorMemoryAllocation);
  }
  std::memset(p, kUndefined, bytes);
  {
    const std::lock_guard<std::mutex> lock(r.mutex);
    r.allocations[p] = bytes;
    if (in_capture) r.graph_owned.insert(p);
  }
  if (in_capture) {
    // A graph's allocation node: the memory is the graph's, its contents undefined at each replay.
    r.memory.push_back(p);
    r.nodes.push_back([p, bytes] { std::memset(p, kUndefined, bytes); });
  }
  *pointer = p;
  (void)stream;
  return cudaSuccess;
}

cudaError_t release(void* pointer, bool in_capture) {
  using namespace msda_emulator;
  Runtime& r = runtime();
  if (!pointer) return cudaSuccess;
  std::size_t bytes = 0;
  bool owned_by_graph = false;
  {
    const std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.allocations.find(pointer);
    if (it == r.allocations.end()) {
      if (in_capture) r.capture_status = cudaErrorStreamCaptureInvalidated;
      return failed(cudaErrorInvalidValue);  // freed already, or never allocated here
    }
    bytes = it->second;
    r.allocations.erase(it);
    owned_by_graph = r.graph_owned.count(pointer) != 0;
    if (in_capture && !owned_by_graph) r.graph_owned.insert(pointer);
  }
  if (in_capture) {
    // A graph's free node: the memory stays until the graph is destroyed, undefined after this
    // point of each replay, so that work recorded after the free cannot read it.
    if (std::find(r.memory.begin(), r.memory.end(), pointer) == r.memory.end()) r.memory.push_back(pointer);
    r.nodes.push_back([pointer, bytes] { std::memset(pointer, kUndefined, bytes); });
    return cudaSuccess;
  }
  if (!owned_by_graph) std::free(pointer);  // else the graph that owns it frees it
  return cudaSuccess;
}

}  // namespace

cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream) {
  return allocate(pointer, bytes, stream, msda_emulator::capturing(stream));
}

cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream) {
  return release(pointer, msda_emulator::capturing(stream));
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  using namespace msda_emulator;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return failed(cudaErrorInvalidValue);
  if (capturing(stream)) {
    // Pageable host memory cannot be captured, and a host buffer freed after the call would be
    // read at every replay. Every pointer is the device's (cudaPointerGetAttributes), so
    // cudaMemcpyDefault is a device-to-device copy.
    if (kind != cudaMemcpyDeviceToDevice && kind != cudaMemcpyDefault) return refuse_in_capture();
    runtime().nodes.push_back([to, from, bytes] { std::memmove(to, from, bytes); });
    return cudaSuccess;
  }
  std::memmove(to, from, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int byte, std::size_t bytes, cudaStream_t stream) {
  using namespace msda_emulator;
  if (bytes > 0 && !pointer) return failed(cudaErrorInvalidValue);
  if (capturing(stream)) {
    runtime().nodes.push_back([pointer, byte, bytes] { std::memset(pointer, byte, bytes); });
    return cudaSuccess;
  }
  std::memset(pointer, byte, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return msda_emulator::runtime().capturing ? msda_emulator::refuse_in_capture() : cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  return msda_emulator::runtime().capturing ? msda_emulator::refuse_in_capture() : cudaSuccess;
}

cudaError_t cudaMalloc(void** pointer, std::size_t bytes) {
  if (msda_emulator::runtime().capturing) return msda_emulator::refuse_in_capture();
  return allocate(pointer, bytes, nullptr, false);
}

cudaError_t cudaFree(void* pointer) {
  if (msda_emulator::runtime().capturing) return msda_emulator::refuse_in_capture();
  return release(pointer, false);
}

cudaError_t cudaMemcpy(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind) {
  if (msda_emulator::runtime().capturing) return msda_emulator::refuse_in_capture();
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return failed(cudaErrorInvalidValue);
  std::memmove(to, from, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  using namespace msda_emulator;
  if (!capturing(stream))
    *status = cudaStreamCaptureStatusNone;
  else
    *status = runtime().capture_status == cudaSuccess ? cudaStreamCaptureStatusActive
                                                      : cudaStreamCaptureStatusInvalidated;
  return cudaSuccess;
}
