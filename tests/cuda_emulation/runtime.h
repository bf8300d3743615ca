// Just enough of CUDA for src/cuda/backend.inl to compile with the host compiler and run on the
// CPU: the thread indices, warp shuffles (all 32 lanes of a warp run as threads in lockstep, and a
// shuffle that not every lane reaches is counted as a fault), atomics, bf16/f16 storage types, the
// runtime calls the backend makes (memory is host memory; a fresh workspace is filled with NaN
// bytes so a read of something never written shows), and CUB's radix sort as a stable sort. Kernels
// run one warp at a time, blocks and warps in order, on the calling thread (one emulated launch at a
// time in a process); a launch returns when the kernel is done.
//
// Where a GPU would expose a host-side bug, the runtime behaves as CUDA's does: errors are
// returned and kept as the thread's last error, a launch CUDA refuses fails, a freed pointer
// cannot be freed again, and stream capture records work for replay instead of running it and
// refuses what a CUDA graph cannot hold (emulator.cpp). Tests inject an allocation or launch
// failure, and count launches and live allocations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <vector>

#include "numeric.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// CUDA's 16-byte vector type, which the kernels load channels through.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace msda_emulator {

extern dim3 thread_index;
extern dim3 block_index;
extern dim3 block_dim;
extern dim3 grid_dim;

// Runs body() as every thread of a grid of `blocks` blocks of `threads` threads (a multiple of 32).
void run(std::int64_t blocks, int threads, const std::function<void()>& body);

// The value of `bits` (sizeof <= 8) held by lane (this lane ^ offset) of the calling thread's warp.
std::uint64_t exchange(std::uint64_t bits, int offset);
// The value of `bits` held by lane `lane` of the calling thread's warp.
std::uint64_t read_lane(std::uint64_t bits, int lane);

// Shuffles some lane of a warp did not take part in (divergence: undefined on a GPU), since the
// last reset.
std::int64_t faults();
void reset_faults();

std::mutex& atomics();

}  // namespace msda_emulator

#define threadIdx (::msda_emulator::thread_index)
#define blockIdx (::msda_emulator::block_index)
#define blockDim (::msda_emulator::block_dim)
#define gridDim (::msda_emulator::grid_dim)

template <class T>
T __shfl_xor_sync(unsigned /*mask: the full warp, always*/, T value, int offset) {
  static_assert(sizeof(T) <= 8);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = msda_emulator::exchange(bits, offset);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// CUDA's __shfl_sync: within each segment of `width` lanes (a power of two), the value of lane
// `source` of the segment.
template <class T>
T __shfl_sync(unsigned /*mask: the full warp, always*/, T value, int source, int width = 32) {
  static_assert(sizeof(T) <= 8);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = static_cast<int>(threadIdx.x) & 31;
  bits = msda_emulator::read_lane(bits, (lane & ~(width - 1)) + (source & (width - 1)));
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}

inline float atomicAdd(float* p, float x) {
  std::lock_guard<std::mutex> lock(msda_emulator::atomics());
  const float old = *p;
  *p = old + x;
  return old;
}
inline double atomicAdd(double* p, double x) {
  std::lock_guard<std::mutex> lock(msda_emulator::atomics());
  const double old = *p;
  *p = old + x;
  return old;
}

struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct __half {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) { return msda::bf16_to_float(msda::bf16{x.bits}); }
inline float __half2float(__half x) { return msda::f16_to_float(msda::f16{x.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {msda::float_to_bf16(x).bits}; }
inline __half __float2half_rn(float x) { return {msda::float_to_f16(x).bits}; }

// ---- the runtime API ----
//
// Like CUDA's: a failing call returns its error and records it as the calling thread's last error
// (cudaGetLastError returns and clears it, cudaPeekAtLastError returns it); a kernel launch that
// fails returns nothing and leaves its error there, as <<<>>> does. Work on a stream runs when it
// is issued, unless the stream is being captured (msda_emulator::begin_capture, below).

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalState = 401,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureUnmatched = 903,
  cudaErrorStreamCaptureImplicit = 906,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

// CUDA's own strings, so that a message the backend builds from one reads as it would on a GPU.
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
// Every pointer is memory of the emulated device.
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer);
// Host memory filled with NaN bytes (0xFF: NaN in every float type), so a read of something never
// written shows. Freeing a pointer that is not a live allocation (twice, or never allocated) is
// cudaErrorInvalidValue.
cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream);
// Host and device are the same memory here, but a host-to-device or device-to-host copy (of
// pageable host memory) cannot be captured: cudaErrorStreamCaptureUnsupported while capturing.
cudaError_t cudaMemcpyAsync(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* pointer, int byte, std::size_t bytes, cudaStream_t stream);
// The synchronising calls: each is cudaErrorStreamCaptureUnsupported while any stream is
// captured (CUDA's global capture mode, which torch.cuda.graph uses) and invalidates the capture.
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** pointer, std::size_t bytes);
cudaError_t cudaFree(void* pointer);
cudaError_t cudaMemcpy(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);

namespace msda_emulator {

// A kernel launch, as kernel<<<blocks, threads, 0, stream>>>(...): `body` runs as every thread of
// the grid, now, or at each replay of the graph being captured on `stream` (then `body` must hold
// copies of the kernel's arguments, as a capture copies a kernel's parameters). A grid CUDA
// refuses (no blocks, more than 2^31 - 1, more than 1024 threads a block) is
// cudaErrorInvalidConfiguration, left as the last error.
void launch(std::int64_t blocks, int threads, cudaStream_t stream, std::function<void()> body);
// Records `error` as the calling thread's last error and returns it: how every failing call ends.
cudaError_t failed(cudaError_t error);
// Work for `stream` that is no kernel of the backend's (the emulated CUB sort): now, or recorded.
void enqueue(cudaStream_t stream, std::function<void()> work);

// Failure injection. The next cudaMallocAsync (or cudaMalloc) after `skip` successful ones fails
// with cudaErrorMemoryAllocation; the next kernel launch after `skip` successful ones does not run
// and leaves cudaErrorLaunchOutOfResources as the last error, as a launch of too many registers
// does.
void fail_next_malloc(int skip = 0);
void fail_next_launch(int skip = 0);
// Launches and allocations so far (a test counts a call's launches to fail each one in turn), and
// allocations not yet freed (a call that throws must still free what it allocated).
std::int64_t launches();
std::int64_t live_allocations();

// Stream capture, as cudaStreamBeginCapture / cudaStreamEndCapture and a graph's launch. While a
// stream is captured, its kernel launches, cudaMemsetAsync, device-to-device cudaMemcpyAsync and
// sorts are recorded (arguments by value) and run at each replay, not at capture;
// cudaMallocAsync allocates at capture and the memory lives until the graph is destroyed (its
// contents undefined again at each replay: NaN bytes), cudaFreeAsync is deferred likewise. A call
// that cannot be captured fails with cudaErrorStreamCaptureUnsupported and invalidates the capture.
class Graph {
 public:
  Graph() = default;
  Graph(Graph&& other) noexcept;
  Graph& operator=(Graph&& other) noexcept;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph();

  // cudaSuccess, cudaErrorStreamCaptureInvalidated when a call failed during the capture, or
  // cudaErrorStreamCaptureUnmatched when no capture was begun.
  cudaError_t status() const { return status_; }
  std::size_t nodes() const { return nodes_.size(); }
  // Runs the recorded work in order; an invalid graph runs nothing and returns its status.
  cudaError_t replay() const;

 private:
  friend Graph end_capture();
  std::vector<std::function<void()>> nodes_;
  std::vector<void*> memory_;  // allocated during the capture: freed with the graph
  cudaError_t status_ = cudaSuccess;
};

// cudaErrorIllegalState if a capture is under way already.
cudaError_t begin_capture(cudaStream_t stream = nullptr);
Graph end_capture();

}  // namespace msda_emulator

// ---- CUB's DeviceRadixSort::SortPairs over DoubleBuffers: stable, on bits [begin, end) ----

namespace cub {

template <class T>
struct DoubleBuffer {
  T* d_buffers[2];
  int selector = 0;
  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate} {}
  T* Current() const { return d_buffers[selector]; }
};

struct DeviceRadixSort {
  static constexpr std::size_t kScratchBytes = 64;

  // Like CUB after an odd number of passes, the result lands in the other buffer and the
  // selectors flip (at the call, on the host, as CUB decides it): a caller that reads the first
  // buffer instead of Current() reads unsorted data. The sort itself is stream work: recorded
  // while the stream is captured. It scribbles over its scratch, as CUB's passes do.
  template <class Key, class Value, class Count>
  static cudaError_t SortPairs(void* scratch, std::size_t& scratch_bytes, DoubleBuffer<Key>& keys,
                               DoubleBuffer<Value>& values, Count count, int begin_bit, int end_bit,
                               cudaStream_t stream = nullptr) {
    if (!scratch) {
      scratch_bytes = kScratchBytes;
      return cudaSuccess;
    }
    if (scratch_bytes < kScratchBytes || count < 0 || begin_bit < 0 || end_bit > int(8 * sizeof(Key)) ||
        begin_bit > end_bit) {
      return msda_emulator::failed(cudaErrorInvalidValue);
    }
    const Key mask = end_bit >= int(8 * sizeof(Key)) ? ~Key(0) : Key((Key(1) << end_bit) - 1);
    const Key* k = keys.Current();
    const Value* v = values.Current();
    Key* ko = keys.d_buffers[1 - keys.selector];
    Value* vo = values.d_buffers[1 - values.selector];
    const std::size_t n = static_cast<std::size_t>(count);
    msda_emulator::enqueue(stream, [=] {
      std::memset(scratch, 0xFF, kScratchBytes);
      std::vector<std::size_t> order(n);
      std::iota(order.begin(), order.end(), std::size_t(0));
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return Key((k[a] & mask) >> begin_bit) < Key((k[b] & mask) >> begin_bit);
      });
      for (std::size_t i = 0; i < n; ++i) {
        ko[i] = k[order[i]];
        vo[i] = v[order[i]];
      }
    });
    keys.selector ^= 1;
    values.selector ^= 1;
    return cudaSuccess;
  }
};

}  // namespace cub
