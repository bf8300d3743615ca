// Just enough of CUDA for src/cuda/backend.inl to compile with the host compiler and run on the
// CPU: the thread indices, warp shuffles (all 32 lanes of a warp run as threads in lockstep, and a
// shuffle that not every lane reaches is counted as a fault), atomics, bf16/f16 storage types, the
// runtime calls the backend makes (memory is host memory; a fresh workspace is filled with NaN
// bytes so a read of something never written shows), and CUB's radix sort as a stable sort. Kernels
// run one warp at a time, blocks and warps in order, on the calling thread (one emulated launch at a
// time in a process); a launch returns when the kernel is done.
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

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidDevice = 101 };
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

inline const char* cudaGetErrorString(cudaError_t) { return "an emulated CUDA error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
// Every pointer is memory of the emulated device.
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  *a = {cudaMemoryTypeDevice, 0, const_cast<void*>(p), nullptr};
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) {
  *p = std::malloc(bytes);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, bytes);  // NaN in every float type
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* to, const void* from, std::size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(to, from, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int byte, std::size_t bytes, cudaStream_t) {
  std::memset(p, byte, bytes);
  return cudaSuccess;
}

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
  // Like CUB after an odd number of passes, the result lands in the other buffer and the
  // selectors flip: a caller that reads the first buffer instead of Current() reads unsorted data.
  template <class Key, class Value, class Count>
  static cudaError_t SortPairs(void* scratch, std::size_t& scratch_bytes, DoubleBuffer<Key>& keys,
                               DoubleBuffer<Value>& values, Count count, int begin_bit, int end_bit,
                               cudaStream_t = nullptr) {
    if (!scratch) {
      scratch_bytes = 64;
      return cudaSuccess;
    }
    const Key mask = end_bit >= int(8 * sizeof(Key)) ? ~Key(0) : Key((Key(1) << end_bit) - 1);
    const Key* k = keys.Current();
    const Value* v = values.Current();
    std::vector<std::int64_t> order(static_cast<std::size_t>(count));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return Key((k[a] & mask) >> begin_bit) < Key((k[b] & mask) >> begin_bit);
    });
    Key* ko = keys.d_buffers[1 - keys.selector];
    Value* vo = values.d_buffers[1 - values.selector];
    for (std::size_t i = 0; i < order.size(); ++i) {
      ko[i] = k[order[i]];
      vo[i] = v[order[i]];
    }
    keys.selector ^= 1;
    values.selector ^= 1;
    return cudaSuccess;
  }
};

}  // namespace cub
